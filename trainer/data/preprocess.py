"""Raw Criteo / Avazu logs -> the prepared parquet dataset (layout: ``trainer.data.schema``).

Two streaming passes; memory is bounded by the number of distinct tokens, not
by the file size:

1. A background thread parses the raw file (pyarrow CSV, paths and URLs through
   fsspec, compression inferred) while the caller validates each chunk, gives
   every data row its split by row index (``assign_splits``), turns Criteo
   integers into tokens (``criteo_integer_token``) and dense values
   (``log_dense``), dictionary-encodes every field, counts the tokens of train
   rows, and spills the encoded chunk (rows grouped by split) to an Arrow
   stream inside the temporary output directory.
2. Each field's vocabulary is built from the train counts (min-count, then ids by
   descending count, ties by token); the spilled chunks are mapped to ids (only
   each chunk's dictionary is looked up) in a background thread while
   ``DatasetWriter`` writes the splits.

Everything is written inside ``atomic_directory``: a failed run leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import contextlib
import queue
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from trainer.data.raw_formats import RawFormat, raw_format
from trainer.data.schema import MISSING_ID, OOV_ID, SPLITS, DatasetSchema, SparseField, SplitInfo, write_schema
from trainer.data.splits import TRAIN, assign_splits, parse_split
from trainer.storage import atomic_directory, filesystem, join, require_exists
from trainer.data.transforms import criteo_integer_token, log_dense
from trainer.data.writer import DatasetWriter, make_table
from trainer.errors import UserError, run_cli

BAD_ROW_POLICIES = ("fail", "skip")
MAX_BAD_ROW_EXAMPLES = 5
INTEGER_TRANSFORM = (
    "token: v if v <= 2 else floor(ln(v)^2), empty -> missing id; dense: log1p(max(v, 0)), empty -> 0"
)
_INTEGER_PATTERN = r"^-?[0-9]{1,18}$"  # at most 18 digits: always fits int64
_SPILL_FILE = "_spill.arrow"

T = TypeVar("T")


@dataclass(frozen=True)
class PreprocessConfig:
    """What to read, where to write, and the recipe's knobs."""

    dataset: str  # "criteo" | "avazu"
    input: str  # path or fsspec URL; .gz/.bz2/... decompressed by extension
    output: str  # dataset directory (path or URL) to create
    min_count: int | None = None  # None: the dataset's default (Criteo 10, Avazu 4)
    split: str = "8,1,1"  # train,val,test proportions
    seed: int = 0
    on_bad_rows: str = "fail"  # "fail" | "skip"
    files_per_split: int = 4
    overwrite: bool = False
    block_size: int = 2 << 20  # bytes per CSV parse block
    chunk_rows: int = 1 << 17  # rows validated, encoded and spilled together
    progress: bool = True  # tqdm bars on stderr


@dataclass
class _BadRows:
    """Bad rows seen so far: their count and the first few, as ``file:line`` and reason."""

    count: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)


class _TokenCounts:
    """Running train counts of one field's tokens, merged by hash group-by as they grow."""

    def __init__(self) -> None:
        self._tables: list[pa.Table] = []
        self._pending = 0  # rows added since the last merge
        self._merged = 0  # rows after the last merge

    def add(self, tokens: pa.Array, counts: np.ndarray) -> None:
        self._tables.append(pa.table({"token": tokens, "count": pa.array(counts, pa.int64())}))
        self._pending += len(tokens)
        if self._pending > max(self._merged, 1 << 18):  # doubling: merging costs O(distinct tokens) amortised
            self._merge()

    def _merge(self) -> None:
        if not self._tables:
            self._tables = [pa.table({"token": pa.array([], pa.binary()), "count": pa.array([], pa.int64())})]
        merged = pa.concat_tables(self._tables).group_by("token").aggregate([("count", "sum")])
        self._tables = [pa.table({"token": merged["token"], "count": merged["count_sum"]})]
        self._merged, self._pending = merged.num_rows, 0

    def table(self) -> pa.Table:
        """(token, count) of every token seen, in no particular order."""
        self._merge()
        return self._tables[0]


