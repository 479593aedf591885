"""Global shuffle of a written split: its rows rewritten in a seeded random order, in memory flat in the row count.

Criteo is in time order, and the loader only shuffles inside windows of rows, so a
batch of a split written in file order comes from a few short stretches of time. The
authors shuffle the whole data set once; ``shuffle_split`` does the same to a split of
a prepared dataset (``preprocess --shuffle-train``).

Row ``i`` of the split (in file order) moves to position ``pi(i)``, where ``pi`` is a
seeded pseudo-random permutation of ``[0, N)``: a ``ROUNDS``-round Feistel network on
the smallest domain of ``4^h >= N`` values (round function: ``splitmix64`` of the half
xor a round key drawn from ``seed``), walking cycles back into ``[0, N)``. It is
computed row by row, so it needs no memory. Bucket ``b`` holds the positions
``[b * bucket_rows, (b + 1) * bucket_rows)``, i.e. exactly ``bucket_rows`` rows (the last
one fewer).

1. Scatter: the split is read a row group at a time; each row is appended, with its
   position, to its bucket (an Arrow IPC file in a scratch directory beside the split).
   At most ``MAX_OPEN_BUCKETS`` bucket files are open: with more buckets the split is
   read once per group of that many.
2. Gather: one bucket at a time is loaded, ordered by position and written with
   ``DatasetWriter`` (the split's part-file count and row-group size); its file is
   deleted.

Peak memory: one bucket plus one row group, whatever ``N``; scratch disk: about the
split's size. The new part files replace the split's only once all are written; a
failure leaves the split as it was and removes the scratch directory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.schema import DatasetSchema, SplitInfo
from trainer.data.splits import splitmix64
from trainer.data.writer import DatasetWriter
from trainer.errors import UserError
from trainer.storage import filesystem, join

ROUNDS = 6  # Feistel rounds (4 already make a pseudo-random permutation)
MAX_OPEN_BUCKETS = 256  # bucket files open at once during the scatter
DEFAULT_BUCKET_ROWS = 1 << 20  # rows in memory during the gather (a Criteo row: about 170 bytes)
_POSITION = "__position"  # the bucket files' extra column


class Permutation:
    """A seeded pseudo-random permutation of ``[0, n)``, evaluated elementwise."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.half_bits = max(1, math.ceil(math.log2(max(n, 2)) / 2))  # domain 4^h >= n, < 4n
        self.mask = np.uint64((1 << self.half_bits) - 1)
        self.keys = np.random.SeedSequence(seed).generate_state(ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self.mask
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = right, left ^ (splitmix64(right ^ key) & self.mask)
        return (left << h) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """index: int64 (K,) in ``[0, n)`` -> int64 (K,) their positions, distinct, in ``[0, n)``."""
        x = self._feistel(np.asarray(index, dtype=np.uint64))
        outside = np.flatnonzero(x >= self.n)
        while len(outside):  # cycle-walking: the domain is < 4n, so this ends fast
            x[outside] = self._feistel(x[outside])
            outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)


@dataclass(frozen=True)
class ShuffleReport:
    """What a shuffle did: ``largest_bucket`` rows were in memory at once (at most ``bucket_rows``)."""

    rows: int
    buckets: int
    bucket_rows: int
    largest_bucket: int
    reads: int  # passes over the split during the scatter


def _row_groups(fs, root: str, files: list[str]):
    """(table, first row index) of every row group of ``files``, in file order."""
    first = 0
    for name in files:
        with fs.open(filesystem(join(root, name))[1], "rb") as f:
            parquet = pq.ParquetFile(f)
            for g in range(parquet.num_row_groups):
                table = parquet.read_row_group(g)
                yield table, first
                first += table.num_rows


