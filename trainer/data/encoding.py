"""Pass 1's per-chunk work, bad rows included, and the spill layout between the passes.

``Encoder``: a ``RawChunk`` of one input file -> one spill batch: rows
validated (bad rows fail the run or are counted and dropped), given their
split, numeric columns turned into tokens and dense values, every vocabulary
field dictionary-encoded (hashed fields straight to ids), train tokens counted.
``map_batches``: spill batches -> tables in the on-disk layout.

Spill batch of N rows, grouped by split: ``split``, ``label`` int8 (N,);
``dense`` float32 (N, D) as a fixed-size list, only with dense columns; per
sparse field: a vocabulary field's dictionary<int32, binary> column whose last
entry is null (missing), a hashed field's int32 ids; a multi-hot field is a list
of those (a row without ids: an empty list).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.data.dataset_spec import ColumnSpec, DatasetSpec
from trainer.data.hashing import bucket_ids
from trainer.data.raw_reader import RawChunk, show_bytes
from trainer.data.schema import MISSING_ID, OOV_ID, SPLITS
from trainer.data.splits import TEST, TRAIN, VAL, assign_splits, file_key, time_splits
from trainer.data.transforms import INTEGER_TOKEN_RULE, criteo_integer_token, log_dense
from trainer.data.vocabulary import TokenCounts, VocabularyLookup
from trainer.data.writer import make_table
from trainer.errors import UserError

BAD_ROW_POLICIES = ("fail", "skip")
MAX_BAD_ROW_EXAMPLES = 5
TOKEN_TRANSFORMS = {  # what _Numbers does, for the dataset recipe
    "criteo_log": f"{INTEGER_TOKEN_RULE} (integers), empty -> missing id",
    "buckets": "index of the first boundary > v (0 .. len(boundaries)), empty -> missing id",
}
DENSE_TRANSFORMS = {"log1p": "log1p(max(v, 0)), empty -> 0", "identity": "v, empty -> 0"}
_INTEGER_PATTERN = r"^-?[0-9]{1,18}$"  # at most 18 digits: always fits int64
_NUMBER_PATTERN = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


@dataclass
class _BadRows:
    """Bad rows seen so far: their count and the first few, as ``file:line`` and reason."""

    count: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)


def _hash_keys(chunk: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """(present, uint64 view of the present values) when every value of a binary chunk is 8 bytes long, else None."""
    offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32, count=len(chunk) + 1, offset=4 * chunk.offset)
    lengths = np.diff(offsets)
    present = lengths == 8
    if not np.all((lengths | 8) == 8) or np.count_nonzero(present) != len(chunk) - chunk.null_count:
        return None
    data = chunk.buffers()[2] or pa.py_buffer(b"")  # an all-null chunk may have no data buffer
    return present, np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]].view(np.uint64)


def _encode(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dictionary-encode a binary column: (int32 indices, dictionary); a null has index ``len(dictionary)``.

    When every value is 8 bytes long (Criteo's hex hashes, many Avazu ids) the
    values are hashed as uint64 views of their bytes, twice as fast as bytes;
    the result is the same.
    """
    if len(column) == 0:
        return np.zeros(0, dtype=np.int32), pa.array([], pa.binary())
    keys = []
    for chunk in column.chunks:
        keys.append(_hash_keys(chunk))
        if keys[-1] is None:
            break
    if keys[-1] is None:
        encoded = pc.dictionary_encode(column)
        dictionary = encoded.chunk(0).dictionary  # every chunk holds the same, final dictionary
        indices = pa.chunked_array([c.indices for c in encoded.chunks], pa.int32()).combine_chunks()
        return indices.fill_null(len(dictionary)).to_numpy(), dictionary
    encoded = pc.dictionary_encode(pa.chunked_array([pa.array(k) for _, k in keys], pa.uint64()))
    # every chunk holds the same, final dictionary; a column all null here may come back with no chunk
    found = encoded.chunk(0).dictionary.to_numpy() if encoded.num_chunks else np.zeros(0, dtype=np.uint64)
    indices = np.full(len(column), len(found), dtype=np.int32)
    indices[np.concatenate([p for p, _ in keys])] = pa.chunked_array(
        [c.indices for c in encoded.chunks], pa.int32()
    ).to_numpy()
    offsets = pa.py_buffer(np.arange(0, 8 * len(found) + 1, 8, dtype=np.int32))
    return indices, pa.Array.from_buffers(pa.binary(), len(found), [None, offsets, pa.py_buffer(found)])


