"""Read a prepared parquet split (see ``trainer.data.schema``) as TorchRec ``Batch`` es.

How rows are shared out, per epoch:

1. Units are the split's parquet row groups, in schema file order. With
   ``shuffle`` their order is permuted by an RNG of ``(seed, epoch)``; the
   units in that order form a virtual stream of all ``N`` rows.
2. Rank ``r`` owns a contiguous range of the stream (``np.array_split`` sizes
   of ``N`` over ``world_size``) and cuts its ``n_r`` rows into
   ``S = ceil(N / (batch_size * world_size))`` near-equal batches. Every rank
   has exactly ``S`` steps (DDP needs equal step counts), every batch has at
   most ``batch_size`` rows, every row is seen once per epoch across ranks,
   and each rank reads only the row groups its range touches.
3. With ``shuffle`` the rank's rows are permuted inside fixed windows of
   ``shuffle_window_rows`` by an RNG of ``(seed, epoch, rank, window)``.
   Without it (evaluation) the stream is file/row-group order, unpermuted.
4. ``iter_from(b)`` resumes at batch ``b``: it reads only from the window
   holding that batch's first row and yields exactly the batches an
   uninterrupted epoch would have yielded from ``b`` on.

A window is decoded once into numpy (labels ``(n,)``, the single-valued
fields' ids ``(n, S)`` int32, each multi-hot field's ids padded to ``(n, L)``
int32 with their counts ``(n,)``, dense ``(n, D)``); the next window is read in
a background thread while batches are cut from the current one.

A multi-hot field (``max_length`` L > 1, a ``list<int32>`` column) gives KJT lengths
0..L per row; a row with more than L ids is refused (the preprocessor truncates).

Ids outside ``[0, cardinality)`` are refused with a ``UserError``: up front from the
parquet footers' min/max statistics (no data read, so before anything trains), and
again in every decoded window (a min and max per field), which also covers files
written without statistics.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.schema import DENSE_COLUMN, LABEL_COLUMN, DatasetSchema, read_schema
from trainer.errors import UserError
from trainer.storage import filesystem, join

_UNIT_SALT, _WINDOW_SALT = 0, 1  # keep the two RNG streams of an epoch apart


@dataclass(frozen=True)
class LoaderConfig:
    """How a split is cut into batches; the same on every rank."""

    batch_size: int = 2048
    shuffle: bool = True
    seed: int = 0
    shuffle_window_rows: int = 1 << 18  # rows permuted together (and decoded at once)
    prefetch: bool = True  # read the next window in a background thread

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_window_rows < 1:
            raise UserError(f"shuffle_window_rows must be >= 1, got {self.shuffle_window_rows}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class _Units:
    """The split's row groups in file order: unit ``u`` is row group ``group[u]`` of ``urls[file[u]]``."""

    fs: fsspec.AbstractFileSystem
    urls: list[str]
    paths: list[str]
    metadata: list[pq.FileMetaData]
    fields: list[str]  # sparse fields, schema order
    multi_hot: dict[str, int]  # multi-hot field -> max_length (the others hold one id per row)
    num_dense: int
    file: np.ndarray  # (U,) int64
    group: np.ndarray  # (U,) int64
    rows: np.ndarray  # (U,) int64

    @property
    def columns(self) -> list[str]:
        return [LABEL_COLUMN, *self.fields] + ([DENSE_COLUMN] if self.num_dense else [])

    def read(self, unit: int) -> pa.Table:
        i, group, columns = int(self.file[unit]), int(self.group[unit]), self.columns
        with self.fs.open(self.paths[i], "rb") as f:
            table = pq.ParquetFile(f, metadata=self.metadata[i]).read_row_group(group, columns=columns)
        for name in columns:
            if table.column(name).null_count:
                raise UserError(f"{self.urls[i]}: column {name!r} has nulls in row group {group}")
        return table.combine_chunks()


@dataclass(frozen=True)
class _Rows:
    """Decoded rows: labels (n,) float32; ``sparse`` (n, S) int32, the ids of the S single-valued
    fields; ``lists`` per multi-hot field (schema order) its ids (n, L) int32, padded with 0
    after ``lengths`` (n,) int32 ids; dense (n, D) float32."""

    labels: np.ndarray
    sparse: np.ndarray
    lists: tuple[tuple[np.ndarray, np.ndarray], ...]
    dense: np.ndarray

    def take(self, lo: int, hi: int, idx: np.ndarray | None) -> "_Rows":
        """Rows ``[lo, hi)``, or rows ``idx`` when given."""
        if idx is None:
            lists = tuple((v[lo:hi], n[lo:hi]) for v, n in self.lists)
            return _Rows(self.labels[lo:hi], self.sparse[lo:hi], lists, self.dense[lo:hi])
        return _Rows(
            self.labels[idx],
            np.take(self.sparse, idx, axis=0),
            tuple((np.take(v, idx, axis=0), n[idx]) for v, n in self.lists),
            np.take(self.dense, idx, axis=0),
        )

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]
        lists = tuple(
            (np.concatenate([p.lists[j][0] for p in parts]), np.concatenate([p.lists[j][1] for p in parts]))
            for j in range(len(parts[0].lists))
        )
        return _Rows(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.sparse for p in parts]),
            lists,
            np.concatenate([p.dense for p in parts]),
        )