def _prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Iterate the generator ``items`` in a background thread, up to ``depth`` items ahead.

    pyarrow and numpy release the GIL, so parsing (or writing) overlaps the
    caller's work on the second core. Exceptions re-raise in the caller; closing
    this generator stops the thread and closes ``items``.
    """
    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            with contextlib.closing(items):  # type: ignore[type-var]
                for item in items:
                    if not put((True, item)):
                        return
        except BaseException as e:  # handed to the caller
            put((False, e))
            return
        put((False, None))

    thread = threading.Thread(target=produce, name="preprocess-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()


@dataclass
class _RawChunk:
    """Parsed rows (every column binary, empty -> null) and the rows pyarrow rejected."""

    table: pa.Table  # chunked as parsed: chunks are never concatenated
    rejected: list[tuple[int, int]]  # (line, number of columns) of rows with the wrong column count


def _read_chunks(config: PreprocessConfig, fmt: RawFormat, file: Any) -> Iterator[_RawChunk]:
    """Parse the raw file into chunks of about ``chunk_rows`` rows.

    Single-threaded pyarrow parsing (it runs beside the caller through
    ``_prefetch``) so that rejected rows come with their line number.
    """
    rejected: list[tuple[int, int]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        rejected.append((row.number, row.actual_columns))
        return "skip"

    read_options = pacsv.ReadOptions(
        column_names=None if fmt.has_header else list(fmt.columns), use_threads=False, block_size=config.block_size
    )
    parse_options = pacsv.ParseOptions(
        delimiter=fmt.delimiter,
        quote_char='"' if fmt.quoted else False,
        ignore_empty_lines=False,  # keeps line numbers exact; an empty line is a bad row
        invalid_row_handler=on_invalid,
    )
    convert_options = pacsv.ConvertOptions(
        column_types={c: pa.binary() for c in fmt.columns},  # bytes: no UTF-8 check (only vocabularies are text)
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
    )
    try:
        reader = pacsv.open_csv(
            file, read_options=read_options, parse_options=parse_options, convert_options=convert_options
        )
        if fmt.has_header and reader.schema.names != list(fmt.columns):
            raise UserError(
                f"{config.input}:1: header is not the {fmt.name} layout: expected "
                f"{','.join(fmt.columns)}, got {','.join(reader.schema.names)}"
            )
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in reader:
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= config.chunk_rows:
                yield _RawChunk(pa.Table.from_batches(pending), rejected)
                pending, pending_rows, rejected = [], 0, []
        if pending or rejected:
            yield _RawChunk(pa.Table.from_batches(pending, schema=reader.schema), rejected)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            raise UserError(f"{config.input}: empty file") from None
        raise UserError(f"{config.input}: cannot parse: {e}") from None
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{config.input}: cannot read ({type(e).__name__}: {e}); truncated or corrupt file?") from None


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
    found = encoded.chunk(0).dictionary.to_numpy()
    indices = np.full(len(column), len(found), dtype=np.int32)
    indices[np.concatenate([p for p, _ in keys])] = pa.chunked_array(
        [c.indices for c in encoded.chunks], pa.int32()
    ).to_numpy()
    offsets = pa.py_buffer(np.arange(0, 8 * len(found) + 1, 8, dtype=np.int32))
    return indices, pa.Array.from_buffers(pa.binary(), len(found), [None, offsets, pa.py_buffer(found)])


def _bools(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


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


class _Encoder:
    """Pass 1 on one chunk at a time: validate, split, transform, encode, count train tokens."""

    def __init__(
        self, config: PreprocessConfig, fmt: RawFormat, fractions: tuple[float, float, float], pool: ThreadPoolExecutor
    ):
        self.config, self.fmt, self.fractions = config, fmt, fractions
        self.pool = pool  # dictionary-encodes columns in parallel (pyarrow releases the GIL)
        self.header_lines = 1 if fmt.has_header else 0
        self.rows_read = 0  # data rows so far, bad ones included: the next row's index
        self.bad = _BadRows()
        self.split_rows = np.zeros(len(SPLITS), dtype=np.int64)
        self.counts = {name: _TokenCounts() for name in fmt.sparse_fields}
        dense = [("dense", pa.list_(pa.float32(), len(fmt.integer_fields)))] if fmt.integer_fields else []
        self.spill_schema = pa.schema(
            [("split", pa.int8()), ("label", pa.int8()), *dense]
            + [(name, pa.dictionary(pa.int32(), pa.binary())) for name in fmt.sparse_fields]
        )

    def encode(self, chunk: _RawChunk) -> pa.RecordBatch:
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
        split = assign_splits(row_index[good], self.fractions, self.config.seed)
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

    def _row_index(self, parsed: int, rejected: list[tuple[int, int]]) -> np.ndarray:
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
        rejected: list[tuple[int, int]],
        label_ok: np.ndarray,
        integers: dict[str, _Integers],
    ) -> None:
        """Count bad rows and describe the first few; raise on the first one unless skipping."""
        positions = np.flatnonzero(bad)
        self.bad.count += len(positions) + len(rejected)
        wanted = 1 if self.config.on_bad_rows == "fail" else MAX_BAD_ROW_EXAMPLES - len(self.bad.examples)
        if wanted <= 0:
            return
        expected = len(self.fmt.columns)
        found = [(line, f"expected {expected} columns, got {got}") for line, got in rejected[:wanted]]
        for p in positions[:wanted]:
            line = int(row_index[p]) + 1 + self.header_lines
            found.append((line, self._reason(table, int(p), label_ok, integers)))
        found.sort()
        if self.config.on_bad_rows == "fail":
            line, reason = found[0]
            raise UserError(f"{self.config.input}:{line}: {reason} (pass --on-bad-rows skip to drop bad rows)")
        self.bad.examples += [{"where": f"{self.config.input}:{line}", "reason": r} for line, r in found[:wanted]]

    def _reason(self, table: pa.Table, p: int, label_ok: np.ndarray, integers: dict[str, _Integers]) -> str:
        if all(not column[p].is_valid for column in table.columns):
            return "empty line"
        if not label_ok[p]:
            label = _text(table.column(self.fmt.label)[p].as_py())
            return f"label {label!r} is not 0 or 1" if label is not None else "label is empty"
        for name, column in integers.items():
            if not column.row_ok()[p]:
                return f"{name} {_text(table.column(name)[p].as_py())!r} is not an integer"
        raise AssertionError("row marked bad without a reason")


def _vocabulary(counts: pa.Table, min_count: int) -> pa.Table:
    """Tokens with train count >= min_count; ids from 2 by descending count, ties by token."""
    kept = counts.filter(pc.greater_equal(counts["count"], min_count))
    kept = kept.sort_by([("count", "descending"), ("token", "ascending")])
    first = MISSING_ID + 1
    ids = pa.array(np.arange(first, first + kept.num_rows, dtype=np.int32))
    return pa.table({"token": kept["token"], "id": ids, "count": kept["count"]})


def _entry_ids(column: pa.DictionaryArray, tokens: pa.Array, ids: pa.Array) -> np.ndarray:
    """The id of each dictionary entry of a spilled field, given its vocabulary (tokens, ids)."""
    dictionary = column.dictionary
    known = ids.take(pc.index_in(dictionary, value_set=tokens)).fill_null(OOV_ID)
    return pc.if_else(dictionary.is_null(), pa.scalar(MISSING_ID, pa.int32()), known).to_numpy()


def _map_batches(
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
        fields = [(name, _entry_ids(column, *lookups[name]), column.indices.to_numpy()) for name, column in fields]
        labels = batch.column("label").to_numpy()
        dense = None
        if fmt.integer_fields:
            dense = batch.column("dense").flatten().to_numpy().reshape(-1, len(fmt.integer_fields))
        for s, split in enumerate(SPLITS):
            for start in range(bounds[s], bounds[s + 1], piece_rows):
                rows = slice(start, min(start + piece_rows, bounds[s + 1]))
                sparse = {name: entry_ids[indices[rows]] for name, entry_ids, indices in fields}
                oov[s] += [np.count_nonzero(ids == OOV_ID) for ids in sparse.values()]
                yield split, make_table(labels[rows].copy(), sparse, None if dense is None else dense[rows].copy())


def _write_vocabulary(root: str, name: str, vocabulary: pa.Table, where: str) -> None:
    """``vocab/NAME.parquet``: token (text), id, count."""
    try:
        vocabulary = vocabulary.set_column(0, "token", vocabulary["token"].cast(pa.string()))
    except pa.ArrowInvalid:
        raise UserError(f"{where}: field {name} has frequent values that are not UTF-8 text") from None
    fs, path = filesystem(join(root, "vocab", f"{name}.parquet"))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(vocabulary, f, compression="zstd")


def _progress(config: PreprocessConfig, desc: str, total: int | None = None) -> tqdm:
    return tqdm(desc=desc, total=total, unit=" rows", unit_scale=True, mininterval=1.0, disable=not config.progress)


def _check(config: PreprocessConfig) -> tuple[RawFormat, int, tuple[float, float, float]]:
    fmt = raw_format(config.dataset)
    min_count = fmt.default_min_count if config.min_count is None else config.min_count
    if min_count < 1:
        raise UserError(f"--min-count must be >= 1, got {min_count}")
    if config.on_bad_rows not in BAD_ROW_POLICIES:
        raise UserError(f"--on-bad-rows must be one of {list(BAD_ROW_POLICIES)}, got {config.on_bad_rows!r}")
    if config.files_per_split < 1:
        raise UserError(f"--files-per-split must be >= 1, got {config.files_per_split}")
    return fmt, min_count, parse_split(config.split)


@contextlib.contextmanager
def _open_raw(url: str) -> Iterator[Any]:
    """The raw file as a binary stream, decompressed by its extension (fsspec's ``compression="infer"``)."""
    try:
        file = fsspec.open(url, "rb", compression="infer").open()
    except (OSError, ValueError) as e:
        raise UserError(f"{url}: cannot open ({type(e).__name__}: {e})") from None
    try:
        yield file
    finally:
        file.close()


def _pass1(config: PreprocessConfig, fmt: RawFormat, fractions: tuple[float, float, float], spill_url: str) -> _Encoder:
    """Read, validate, encode and count; the encoded chunks go to ``spill_url``. Returns the encoder's tallies."""
    spill_fs, spill_path = filesystem(spill_url)
    with ThreadPoolExecutor(2, thread_name_prefix="preprocess-encode") as pool:
        encoder = _Encoder(config, fmt, fractions, pool)
        with (
            _open_raw(config.input) as raw,
            contextlib.closing(_prefetch(_read_chunks(config, fmt, raw))) as chunks,
            spill_fs.open(spill_path, "wb") as spill_file,
            pa.ipc.new_stream(spill_file, encoder.spill_schema) as spill,
            _progress(config, "pass 1/2: read") as bar,
        ):
            for chunk in chunks:
                spill.write_batch(encoder.encode(chunk))
                bar.update(chunk.table.num_rows + len(chunk.rejected))
    return encoder


def _pass2(
    config: PreprocessConfig, fmt: RawFormat, vocabularies: dict[str, pa.Table], spill_url: str, root: str, rows: int
) -> tuple[dict[str, SplitInfo], np.ndarray]:
    """Map the spilled chunks to ids and write the splits; returns the split infos and OOV counts (split x field)."""
    spill_fs, spill_path = filesystem(spill_url)
    oov = np.zeros((len(SPLITS), len(fmt.sparse_fields)), dtype=np.int64)
    writer = DatasetWriter(root, files_per_split=config.files_per_split)
    with (
        spill_fs.open(spill_path, "rb") as spill_file,
        contextlib.closing(
            _prefetch(_map_batches(pa.ipc.open_stream(spill_file), fmt, vocabularies, writer.row_group_rows, oov))
        ) as tables,
        _progress(config, "pass 2/2: write", total=rows) as bar,
    ):
        for split, table in tables:
            writer.write(split, table)
            bar.update(table.num_rows)
    splits = writer.close()
    spill_fs.rm(spill_path)
    return splits, oov


def preprocess(config: PreprocessConfig) -> DatasetSchema:
    """Turn the raw file ``config.input`` into a prepared dataset at ``config.output``."""
    fmt, min_count, fractions = _check(config)
    require_exists(config.input)
    with atomic_directory(config.output, overwrite=config.overwrite) as root:
        spill_url = join(root, _SPILL_FILE)
        encoder = _pass1(config, fmt, fractions, spill_url)
        kept = int(encoder.split_rows.sum())
        if kept == 0:
            raise UserError(f"{config.input}: no usable data rows ({encoder.rows_read} read, {encoder.bad.count} bad)")
        if encoder.split_rows[TRAIN] == 0:
            raise UserError(f"{config.input}: no row landed in train ({kept} rows); use more rows or another --split")

        vocabularies = {name: _vocabulary(encoder.counts[name].table(), min_count) for name in fmt.sparse_fields}
        for name, vocabulary in vocabularies.items():
            _write_vocabulary(root, name, vocabulary, config.input)
        splits, oov = _pass2(config, fmt, vocabularies, spill_url, root, kept)

        rows = {split: int(n) for split, n in zip(SPLITS, encoder.split_rows)}
        schema = DatasetSchema(
            dataset=fmt.name,
            sparse_fields=[SparseField(name, vocabularies[name].num_rows + MISSING_ID + 1) for name in vocabularies],
            dense_fields=list(fmt.integer_fields),
            splits=splits,
            recipe={
                "source": "trainer.data.preprocess",
                "dataset": fmt.name,
                "input": config.input,
                "min_count": min_count,
                "vocabulary_from": "train",
                "split": list(fractions),
                "seed": config.seed,
                "integer_transform": INTEGER_TRANSFORM if fmt.integer_fields else None,
                "rows_read": encoder.rows_read,
                "bad_rows": {
                    "policy": config.on_bad_rows,
                    "count": encoder.bad.count,
                    "examples": encoder.bad.examples,
                },
                "rows": rows,
                "oov_rate": {
                    split: {name: float(oov[s, f] / max(rows[split], 1)) for f, name in enumerate(fmt.sparse_fields)}
                    for s, split in enumerate(SPLITS)
                },
                **_synthetic_oracle(config),
            },
        )
        write_schema(root, schema)
    return schema


def _synthetic_oracle(config: PreprocessConfig) -> dict[str, Any]:
    """The oracle metrics of synthetic input (``INPUT.oracle.json`` beside it), when they
    describe exactly the splits made here (same split fractions and seed): the trainer
    reports them beside its own test AUC."""
    fs, path = filesystem(config.input + ".oracle.json")
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        report = json.load(f)
    generated = report.get("config", {})
    same_split = generated.get("split") == config.split or (
        isinstance(generated.get("split"), str) and parse_split(generated["split"]) == parse_split(config.split)
    )
    if not same_split or generated.get("split_seed") != config.seed or "oracle" not in report:
        return {}
    return {"oracle": report["oracle"], "oracle_source": config.input + ".oracle.json"}


def summary(schema: DatasetSchema, output: str, seconds: float) -> str:
    """A few lines for the terminal: rows, speed, bad rows, splits, vocabulary, OOV."""
    r = schema.recipe
    rows, bad = r["rows_read"], r["bad_rows"]
    splits = ", ".join(f"{s} {n:,}" for s, n in r["rows"].items())
    oov = {s: float(np.mean(list(rates.values()))) for s, rates in r["oov_rate"].items()}
    lines = [
        f"preprocessed {schema.dataset} -> {output}",
        f"  {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s); "
        f"bad rows skipped: {bad['count']:,}",
        f"  splits: {splits}",
        f"  {len(schema.sparse_fields)} sparse fields, {sum(f.cardinality for f in schema.sparse_fields):,} ids "
        f"in all (min-count {r['min_count']}), {len(schema.dense_fields)} dense",
        "  OOV rate (mean over fields): " + ", ".join(f"{s} {v:.2%}" for s, v in oov.items()),
    ]
    lines += [f"  bad row {e['where']}: {e['reason']}" for e in bad["examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainer.data.preprocess", description="Turn raw Criteo/Avazu logs into a prepared dataset."
    )
    p.add_argument("--dataset", required=True, help="criteo (TSV, no header) or avazu (CSV with header)")
    p.add_argument("--input", required=True, help="raw file: path or fsspec URL (.gz etc. decompressed)")
    p.add_argument("--output", required=True, help="dataset directory to create: path or fsspec URL")
    p.add_argument(
        "--min-count", type=int, default=None, help="train tokens rarer than this -> OOV (default: criteo 10, avazu 4)"
    )
    p.add_argument("--split", default="8,1,1", help="train,val,test proportions (default 8,1,1)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--on-bad-rows", default="fail", help="fail (default) or skip (count and drop them)")
    p.add_argument("--files-per-split", type=int, default=4, help="parquet files per split (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    config = PreprocessConfig(
        dataset=args.dataset,
        input=args.input,
        output=args.output,
        min_count=args.min_count,
        split=args.split,
        seed=args.seed,
        on_bad_rows=args.on_bad_rows,
        files_per_split=args.files_per_split,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    schema = preprocess(config)
    print(summary(schema, config.output, time.perf_counter() - start))


if __name__ == "__main__":
    run_cli(main)
