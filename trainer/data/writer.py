"""Write the parquet splits of a prepared dataset (see ``trainer.data.schema``).

Rows arrive in batches; each split is spread over ``files_per_split`` part
files (so ranks and readers can share them out) with row groups of
``row_group_rows`` rows, the unit the loader reads. Row groups are encoded and
compressed in background threads (pyarrow releases the GIL), several part
files at once; each file still gets its row groups in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.schema import DENSE_COLUMN, LABEL_COLUMN, SPLITS, SplitInfo
from trainer.storage import filesystem, join

_WRITE_THREADS = 2
_IN_FLIGHT = _WRITE_THREADS  # row groups handed to the threads and not yet written: bounds memory


def make_table(
    labels: np.ndarray,
    sparse: dict[str, pa.Array | np.ndarray],
    dense: np.ndarray | None = None,
    extras: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    """Build one batch in the on-disk layout.

    labels: (N,) 0/1; sparse: field -> (N,) int ids, or a list array of ids (a multi-hot field);
    dense: (N, D) float32 or None; extras: name -> (N,) float32.
    """
    columns: dict[str, pa.Array] = {LABEL_COLUMN: pa.array(np.asarray(labels, dtype=np.int8))}
    for name, ids in sparse.items():
        if isinstance(ids, pa.Array):
            columns[name] = ids.cast(pa.list_(pa.int32()) if pa.types.is_list(ids.type) else pa.int32())
        else:
            columns[name] = pa.array(np.asarray(ids, dtype=np.int32))
    if dense is not None and dense.shape[1] > 0:
        flat = pa.array(np.ascontiguousarray(dense, dtype=np.float32).reshape(-1))
        columns[DENSE_COLUMN] = pa.FixedSizeListArray.from_arrays(flat, dense.shape[1])
    for name, values in (extras or {}).items():
        columns[name] = pa.array(np.asarray(values, dtype=np.float32))
    return pa.table(columns)


class _PartFile:
    """One part file: buffers appended rows and writes a row group through ``submit`` when one is full."""

    def __init__(self, url: str, schema: pa.Schema, row_group_rows: int, submit: Callable[..., Future]):
        fs, path = filesystem(url)
        self._file = fs.open(path, "wb")
        # ids and labels repeat (dictionary encoding pays); float columns don't
        ids = [f.name for f in schema if pa.types.is_integer(f.type)]
        self._writer = pq.ParquetWriter(self._file, schema, compression="zstd", use_dictionary=ids)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._row_group_rows = row_group_rows
        self._submit = submit
        self._last: Future | None = None  # this file's latest row group write
        self.rows = 0

    def append(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending_rows:
            self._last = self._submit(self._write_row_group, self._last, self._pending)
        self._pending, self._pending_rows = [], 0

    def _write_row_group(self, previous: Future | None, tables: list[pa.Table]) -> None:
        row_group = pa.concat_tables(tables).combine_chunks()
        tables.clear()  # the pieces are copied: free them now rather than when this write is done
        if previous is not None:
            previous.result()  # row groups of one file go in order
        self._writer.write_table(row_group, row_group_size=self._row_group_rows)

    def close(self) -> None:
        """Close the file; ``DatasetWriter.close`` has flushed it and waited for its writes."""
        self._writer.close()
        self._file.close()


class DatasetWriter:
    """Append batches to the train/val/test part files under ``root_url``.

    Part files are numbered from ``first_part`` (several writers, one per input
    file, share a split directory).
    """

    def __init__(self, root_url: str, files_per_split: int = 4, row_group_rows: int = 1 << 16, first_part: int = 0):
        self.root_url = root_url
        self.files_per_split = files_per_split
        self.first_part = first_part
        self.row_group_rows = row_group_rows
        self._parts: dict[str, list[_PartFile]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: deque[Future] = deque()

    def _submit(self, fn: Callable[..., None], *args: object) -> Future:
        """Run ``fn(*args)`` in a write thread, first waiting while too many row groups are in flight."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="dataset-writer")
        while len(self._in_flight) >= _IN_FLIGHT or (self._in_flight and self._in_flight[0].done()):
            self._in_flight.popleft().result()  # re-raises a failed write
        future = self._pool.submit(fn, *args)
        self._in_flight.append(future)
        return future

    def write(self, split: str, table: pa.Table) -> None:
        """Append ``table`` (from ``make_table``) to ``split``, a row group's worth at a time to its smallest part file."""
        assert split in SPLITS, split
        if table.num_rows == 0:
            return
        parts = self._parts.get(split)
        if parts is None:
            fs, path = filesystem(join(self.root_url, split))
            fs.makedirs(path, exist_ok=True)
            parts = [
                _PartFile(join(self.root_url, split, self._name(i)), table.schema, self.row_group_rows, self._submit)
                for i in range(self.files_per_split)
            ]
            self._parts[split] = parts
        for start in range(0, table.num_rows, self.row_group_rows):
            min(parts, key=lambda p: p.rows).append(table.slice(start, self.row_group_rows))

    def _name(self, i: int) -> str:
        return f"part-{self.first_part + i:05d}.parquet"

    def close(self) -> dict[str, SplitInfo]:
        """Finish every file; returns the split infos for ``schema.json``. Empty splits have no files."""
        try:
            for parts in self._parts.values():
                for p in parts:
                    p._flush()
            while self._in_flight:
                self._in_flight.popleft().result()  # re-raises a failed write
        finally:  # no thread may still be writing when the caller cleans up after a failure
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        infos = {}
        for split in SPLITS:
            parts = self._parts.get(split, [])
            for p in parts:
                p.close()
            files = [f"{split}/{self._name(i)}" for i, p in enumerate(parts) if p.rows > 0]
            # part files that got no rows are removed: they would only confuse readers
            for i, p in enumerate(parts):
                if p.rows == 0:
                    fs, path = filesystem(join(self.root_url, split, self._name(i)))
                    fs.rm(path)
            infos[split] = SplitInfo(rows=sum(p.rows for p in parts), files=files)
        return infos
