"""Raw log files -> chunks of binary columns (``RawChunk``), parsed in a background thread.

``open_raw`` opens a path or fsspec URL (compression by extension),
``read_chunks`` parses it with pyarrow, noting the file line of every row it
rejects, and ``prefetch`` runs such a generator ahead of its caller in a thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv

from trainer.data.raw_formats import RawFormat
from trainer.errors import UserError

T = TypeVar("T")


def prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
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


@contextlib.contextmanager
def open_raw(url: str) -> Iterator[Any]:
    """The raw file as a binary stream, decompressed by its extension (fsspec's ``compression="infer"``)."""
    try:
        file = fsspec.open(url, "rb", compression="infer").open()
    except (OSError, ValueError) as e:
        raise UserError(f"{url}: cannot open ({type(e).__name__}: {e})") from None
    try:
        yield file
    finally:
        file.close()


@dataclass
class RawChunk:
    """Parsed rows (every column binary, empty -> null) and the rows pyarrow rejected."""

    table: pa.Table  # chunked as parsed: chunks are never concatenated
    rejected: list[tuple[int, int]]  # (line, number of columns) of rows with the wrong column count


def read_chunks(file: Any, fmt: RawFormat, where: str, block_size: int, chunk_rows: int) -> Iterator[RawChunk]:
    """Parse the raw stream ``file`` (named ``where`` in errors) into chunks of about ``chunk_rows`` rows.

    Single-threaded pyarrow parsing, ``block_size`` bytes at a time (it runs
    beside the caller through ``prefetch``), so that rejected rows come with
    their line number.
    """
    rejected: list[tuple[int, int]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        rejected.append((row.number, row.actual_columns))
        return "skip"

    read_options = pacsv.ReadOptions(
        column_names=None if fmt.has_header else list(fmt.columns), use_threads=False, block_size=block_size
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
                f"{where}:1: header is not the {fmt.name} layout: expected "
                f"{','.join(fmt.columns)}, got {','.join(reader.schema.names)}"
            )
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in reader:
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= chunk_rows:
                yield RawChunk(pa.Table.from_batches(pending), rejected)
                pending, pending_rows, rejected = [], 0, []
        if pending or rejected:
            yield RawChunk(pa.Table.from_batches(pending, schema=reader.schema), rejected)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            raise UserError(f"{where}: empty file") from None
        raise UserError(f"{where}: cannot parse: {e}") from None
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{where}: cannot read ({type(e).__name__}: {e}); truncated or corrupt file?") from None