@dataclass(frozen=True)
class _Window:
    """Rank-local rows ``[start, start + n)``; ``perm`` (n,) maps batch order to storage order."""

    start: int
    data: _Rows
    perm: np.ndarray | None

    def __len__(self) -> int:
        return len(self.data.labels)

    def rows(self, lo: int, hi: int) -> _Rows:
        """Window positions ``[lo, hi)`` in batch order."""
        return self.data.take(lo, hi, None if self.perm is None else self.perm[lo:hi])


class CTRDataLoader:
    """Batches of one split for one rank: ``Batch(dense (B, D) f32, sparse KJT, labels (B,) f32)``.

    The KJT has the schema's sparse fields as keys (schema order), int64 values
    laid out field-major (all rows of key 0, then key 1, ...) and int32
    lengths: one per row of a single-valued field, 0..max_length per row of a
    multi-hot field.
    """

    def __init__(
        self,
        dataset_url: str,
        split: str,
        config: LoaderConfig = LoaderConfig(),
        rank: int = 0,
        world_size: int = 1,
        expected_fields: Sequence[str] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.schema: DatasetSchema = read_schema(dataset_url)
        self.dataset_url = dataset_url
        self.split = split
        self.field_names = self.schema.field_names
        self.num_dense = len(self.schema.dense_fields)
        if expected_fields is not None and list(expected_fields) != self.field_names:
            raise UserError(
                f"{dataset_url}: sparse fields {self.field_names} differ from the expected {list(expected_fields)}"
            )
        if split not in self.schema.splits:
            raise UserError(f"{dataset_url}: no split {split!r}; the dataset has {sorted(self.schema.splits)}")
        fs, _ = filesystem(dataset_url)
        urls = [join(dataset_url, f) for f in self.schema.splits[split].files]
        paths = [filesystem(url)[1] for url in urls]
        metadata = [self._read_footer(fs, path, url) for path, url in zip(paths, urls)]
        groups = [(i, g) for i, m in enumerate(metadata) for g in range(m.num_row_groups)]
        self._units = _Units(
            fs=fs,
            urls=urls,
            paths=paths,
            metadata=metadata,
            fields=self.field_names,
            multi_hot={f.name: f.max_length for f in self.schema.sparse_fields if f.multi_hot},
            num_dense=self.num_dense,
            file=np.array([i for i, _ in groups], dtype=np.int64),
            group=np.array([g for _, g in groups], dtype=np.int64),
            rows=np.array([metadata[i].row_group(g).num_rows for i, g in groups], dtype=np.int64),
        )
        self._single = [f for f in self.schema.sparse_fields if not f.multi_hot]
        self._multi = [f for f in self.schema.sparse_fields if f.multi_hot]
        self._cardinalities = np.array([f.cardinality for f in self._single], dtype=np.int64)
        for f in self.schema.sparse_fields:
            found = self.column_range(f.name)
            if found is not None and not 0 <= found[0] <= found[1] < f.cardinality:
                raise UserError(
                    f"{dataset_url}: split {split!r} has {f.name} ids in [{found[0]}, {found[1]}] (parquet statistics), "
                    f"outside [0, {f.cardinality}): schema.json's cardinality does not match the data"
                )
        self.num_rows = int(self._units.rows.sum())
        if self.num_rows != self.schema.splits[split].rows:
            raise UserError(
                f"{dataset_url}: split {split!r} files hold {self.num_rows} rows, schema.json says {self.schema.splits[split].rows}"
            )
        n, w = self.num_rows, world_size
        self.rank_start = rank * (n // w) + min(rank, n % w)
        self.rank_rows = n // w + (rank < n % w)
        self._steps = -(-n // (config.batch_size * w))
        if n // w < self._steps or n == 0:  # the smallest rank would get an empty batch
            raise UserError(
                f"{dataset_url}: split {split!r} has {n} rows, too few for world_size {w} and batch_size {config.batch_size}"
            )
        self.epoch = 0

    def _read_footer(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> pq.FileMetaData:
        """One part file's footer, after checking its columns against the schema."""
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                metadata, arrow_schema = pf.metadata, pf.schema_arrow
        except FileNotFoundError:
            raise UserError(f"missing dataset file {url} (listed in schema.json)") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{url}: not a readable parquet file ({e})") from None
        checks = {LABEL_COLUMN: ("int8", pa.types.is_int8)}
        for f in self.schema.sparse_fields:
            checks[f.name] = (
                ("list<int32>", lambda t: pa.types.is_list(t) and pa.types.is_int32(t.value_type))
                if f.multi_hot
                else ("int32", pa.types.is_int32)
            )
        if self.num_dense:
            d = self.num_dense
            checks[DENSE_COLUMN] = (
                f"fixed_size_list<float32>[{d}]",
                lambda t: pa.types.is_fixed_size_list(t) and t.list_size == d and pa.types.is_float32(t.value_type),
            )
        for name, (expected, ok) in checks.items():
            index = arrow_schema.get_field_index(name)
            if index < 0:
                raise UserError(f"{url}: missing column {name!r}")
            actual = arrow_schema.field(index).type
            if not ok(actual):
                raise UserError(f"{url}: column {name!r} has type {actual}, expected {expected}")
        return metadata

    def column_range(self, name: str) -> tuple[int, int] | None:
        """(min, max) of integer column ``name`` (for a list column: of its ids) over the whole
        split, from the parquet footers' statistics (no data read); None when some row group has
        no statistics for it."""
        lows, highs = [], []
        for metadata in self._units.metadata:
            paths = [metadata.schema.column(j).path for j in range(metadata.num_columns)]
            column = next(j for j, p in enumerate(paths) if p == name or p.startswith(f"{name}."))
            for g in range(metadata.num_row_groups):
                group = metadata.row_group(g)
                if group.num_rows == 0:
                    continue
                stats = group.column(column).statistics
                if stats is None or not stats.has_min_max:
                    return None
                lows.append(stats.min)
                highs.append(stats.max)
        return (min(lows), max(highs)) if lows else None

    def _check_ids(self, rows: _Rows) -> None:
        """Refuse decoded ids outside ``[0, cardinality)``: one vectorised min and max per field
        per window (about 10 ms for 256k rows of 39 fields, in the background reader thread)."""
        if not len(rows.labels):
            return
        found = []
        if self._single:
            found += zip(self._single, rows.sparse.min(axis=0), rows.sparse.max(axis=0))
        for f, (values, lengths) in zip(self._multi, rows.lists):
            ids = values[np.arange(values.shape[1]) < lengths[:, None]]
            if len(ids):
                found.append((f, ids.min(), ids.max()))
        for f, low, high in found:
            if low < 0 or high >= f.cardinality:
                raise UserError(
                    f"{self.dataset_url}: split {self.split!r} has {f.name} ids in [{low}, {high}], "
                    f"outside [0, {f.cardinality}): "
                    "schema.json's cardinality does not match the data"
                )

    def __len__(self) -> int:
        """Steps per epoch, the same on every rank."""
        return self._steps

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def batch_offset(self, batch: int) -> int:
        """Rank-local row offset of ``batch`` (``np.array_split`` of ``rank_rows`` into ``len(self)``)."""
        q, r = divmod(self.rank_rows, self._steps)
        return batch * q + min(batch, r)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """Batches ``start_batch .. len(self) - 1`` of the current epoch."""
        if not 0 <= start_batch <= self._steps:
            raise ValueError(f"start_batch {start_batch} not in [0, {self._steps}]")
        return self._batches(self.epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        pos = self.batch_offset(start_batch)
        windows = self._windows(epoch, pos // self.config.shuffle_window_rows)
        try:
            window: _Window | None = None
            for b in range(start_batch, self._steps):
                end = self.batch_offset(b + 1)
                parts = []
                while pos < end:
                    if window is None or pos == window.start + len(window):
                        window = next(windows)
                    hi = min(end, window.start + len(window))
                    parts.append(window.rows(pos - window.start, hi - window.start))
                    pos = hi
                yield self._make_batch(parts)
        finally:
            windows.close()

    def _make_batch(self, parts: list[_Rows]) -> Batch:
        """Row pieces in order -> one Batch."""
        rows = _Rows.concat(parts)
        b = len(rows.labels)
        if not self._multi:  # every field single-valued: one transpose
            values = np.ascontiguousarray(rows.sparse.T, dtype=np.int64).reshape(-1)  # field-major (F * b,)
            lengths = np.ones(len(self.field_names) * b, dtype=np.int32)  # numpy: no intra-op thread wake-up
            per_key = [b] * len(self.field_names)
        else:
            single = iter(rows.sparse.T)
            multi = iter(rows.lists)
            key_values, key_lengths = [], []
            for f in self.schema.sparse_fields:
                if f.multi_hot:
                    ids, counts = next(multi)
                    key_values.append(ids[np.arange(ids.shape[1]) < counts[:, None]])  # row-major: row by row
                    key_lengths.append(counts)
                else:
                    key_values.append(next(single))
                    key_lengths.append(np.ones(b, dtype=np.int32))
            values = np.concatenate(key_values).astype(np.int64)
            lengths = np.concatenate(key_lengths).astype(np.int32, copy=False)
            per_key = [len(v) for v in key_values]
        kjt = KeyedJaggedTensor(
            keys=self.field_names,
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths),
            stride=b,
            length_per_key=per_key,
        )
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(rows.dense)),
            sparse_features=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(rows.labels)),
        )

    def _windows(self, epoch: int, first: int) -> Iterator[_Window]:
        """Windows ``first, first + 1, ...`` of this rank's range; the next one loads in the background."""
        size = self.config.shuffle_window_rows
        count = -(-self.rank_rows // size)
        if first >= count:
            return
        units = len(self._units.rows)
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, _UNIT_SALT, epoch]).permutation(units)
        else:
            order = np.arange(units)
        reader = _UnitReader(self._units, order)

        def load(k: int) -> _Window:
            lo, hi = k * size, min((k + 1) * size, self.rank_rows)
            rows = reader.read(self.rank_start + lo, self.rank_start + hi)
            self._check_ids(rows)
            perm = None
            if self.config.shuffle:
                rng = np.random.default_rng([self.config.seed, _WINDOW_SALT, epoch, self.rank, k])
                perm = rng.permutation(hi - lo)
            return _Window(lo, rows, perm=perm)

        if not self.config.prefetch:
            for k in range(first, count):
                yield load(k)
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctr-loader") as pool:
            future = pool.submit(load, first)
            try:
                for k in range(first, count):
                    window = future.result()
                    if k + 1 < count:
                        future = pool.submit(load, k + 1)
                    yield window
            finally:
                future.cancel()


class _UnitReader:
    """Decode stream rows of one epoch's unit order, keeping the last row group for the next call."""

    def __init__(self, units: _Units, order: np.ndarray):
        self._units = units
        self._order = order  # (U,) stream position -> unit
        self._bounds = np.concatenate([[0], np.cumsum(units.rows[order])])  # (U + 1,) stream offsets
        self._cached: tuple[int, pa.Table] | None = None

    def _table(self, unit: int) -> pa.Table:
        if self._cached is None or self._cached[0] != unit:
            self._cached = (unit, self._units.read(unit))
        return self._cached[1]

    def read(self, lo: int, hi: int) -> _Rows:
        """Stream rows [lo, hi), decoded."""
        multi_hot, d, n = self._units.multi_hot, self._units.num_dense, hi - lo
        fields = [name for name in self._units.fields if name not in multi_hot]
        labels = np.empty(n, dtype=np.float32)
        sparse = np.empty((n, len(fields)), dtype=np.int32)
        lists = {name: (np.zeros((n, size), dtype=np.int32), np.empty(n, dtype=np.int32)) for name, size in multi_hot.items()}
        dense = np.empty((n, d), dtype=np.float32)
        first = int(np.searchsorted(self._bounds, lo, side="right")) - 1
        last = int(np.searchsorted(self._bounds, hi, side="left"))
        for i in range(first, last):
            a, b = max(lo, int(self._bounds[i])), min(hi, int(self._bounds[i + 1]))
            if a >= b:
                continue
            table = self._table(int(self._order[i])).slice(a - int(self._bounds[i]), b - a)
            out = slice(a - lo, b - lo)
            labels[out] = table.column(LABEL_COLUMN).to_numpy()
            if fields:
                np.stack([table.column(name).to_numpy() for name in fields], axis=1, out=sparse[out])
            for name, (ids, counts) in lists.items():
                self._read_list(table.column(name).combine_chunks(), name, int(self._order[i]), ids[out], counts[out])
            if d:
                dense[out] = table.column(DENSE_COLUMN).combine_chunks().flatten().to_numpy().reshape(-1, d)
        return _Rows(labels, sparse, tuple(lists.values()), dense)

    def _read_list(self, column: pa.ListArray, name: str, unit: int, ids: np.ndarray, counts: np.ndarray) -> None:
        """A multi-hot column's rows -> ``ids`` (b, L) padded in place and ``counts`` (b,)."""
        if column.values.null_count:
            raise UserError(f"{self._units.urls[int(self._units.file[unit])]}: column {name!r} has null ids in its lists")
        offsets = column.offsets.to_numpy()  # (b + 1,), into column.values
        np.subtract(offsets[1:], offsets[:-1], out=counts, casting="unsafe")
        if len(counts) and counts.max() > ids.shape[1]:
            u = self._units
            raise UserError(
                f"{u.urls[int(u.file[unit])]}: row group {int(u.group[unit])} has a row with {int(counts.max())} "
                f"{name} ids, more than its max_length {ids.shape[1]} (schema.json)"
            )
        ids[np.arange(ids.shape[1]) < counts[:, None]] = column.values.to_numpy()[offsets[0] : offsets[-1]]