def _bools(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)


def _with_null(dictionary: pa.Array) -> pa.Array:
    """The dictionary with a trailing null entry: the index of a missing value."""
    return pa.concat_arrays([dictionary, pa.nulls(1, dictionary.type)])


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) or pa.types.is_large_string(t)


def _as_binary(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A Parquet column's values as token bytes: text as is, numbers as their decimal text."""
    if pa.types.is_binary(column.type):
        return column
    if pa.types.is_boolean(column.type):
        column = column.cast(pa.int8())
    try:
        return column.cast(pa.string()).cast(pa.binary())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        raise UserError(f"a column of type {column.type} cannot be read as tokens") from None


def check_types(spec: DatasetSpec, schema: pa.Schema, where: str) -> None:
    """A Parquet file's column types against the spec: a clear error naming the column and what it needs."""
    for c in spec.columns:
        if c.name not in schema.names or c.type == "ignore":
            continue
        t = schema.field(c.name).type
        listed = pa.types.is_list(t) or pa.types.is_large_list(t)
        scalar = _is_text(t) or pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)
        if c.type == "multi_hot":
            ok = listed and not pa.types.is_nested(t.value_type) or (_is_text(t) and c.separator is not None)
            need = "a list column (or text with a separator)"
        elif c.type == "numeric":
            ok, need = _is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t), "numbers or text"
        else:
            ok, need = scalar, "text, integers or booleans"
        if not ok:
            raise UserError(f"{where}: column {c.name} is {t}; a {c.type} column needs {need}")


def _encode_tokens(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """``_encode`` of any column as token bytes: text directly; other types (Parquet numbers)
    dictionary-encoded in their own type, then only the distinct values turned into text."""
    if _is_text(column.type):
        return _encode(_as_binary(column))
    encoded = pc.dictionary_encode(column.combine_chunks() if column.num_chunks != 1 else column.chunk(0))
    dictionary = encoded.dictionary
    return encoded.indices.fill_null(len(dictionary)).to_numpy().astype(np.int32), _as_binary(dictionary)


def _list_parts(column: pa.ChunkedArray, separator: str | None) -> tuple[np.ndarray, pa.ChunkedArray]:
    """A multi-hot column -> (lengths int64 (N,), flat values): a text value cut at ``separator``
    (empty pieces dropped) or a list column (null entries dropped); a missing value has no ids."""
    if separator is not None and not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        column = pc.split_pattern(_as_binary(column), pattern=separator)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise UserError(f"a multi_hot column without a separator must be a list column, not {column.type}")
    lengths = pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int64)
    values = pa.chunked_array([c.flatten() for c in column.chunks], column.type.value_type)
    keep = pc.is_valid(values)
    if _is_text(values.type):
        keep = pc.and_(keep, pc.greater(pc.binary_length(values), 0))
    if values.null_count or _is_text(values.type) and pc.all(keep).as_py() is False:
        row = np.repeat(np.arange(len(lengths)), lengths)
        lengths = np.bincount(row[_bools(keep)], minlength=len(lengths)).astype(np.int64)
        values = values.filter(keep)
    return lengths, values


