"""Pass 1's per-chunk work, bad rows included, and the spill layout between the passes.

``Encoder``: a ``RawChunk`` -> one spill batch: rows validated (bad rows fail
the run or are counted and dropped), given their split, Criteo integers turned
into tokens and dense values, every field dictionary-encoded, train tokens
counted. ``map_batches``: spill batches -> tables in the on-disk layout.

Spill batch of N rows, grouped by split: ``split``, ``label`` int8 (N,);
``dense`` float32 (N, len(integer_fields)) as a fixed-size list, only with
integer fields; per sparse field a dictionary<int32, binary> column whose last
entry is null (missing).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.data.raw_formats import RawFormat
from trainer.data.raw_reader import RawChunk, show_bytes
from trainer.data.schema import OOV_ID, SPLITS
from trainer.data.splits import TRAIN, assign_splits
from trainer.data.transforms import criteo_integer_token, log_dense
from trainer.data.vocabulary import TokenCounts, entry_ids
from trainer.data.writer import make_table
from trainer.errors import UserError

BAD_ROW_POLICIES = ("fail", "skip")
MAX_BAD_ROW_EXAMPLES = 5
INTEGER_TRANSFORM = (  # what _Integers does, for the dataset recipe
    "token: v if v <= 2 else floor(ln(v)^2), empty -> missing id; dense: log1p(max(v, 0)), empty -> 0"
)
_INTEGER_PATTERN = r"^-?[0-9]{1,18}$"  # at most 18 digits: always fits int64


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


@dataclass
class _Integers:
    """An integer column, dictionary-encoded: the transforms run on its distinct values only."""

    indices: np.ndarray  # per row; len(values) = missing
    values: np.ndarray  # int64 per dictionary entry (0 where not an integer)
    ok: np.ndarray  # per dictionary entry: is an integer

    @classmethod
    def parse(cls, indices: np.ndarray, dictionary: pa.Array) -> "_Integers":
        ok = _bools(pc.match_substring_regex(dictionary, _INTEGER_PATTERN))
        values = np.zeros(len(dictionary), dtype=np.int64)
        values[ok] = dictionary.filter(ok).cast(pa.int64()).to_numpy()
        return cls(indices, values, ok)

    def row_ok(self) -> np.ndarray:
        return np.append(self.ok, True)[self.indices]

    def dense(self, rows: np.ndarray) -> np.ndarray:
        """``log_dense`` of ``rows`` (missing -> 0), float32."""
        return np.append(log_dense(self.values[:, None])[:, 0], np.float32(0))[self.indices[rows]]

    def tokens(self, rows: np.ndarray) -> tuple[np.ndarray, pa.Array]:
        """(token index of ``rows``, token dictionary): ``criteo_integer_token`` of the values, as text bytes."""
        tokens, token_of_entry = np.unique(criteo_integer_token(self.values[self.ok]), return_inverse=True)
        remap = np.zeros(len(self.values) + 1, dtype=np.int32)
        remap[np.flatnonzero(self.ok)] = token_of_entry
        remap[-1] = len(tokens)  # missing
        return remap[self.indices[rows]], pa.array(tokens).cast(pa.string()).cast(pa.binary())


class Encoder:
    """Pass 1 on one chunk at a time: validate, split, transform, encode, count train tokens.

    ``where`` names the raw file in bad-row messages; ``on_bad_rows`` is one of ``BAD_ROW_POLICIES``.
    """

    def __init__(
        self,
        fmt: RawFormat,
        where: str,
        fractions: tuple[float, float, float],
        seed: int,
        on_bad_rows: str,
        pool: ThreadPoolExecutor,
    ):
        self.fmt, self.where, self.fractions, self.seed, self.on_bad_rows = fmt, where, fractions, seed, on_bad_rows
        self.pool = pool  # dictionary-encodes columns in parallel (pyarrow releases the GIL)
        self.header_lines = 1 if fmt.has_header else 0
        self.rows_read = 0  # data rows so far, bad ones included: the next row's index
        self.bad = _BadRows()
        self.split_rows = np.zeros(len(SPLITS), dtype=np.int64)
        self.counts = {name: TokenCounts() for name in fmt.sparse_fields}
        dense = [("dense", pa.list_(pa.float32(), len(fmt.integer_fields)))] if fmt.integer_fields else []
        self.spill_schema = pa.schema(
            [("split", pa.int8()), ("label", pa.int8()), *dense]
            + [(name, pa.dictionary(pa.int32(), pa.binary())) for name in fmt.sparse_fields]
        )

    def encode(self, chunk: RawChunk) -> pa.RecordBatch:
        """The chunk's good rows grouped by split (file order within a split), in the spill layout."""
        table, fmt = chunk.table, self.fmt
        names = [fmt.label, *fmt.sparse_fields]
        encoded = dict(zip(names, self.pool.map(lambda name: _encode(table.column(name)), names)))
        label_idx, label_dict = encoded[fmt.label]
        label_ok = np.append(_bools(pc.is_in(label_dict, value_set=pa.array([b"0", b"1"]))), False)[label_idx]
        label_value = np.append(_bools(pc.equal(label_dict, b"1")), False).astype(np.int8)
        integers = {name: _Integers.parse(*encoded[name]) for name in fmt.integer_fields}
        row_ok = np.logical_and.reduce([label_ok, *(i.row_ok() for i in integers.values())])

        row_index = self._row_index(table.num_rows, chunk.rejected)
        good = np.flatnonzero(row_ok)
        if len(good) < table.num_rows or chunk.rejected:
            self._bad_rows(table, row_index, ~row_ok, chunk.rejected, label_ok, integers)
        split = assign_splits(row_index[good], self.fractions, self.seed)
        order = good[np.argsort(split, kind="stable")]
        per_split = np.bincount(split, minlength=len(SPLITS))
        self.split_rows += per_split

        split_column = np.repeat(np.arange(len(SPLITS), dtype=np.int8), per_split)
        columns = [pa.array(split_column), pa.array(label_value[label_idx[order]])]
        if integers:
            dense = np.stack([i.dense(order) for i in integers.values()], axis=1)
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), len(integers)))
        sparse = {name: i.tokens(order) for name, i in integers.items()}
        sparse |= {name: (encoded[name][0][order], encoded[name][1]) for name in fmt.categorical_fields}
        for name in fmt.sparse_fields:
            indices, dictionary = sparse[name]
            counts = np.bincount(indices[: per_split[TRAIN]], minlength=len(dictionary) + 1)[:-1]
            seen = counts > 0
            self.counts[name].add(dictionary.filter(seen), counts[seen])
            columns.append(pa.DictionaryArray.from_arrays(pa.array(indices), _with_null(dictionary), safe=False))
        return pa.RecordBatch.from_arrays(columns, schema=self.spill_schema)

    def _row_index(self, parsed: int, rejected: list[tuple[int, str]]) -> np.ndarray:
        """0-based data-row index of each parsed row, counting the rejected rows in between."""
        start = self.rows_read
        skipped = np.array([line - 1 - self.header_lines for line, _ in rejected], dtype=np.int64)
        # the i-th parsed row has i + (number of rejected rows before it) rows before it in this chunk
        before = np.searchsorted(skipped - start - np.arange(len(skipped)), np.arange(parsed), side="right")
        self.rows_read += parsed + len(rejected)
        return start + np.arange(parsed, dtype=np.int64) + before

    def _bad_rows(
        self,
        table: pa.Table,
        row_index: np.ndarray,
        bad: np.ndarray,
        rejected: list[tuple[int, str]],
        label_ok: np.ndarray,
        integers: dict[str, _Integers],
    ) -> None:
        """Count bad rows and describe the first few; raise on the first one unless skipping."""
        positions = np.flatnonzero(bad)
        self.bad.count += len(positions) + len(rejected)
        wanted = 1 if self.on_bad_rows == "fail" else MAX_BAD_ROW_EXAMPLES - len(self.bad.examples)
        if wanted <= 0:
            return
        found = list(rejected[:wanted])
        for p in positions[:wanted]:
            line = int(row_index[p]) + 1 + self.header_lines
            found.append((line, self._reason(table, int(p), label_ok, integers)))
        found.sort()
        if self.on_bad_rows == "fail":
            line, reason = found[0]
            raise UserError(f"{self.where}:{line}: {reason} (pass --on-bad-rows skip to drop bad rows)")
        self.bad.examples += [{"where": f"{self.where}:{line}", "reason": r} for line, r in found[:wanted]]

    def _reason(self, table: pa.Table, p: int, label_ok: np.ndarray, integers: dict[str, _Integers]) -> str:
        if all(not column[p].is_valid for column in table.columns):
            return "empty line"
        if not label_ok[p]:
            label = table.column(self.fmt.label)[p].as_py()
            return f"label {show_bytes(label)} is not 0 or 1" if label is not None else "label is empty"
        for name, column in integers.items():
            if not column.row_ok()[p]:
                return f"{name} {show_bytes(table.column(name)[p].as_py())} is not an integer"
        raise AssertionError("row marked bad without a reason")