def _scatter(fs, root: str, files: list[str], pi: Permutation, bucket_rows: int, buckets: range, scratch: str) -> None:
    """Append each row whose bucket is in ``buckets`` to ``scratch/BUCKET.arrow``, with its position."""
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    sinks = []
    try:
        for table, first in _row_groups(fs, root, files):
            position = pi(np.arange(first, first + table.num_rows, dtype=np.int64))
            bucket = position // bucket_rows
            keep = np.flatnonzero((bucket >= buckets.start) & (bucket < buckets.stop))
            if not len(keep):
                continue
            order = keep[np.argsort(bucket[keep], kind="stable")]
            table = table.take(pa.array(order)).append_column(_POSITION, pa.array(position[order]))
            sorted_buckets = bucket[order]
            cuts = np.flatnonzero(np.diff(sorted_buckets)) + 1
            for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(order)]):
                b = int(sorted_buckets[start])
                if b not in writers:
                    sinks.append(fs.open(filesystem(join(scratch, f"{b:06d}.arrow"))[1], "wb"))
                    writers[b] = pa.ipc.new_file(sinks[-1], table.schema)
                writers[b].write_table(table.slice(start, stop - start))
    finally:
        for w in writers.values():
            w.close()
        for s in sinks:
            s.close()


def shuffle_split(root: str, split: SplitInfo, name: str, seed: int, bucket_rows: int = DEFAULT_BUCKET_ROWS) -> tuple[SplitInfo, ShuffleReport]:
    """Rewrite split ``name`` of the dataset at ``root`` (``split``: its info) with its rows in the
    order of ``Permutation(rows, seed)``; returns the new split info (same file names) and a report."""
    if bucket_rows < 1:
        raise UserError(f"bucket_rows must be >= 1, got {bucket_rows}")
    fs, _ = filesystem(root)
    n = split.rows
    if n == 0:
        return split, ShuffleReport(0, 0, bucket_rows, 0, 0)
    buckets = math.ceil(n / bucket_rows)
    pi = Permutation(n, seed)
    scratch = join(root, f"_shuffle-{name}")
    scratch_path = filesystem(scratch)[1]
    if fs.exists(scratch_path):
        fs.rm(scratch_path, recursive=True)  # a dead run's
    bucket_dir = join(scratch, "buckets")
    fs.makedirs(filesystem(bucket_dir)[1], exist_ok=True)
    try:
        row_group_rows = 1
        for f in split.files:
            with fs.open(filesystem(join(root, f))[1], "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                row_group_rows = max([row_group_rows] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        writer = DatasetWriter(scratch, files_per_split=max(1, len(split.files)), row_group_rows=row_group_rows)
        largest, reads = 0, 0
        for group in range(0, buckets, MAX_OPEN_BUCKETS):
            todo = range(group, min(group + MAX_OPEN_BUCKETS, buckets))
            _scatter(fs, root, split.files, pi, bucket_rows, todo, bucket_dir)
            reads += 1
            for b in todo:
                path = filesystem(join(bucket_dir, f"{b:06d}.arrow"))[1]  # never empty: pi is onto
                with fs.open(path, "rb") as f:
                    table = pa.ipc.open_file(f).read_all()
                fs.rm(path)
                largest = max(largest, table.num_rows)
                order = np.argsort(table.column(_POSITION).to_numpy())
                writer.write(name, table.drop_columns([_POSITION]).take(pa.array(order)))
        new = writer.close()[name]
        if new.rows != n:
            raise AssertionError(f"global shuffle wrote {new.rows} rows of {n}")
        old_path, new_path = filesystem(join(root, name))[1], filesystem(join(scratch, name))[1]
        fs.mv(old_path, filesystem(join(scratch, "unshuffled"))[1], recursive=True)
        fs.mv(new_path, old_path, recursive=True)
    finally:
        fs.rm(scratch_path, recursive=True)
    return new, ShuffleReport(n, buckets, bucket_rows, largest, reads)


def order_train(root: str, schema: DatasetSchema, shuffle: bool, seed: int, bucket_rows: int = DEFAULT_BUCKET_ROWS) -> DatasetSchema:
    """The schema of the dataset at ``root`` once its train split is in its final order, recorded as
    ``recipe["train_order"]``: ``"global_shuffle"`` (``shuffle``: rewritten by ``shuffle_split``
    with ``seed``) or ``"file"`` (as written)."""
    if not shuffle:
        return replace(schema, recipe={**schema.recipe, "train_order": "file"})
    info, report = shuffle_split(root, schema.splits["train"], "train", seed, bucket_rows)
    recipe = {**schema.recipe, "train_order": "global_shuffle", "train_shuffle": {"seed": seed, **asdict(report)}}
    return replace(schema, splits={**schema.splits, "train": info}, recipe=recipe)