def _truncate(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(lengths cut at max_length, mask of the flat values kept or None when all are)."""
    if lengths.size == 0 or lengths.max(initial=0) <= max_length:
        return lengths, None
    starts = np.cumsum(lengths) - lengths
    rank = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    return np.minimum(lengths, max_length), rank < max_length


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


@dataclass
class _Numbers:
    """A numeric column, dictionary-encoded: the transforms run on its distinct values only."""

    indices: np.ndarray  # per row; len(values) = missing
    values: np.ndarray  # int64 (integers) or float64 per dictionary entry (0 where not a number)
    ok: np.ndarray  # per dictionary entry: is a number (an integer for criteo_log)

    @classmethod
    def parse(cls, column: pa.ChunkedArray, integer: bool, indices_dictionary: tuple[np.ndarray, pa.Array] | None) -> "_Numbers":
        """From text (``indices_dictionary``: the encoded binary column) or a Parquet number column."""
        dtype = np.int64 if integer else np.float64
        if indices_dictionary is not None:
            indices, dictionary = indices_dictionary
            ok = _bools(pc.match_substring_regex(dictionary, _INTEGER_PATTERN if integer else _NUMBER_PATTERN))
            values = np.zeros(len(dictionary), dtype=dtype)
            values[ok] = dictionary.filter(ok).cast(pa.string()).cast(pa.int64() if integer else pa.float64()).to_numpy()
            return cls(indices, values, ok)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise UserError(f"a numeric column must hold numbers or text, not {column.type}")
        encoded = pc.dictionary_encode(column).combine_chunks()
        dictionary = encoded.dictionary.to_numpy(zero_copy_only=False).astype(np.float64)
        finite = np.isfinite(dictionary)
        ok = finite & (dictionary == np.round(dictionary)) if integer else finite
        values = np.where(ok, dictionary, 0).astype(dtype)
        return cls(encoded.indices.fill_null(len(dictionary)).to_numpy().astype(np.int32), values, ok)

    def row_ok(self) -> np.ndarray:
        return np.append(self.ok, True)[self.indices]

    def dense(self, rows: np.ndarray, how: str) -> np.ndarray:
        """``how`` (log1p | identity) of ``rows`` (missing -> 0), float32."""
        out = log_dense(self.values[:, None])[:, 0] if how == "log1p" else self.values.astype(np.float32)
        return np.append(out, np.float32(0))[self.indices[rows]]

    def tokens(self, rows: np.ndarray, column: ColumnSpec) -> tuple[np.ndarray, pa.Array]:
        """(token index of ``rows``, token dictionary as text bytes): ``criteo_log`` or ``buckets`` of the values."""
        if column.token == "criteo_log":
            transformed = criteo_integer_token(self.values[self.ok])
        else:
            transformed = np.searchsorted(np.asarray(column.boundaries, dtype=np.float64), self.values[self.ok], side="right")
        tokens, token_of_entry = np.unique(transformed, return_inverse=True)
        remap = np.zeros(len(self.values) + 1, dtype=np.int32)
        remap[np.flatnonzero(self.ok)] = token_of_entry
        remap[-1] = len(tokens)  # missing
        return remap[self.indices[rows]], pa.array(tokens).cast(pa.string()).cast(pa.binary())


def spill_type(column: ColumnSpec) -> pa.DataType:
    """A sparse field's spill column type."""
    single = pa.int32() if column.hash_buckets is not None else pa.dictionary(pa.int32(), pa.binary())
    return pa.list_(single) if column.type == "multi_hot" else single


class Encoder:
    """Pass 1 on one chunk at a time: validate, split, transform, encode, count train tokens.

    ``start_file`` names the input file (``where`` in bad-row messages, ``locate``
    turns a 0-based data row into its position text); ``on_bad_rows`` is one of
    ``BAD_ROW_POLICIES``; the file's split fractions (random and files splits) are
    None for a time split. Train tokens are counted into ``counts`` (default: its own).
    """

    def __init__(
        self, spec: DatasetSpec, on_bad_rows: str, pool: ThreadPoolExecutor, counts: dict[str, TokenCounts] | None = None
    ):
        self.spec, self.on_bad_rows = spec, on_bad_rows
        self.pool = pool  # dictionary-encodes columns in parallel (pyarrow releases the GIL)
        self.fields = spec.fields
        self.numeric = [c for c in spec.columns if c.type == "numeric"]
        self.dense_columns = spec.dense_columns
        self.counts = counts if counts is not None else {c.name: TokenCounts() for c in self.fields if c.hash_buckets is None}
        self.rows_read = 0  # data rows so far, every file, bad ones included
        self.bad = _BadRows()
        self.split_rows = np.zeros(len(SPLITS), dtype=np.int64)
        dense = [("dense", pa.list_(pa.float32(), len(self.dense_columns)))] if self.dense_columns else []
        self.spill_schema = pa.schema(
            [("split", pa.int8()), ("label", pa.int8()), *dense] + [(c.name, spill_type(c)) for c in self.fields]
        )
        self.start_file(0, "", None, lambda row: str(row + 1))

    def start_file(
        self, index: int, where: str, fractions: tuple[float, float, float] | None, locate: Callable[[int], str]
    ) -> None:
        self.file_index, self.where, self.fractions, self.locate = index, where, fractions, locate
        self.file_rows = 0  # data rows of this file so far: the next row's index in the file

    def encode(self, chunk: RawChunk, header_lines: int = 0) -> pa.RecordBatch:
        """The chunk's good rows grouped by split (file order within a split), in the spill layout."""
        table, spec = chunk.table, self.spec
        label = spec.label.name
        text = [label, *(c.name for c in self.fields if c.type != "multi_hot" and c.token is None)]
        text += [c.name for c in self.numeric if _is_text(table.column(c.name).type)]  # numbers as text: parsed
        encoded = dict(zip(text, self.pool.map(lambda name: _encode_tokens(table.column(name)), text)))
        label_idx, label_dict = encoded[label]
        label_ok = np.append(_bools(pc.is_in(label_dict, value_set=pa.array([b"0", b"1"]))), False)[label_idx]
        label_value = np.append(_bools(pc.equal(label_dict, b"1")), False).astype(np.int8)
        numbers = {
            c.name: _Numbers.parse(table.column(c.name), c.token == "criteo_log", encoded.get(c.name))
            for c in self.numeric
        }
        checks = [label_ok, *(n.row_ok() for n in numbers.values())]
        split = None
        if spec.split.kind == "time":
            split, time_ok = self._time_splits(table)
            checks.append(time_ok)
        row_ok = np.logical_and.reduce(checks)

        row_index = self._row_index(table.num_rows, chunk.rejected, header_lines)
        good = np.flatnonzero(row_ok)
        if len(good) < table.num_rows or chunk.rejected:
            self._bad_rows(table, row_index, ~row_ok, chunk.rejected, label_ok, numbers, split is not None)
        if split is None:
            split = assign_splits(file_key(self.file_index, row_index[good]), self.fractions, spec.split.seed)
        else:
            split = split[good]
        order = good[np.argsort(split, kind="stable")]
        per_split = np.bincount(split, minlength=len(SPLITS))
        self.split_rows += per_split

        split_column = np.repeat(np.arange(len(SPLITS), dtype=np.int8), per_split)
        out = [pa.array(split_column), pa.array(label_value[label_idx[order]])]
        if self.dense_columns:
            dense = np.stack([numbers[c.name].dense(order, c.dense) for c in self.dense_columns], axis=1)
            out.append(pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), len(self.dense_columns)))
        train = per_split[TRAIN]
        for c in self.fields:
            if c.type == "multi_hot":
                out.append(self._multi_hot(c, table.column(c.name), order, train))
                continue
            if c.token is not None:
                indices, dictionary = numbers[c.name].tokens(order, c)
            else:
                indices, dictionary = encoded[c.name][0][order], encoded[c.name][1]
            out.append(self._single(c, indices, dictionary, train))
        return pa.RecordBatch.from_arrays(out, schema=self.spill_schema)

    def _single(self, c: ColumnSpec, indices: np.ndarray, dictionary: pa.Array, train: int) -> pa.Array:
        """One id per row: hashed ids, or dictionary indices with the train tokens counted."""
        if c.hash_buckets is not None:
            return pa.array(np.append(bucket_ids(dictionary, c.hash_buckets), np.int32(MISSING_ID))[indices])
        counts = np.bincount(indices[:train], minlength=len(dictionary) + 1)[:-1]
        seen = counts > 0
        self.counts[c.name].add(dictionary.filter(seen), counts[seen])
        return pa.DictionaryArray.from_arrays(pa.array(indices), _with_null(dictionary), safe=False)

    def _multi_hot(self, c: ColumnSpec, column: pa.ChunkedArray, order: np.ndarray, train: int) -> pa.Array:
        """Lists of ids of ``order``'s rows (cut at max_length); the train rows' tokens counted."""
        lengths, values = _list_parts(column, c.separator)
        lengths, keep = _truncate(lengths, c.max_length)
        if keep is not None:
            values = values.filter(pa.array(keep))
        indices, dictionary = _encode_tokens(values)
        lists = pa.ListArray.from_arrays(pa.array(_offsets(lengths)), pa.array(indices)).take(pa.array(order))
        flat = lists.flatten().to_numpy()
        offsets = pa.array(_offsets(pc.list_value_length(lists).to_numpy().astype(np.int64)))
        if c.hash_buckets is not None:
            return pa.ListArray.from_arrays(offsets, pa.array(bucket_ids(dictionary, c.hash_buckets)[flat]))
        counts = np.bincount(flat[: offsets[train].as_py()], minlength=len(dictionary))
        seen = counts > 0
        self.counts[c.name].add(dictionary.filter(seen), counts[seen])
        entries = pa.DictionaryArray.from_arrays(pa.array(flat, pa.int32()), dictionary)
        return pa.ListArray.from_arrays(offsets, entries)

    def _time_splits(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(split per row, whether its time is usable) by the time column and the spec's cut points."""
        t = self.spec.split.time
        assert t is not None
        column = table.column(t.column)
        cuts = (t.train_before, t.val_before)
        if isinstance(cuts[0], (int, float)):
            numbers = _Numbers.parse(column, False, _encode_tokens(column) if _is_text(column.type) else None)
            ok = numbers.row_ok() & (numbers.indices < len(numbers.values))
            times = np.append(numbers.values, np.nan)[numbers.indices]
            return time_splits(times, *cuts), ok
        if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
            times = column.to_numpy()
            bounds = tuple(np.datetime64(c) for c in cuts)
            return time_splits(times, *bounds), ~np.isnat(times)
        values = _as_binary(column)  # text, e.g. ISO timestamps: compared as text

        def before(cut: object) -> np.ndarray:
            return _bools(pc.fill_null(pc.less(values, pa.scalar(str(cut).encode(), pa.binary())), False))

        out = np.full(len(values), TEST, dtype=np.int8)
        out[before(cuts[1])] = VAL
        out[before(cuts[0])] = TRAIN
        return out, _bools(pc.is_valid(values))

    def _row_index(self, parsed: int, rejected: list[tuple[int, str]], header_lines: int) -> np.ndarray:
        """0-based data-row index in the file of each parsed row, counting the rejected rows in between."""
        start = self.file_rows
        skipped = np.array([line - 1 - header_lines for line, _ in rejected], dtype=np.int64)
        # the i-th parsed row has i + (number of rejected rows before it) rows before it in this chunk
        before = np.searchsorted(skipped - start - np.arange(len(skipped)), np.arange(parsed), side="right")
        self.file_rows += parsed + len(rejected)
        self.rows_read += parsed + len(rejected)
        return start + np.arange(parsed, dtype=np.int64) + before

    def _bad_rows(
        self,
        table: pa.Table,
        row_index: np.ndarray,
        bad: np.ndarray,
        rejected: list[tuple[int, str]],
        label_ok: np.ndarray,
        numbers: dict[str, _Numbers],
        timed: bool,
    ) -> None:
        """Count bad rows and describe the first few; raise on the first one unless skipping."""
        positions = np.flatnonzero(bad)
        self.bad.count += len(positions) + len(rejected)
        wanted = 1 if self.on_bad_rows == "fail" else MAX_BAD_ROW_EXAMPLES - len(self.bad.examples)
        if wanted <= 0:
            return
        found = [(line - 1, str(line), reason) for line, reason in rejected[:wanted]]  # text lines
        for p in positions[:wanted]:
            row = int(row_index[p])
            found.append((row, self.locate(row), self._reason(table, int(p), label_ok, numbers, timed)))
        found.sort(key=lambda f: f[0])
        if self.on_bad_rows == "fail":
            _, at, reason = found[0]
            raise UserError(f"{self.where}:{at}: {reason} (pass --on-bad-rows skip to drop bad rows)")
        self.bad.examples += [{"where": f"{self.where}:{at}", "reason": r} for _, at, r in found[:wanted]]

    def _reason(
        self, table: pa.Table, p: int, label_ok: np.ndarray, numbers: dict[str, _Numbers], timed: bool
    ) -> str:
        if all(not column[p].is_valid for column in table.columns):
            return "empty line"
        label = self.spec.label.name
        if not label_ok[p]:
            value = table.column(label)[p].as_py()
            return f"label {_show(value)} is not 0 or 1" if value is not None else "label is empty"
        for name, column in numbers.items():
            if not column.row_ok()[p]:
                kind = "an integer" if next(c for c in self.numeric if c.name == name).token == "criteo_log" else "a number"
                return f"{name} {_show(table.column(name)[p].as_py())} is not {kind}"
        if timed:
            t = self.spec.split.time
            assert t is not None
            value = table.column(t.column)[p].as_py()
            if value is None:
                return f"time column {t.column} is empty"
            return f"time column {t.column} {_show(value)} is not comparable with the cut points {t.train_before!r}, {t.val_before!r}"
        raise AssertionError("row marked bad without a reason")


def _show(value: object) -> str:
    return show_bytes(value) if isinstance(value, bytes) else repr(value)


def map_batches(
    spill: pa.ipc.RecordBatchStreamReader,
    spec: DatasetSpec,
    vocabularies: dict[str, pa.Table],
    piece_rows: int,
    oov: np.ndarray,
) -> Iterator[tuple[str, pa.Table]]:
    """Pass 2: (split, table in the on-disk layout) per spilled chunk and split, in pieces of at most ``piece_rows``.

    Only each chunk's dictionaries are looked up; hashed fields pass through.
    Every piece owns its memory: the writer holds pieces until a row group is
    full, and a view would keep the whole chunk alive. Counts OOV ids into
    ``oov`` (split x field).
    """
    lookups = {name: VocabularyLookup(v) for name, v in vocabularies.items()}
    fields = spec.fields
    for batch in spill:
        bounds = np.searchsorted(batch.column("split").to_numpy(), np.arange(len(SPLITS) + 1))
        # per field: (ids per dictionary entry or None, per-row indices into them or ids, list offsets or None)
        ids: list[tuple[np.ndarray | None, np.ndarray, np.ndarray | None]] = []
        for c in fields:
            column = batch.column(c.name)
            offsets = None
            if c.type == "multi_hot":
                offsets = column.offsets.to_numpy()
                column = column.values
            if c.hash_buckets is not None:
                ids.append((None, column.to_numpy(), offsets))
            else:
                ids.append((lookups[c.name].entry_ids(column), column.indices.to_numpy(), offsets))
        labels = batch.column("label").to_numpy()
        dense = None
        if spec.dense_columns:
            dense = batch.column("dense").flatten().to_numpy().reshape(-1, len(spec.dense_columns))
        for s, split in enumerate(SPLITS):
            for start in range(bounds[s], bounds[s + 1], piece_rows):
                rows = slice(start, min(start + piece_rows, bounds[s + 1]))
                sparse: dict[str, np.ndarray | pa.Array] = {}
                for c, (entry_id, values, offsets) in zip(fields, ids):
                    if offsets is None:
                        sparse[c.name] = values[rows].copy() if entry_id is None else entry_id[values[rows]]
                        oov[s, len(sparse) - 1] += np.count_nonzero(sparse[c.name] == OOV_ID)
                        continue
                    o = offsets[rows.start : rows.stop + 1]
                    flat = values[o[0] : o[-1]].copy() if entry_id is None else entry_id[values[o[0] : o[-1]]]
                    sparse[c.name] = pa.ListArray.from_arrays(pa.array(o - o[0]), pa.array(flat))
                    oov[s, len(sparse) - 1] += np.count_nonzero(flat == OOV_ID)
                yield split, make_table(labels[rows].copy(), sparse, None if dense is None else dense[rows].copy())