def map_batches(
    spill: pa.ipc.RecordBatchStreamReader,
    fmt: RawFormat,
    vocabularies: dict[str, pa.Table],
    piece_rows: int,
    oov: np.ndarray,
) -> Iterator[tuple[str, pa.Table]]:
    """Pass 2: (split, table in the on-disk layout) per spilled chunk and split, in pieces of at most ``piece_rows``.

    Only each chunk's dictionaries are looked up. Every piece owns its memory:
    the writer holds pieces until a row group is full, and a view would keep
    the whole chunk alive. Counts OOV ids into ``oov`` (split x field).
    """
    lookups = {name: (v["token"].combine_chunks(), v["id"].combine_chunks()) for name, v in vocabularies.items()}
    for batch in spill:
        bounds = np.searchsorted(batch.column("split").to_numpy(), np.arange(len(SPLITS) + 1))
        fields = [(name, batch.column(name)) for name in fmt.sparse_fields]
        fields = [(name, entry_ids(column, *lookups[name]), column.indices.to_numpy()) for name, column in fields]
        labels = batch.column("label").to_numpy()
        dense = None
        if fmt.integer_fields:
            dense = batch.column("dense").flatten().to_numpy().reshape(-1, len(fmt.integer_fields))
        for s, split in enumerate(SPLITS):
            for start in range(bounds[s], bounds[s + 1], piece_rows):
                rows = slice(start, min(start + piece_rows, bounds[s + 1]))
                sparse = {name: entry_id[indices[rows]] for name, entry_id, indices in fields}
                oov[s] += [np.count_nonzero(ids == OOV_ID) for ids in sparse.values()]
                yield split, make_table(labels[rows].copy(), sparse, None if dense is None else dense[rows].copy())
