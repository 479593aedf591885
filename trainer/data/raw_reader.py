"""Raw log files -> chunks of columns (``RawChunk``), parsed in a background thread.

``open_raw`` opens a path or fsspec URL (compression by extension),
``read_chunks`` parses a CSV/TSV stream with pyarrow (every value binary),
noting the file line and the reason of every row it rejects,
``read_parquet_chunks`` reads a Parquet file row group by row group (columns in
their own types), and ``prefetch`` runs such a generator ahead of its caller in
a thread.

A line is what ends in ``\n`` (or ``\r\n``). pyarrow sees the file through
``_Lines``, which hands it every line unchanged except the few it cannot be
trusted with: a line that is not UTF-8 text and has the wrong column count
(pyarrow would fail decoding it for its invalid-row handler), one with a
carriage return inside (pyarrow would split it in two, shifting every later
line number) and one longer than half a parse block (pyarrow would stop). Those
become a one-column line pyarrow rejects, and their reason is kept aside.
"""

from __future__ import annotations

import contextlib
import csv
import io
import queue
import threading
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

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


def show_bytes(value: bytes, limit: int = 40) -> str:
    """``value`` quoted for a message: text as ``repr`` shows it, other bytes as ``\\xNN``, cut at ``limit`` bytes."""
    text = value[:limit].decode("utf-8", "surrogateescape")
    shown = []
    for c in text:
        if "\udc80" <= c <= "\udcff":  # a byte that is not UTF-8
            shown.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c == "'":
            shown.append("\\'")
        else:
            shown.append(repr(c)[1:-1] if c == "\\" or not c.isprintable() else c)
    more = f"... ({len(value):,} bytes)" if len(value) > limit else ""
    return "'" + "".join(shown) + "'" + more


def clip(text: str, limit: int = 300) -> str:
    """``text`` (a message that may quote raw input) with control characters escaped, cut at ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


class _Lines(io.RawIOBase):
    """The raw stream as pyarrow should see it: whole lines, the ones it cannot parse safely replaced.

    A replaced line becomes ``MARK<n>``, one column, which pyarrow rejects;
    ``reason(text)`` gives the reason of a rejected row from its text. Blocks of
    plain lines (the rule) pass through after a few scans at memory speed.
    """

    def __init__(self, file: Any, fmt: RawFormat, where: str, max_line: int):
        self.file, self.fmt, self.where, self.max_line = file, fmt, where, max_line
        self.expected: int | None = None if fmt.has_header else len(fmt.columns)  # with a header: its count
        self.delimiter = fmt.delimiter.encode()
        self.mark = f"bad-line-{uuid.uuid4().hex}-"  # one column; no real line is that
        self._reasons: dict[str, str] = {}  # replacement text -> reason, until pyarrow rejects it
        self._replaced = 0
        self._carry = b""  # the unfinished last line read so far
        self._skipping = False  # inside an over-long line: dropping bytes until its end
        self._first = True  # the next line is the file's first
        self._eof = False
        self._peeked = b""  # read by ``header`` and not yet handed out

    def header(self) -> list[str]:
        """The names in the first line (read ahead; pyarrow still gets it)."""
        while b"\n" not in self._peeked and not self._eof:
            self._peeked += self._fill(1 << 16)
        line = self._peeked.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
        if not line:
            raise UserError(f"{self.where}: empty file")
        return next(csv.reader([line], delimiter=self.fmt.delimiter))

    def readable(self) -> bool:
        return True

    def reason(self, text: str) -> str | None:
        """Why the line pyarrow rejected with ``text`` was replaced; None for a line it rejected itself."""
        return self._reasons.pop(text, None) if text.startswith(self.mark) else None

    def read(self, size: int = -1) -> bytes:
        size = size if size is not None and size > 0 else 1 << 20
        if self._peeked:
            out, self._peeked = self._peeked, b""
            return out
        while not self._eof:
            out = self._fill(size)
            if out:
                return out
        return b""

    def readinto(self, buffer: Any) -> int:  # io.RawIOBase's read() goes through it; pyarrow calls read()
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _fill(self, size: int) -> bytes:
        data = self.file.read(size)
        if not data:
            self._eof = True
            if self._skipping or not self._carry:
                return b""
            data, self._carry = self._carry + b"\n", b""  # the last line had no newline
            return self._check(data)
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return b""
            data, self._skipping = data[end + 1 :], False
        cut = data.rfind(b"\n") + 1
        if cut:  # the carried start of a line, and whole lines up to the last newline: one copy at most
            lines = b"".join((self._carry, memoryview(data)[:cut])) if self._carry or cut < len(data) else data
            out, self._carry = self._check(lines), data[cut:]
        else:
            out, self._carry = b"", self._carry + data
        if len(self._carry) >= self.max_line:  # a line too long to hold: replaced, the rest of it dropped
            out += self._line(self._carry) + b"\n"
            self._carry, self._skipping = b"", True
        return out

    def _check(self, lines: bytes) -> bytes:
        """Whole lines, passed through when plain (the fast path), else line by line."""
        if self.expected is None:  # the header's column count is every row's
            header = lines[: lines.find(b"\n")].rstrip(b"\r").decode("utf-8", "replace")
            self.expected = len(next(csv.reader([header], delimiter=self.fmt.delimiter), []))
        if self._plain(lines):
            self._first = False
            return lines
        return b"\n".join(self._line(line) for line in lines[:-1].split(b"\n")) + b"\n"

    def _plain(self, lines: bytes) -> bool:
        """UTF-8 text, no carriage return but in CRLF, no line longer than ``max_line``."""
        if not lines.isascii():
            try:
                lines.decode("utf-8")
            except UnicodeDecodeError:
                return False
        if b"\r" in lines and lines.count(b"\r") != lines.count(b"\r\n"):
            return False
        half = self.max_line // 2  # a newline in every aligned half-window: every line is shorter than max_line
        return all(lines.find(b"\n", k, k + half) >= 0 for k in range(0, len(lines) - half + 1, half))

    def _line(self, line: bytes) -> bytes:
        """``line`` (without its newline) or, when pyarrow cannot parse it safely, its replacement."""
        first, self._first = self._first, False
        reason = self._problem(line)
        if first and self.fmt.has_header:
            if reason is None and not _is_text(line):
                reason = "not UTF-8 text"
            if reason is not None:
                raise UserError(f"{self.where}:1: header is not the {self.fmt.name} layout: {reason}: {show_bytes(line)}")
        return line if reason is None else self._replace(reason)

    def _problem(self, line: bytes) -> str | None:
        if len(line) >= self.max_line:
            return f"line longer than {self.max_line:,} bytes (binary data?)"
        content = line[:-1] if line.endswith(b"\r") else line
        text = _is_text(content)
        if text and b"\r" not in content:
            return None
        columns = self._columns(content)
        if columns != self.expected:
            return f"expected {self.expected} columns, got {columns}" + ("" if text else " (not UTF-8 text)")
        if b"\r" in content:
            return "carriage return inside the line"
        return None  # values that are not UTF-8, in the right shape: they are bytes until a vocabulary

    def _columns(self, content: bytes) -> int:
        """The column count pyarrow finds in ``content``, a line that is not text or holds a carriage return."""
        if not self.fmt.quoted or b'"' not in content:
            return content.count(self.delimiter) + 1
        # ask pyarrow, on a copy with the same structure: bytes that are not UTF-8 (all >= 0x80) -> U+FFFD
        safe = content.decode("utf-8", "replace").replace("\r", " ").encode()
        found: list[int] = []

        def on_invalid(row: pacsv.InvalidRow) -> str:
            found.append(row.actual_columns)
            return "skip"

        assert self.expected is not None
        pacsv.read_csv(
            io.BytesIO(safe + b"\n"),
            read_options=pacsv.ReadOptions(column_names=[f"c{i}" for i in range(self.expected)], use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter=self.fmt.delimiter, quote_char='"', ignore_empty_lines=False, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(column_types={f"c{i}": pa.binary() for i in range(self.expected)}),
        )
        return found[0] if found else self.expected

    def _replace(self, reason: str) -> bytes:
        text = f"{self.mark}{self._replaced}"
        self._reasons[text] = reason
        self._replaced += 1
        return text.encode()


def _is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class RawChunk:
    """Parsed rows and the rows rejected before parsing their values.

    CSV/TSV: every column binary, empty -> null; Parquet: the file's own types.
    """

    table: pa.Table  # chunked as parsed: chunks are never concatenated
    rejected: list[tuple[int, str]]  # (line, reason) of the rows rejected before parsing their values


def missing_columns(wanted: list[str], found: list[str], where: str) -> None:
    """An error naming the ``wanted`` columns not among ``found`` (the file's real ones)."""
    missing = [c for c in wanted if c not in found]
    if missing:
        raise UserError(f"{where}: no column(s) {missing}; the file's columns are {clip(str(found), 2000)}")


def read_chunks(
    file: Any, fmt: RawFormat, where: str, block_size: int, chunk_rows: int, include: list[str] | None = None
) -> Iterator[RawChunk]:
    """Parse the raw stream ``file`` (named ``where`` in errors) into chunks of about ``chunk_rows`` rows.

    Single-threaded pyarrow parsing, ``block_size`` bytes at a time (it runs
    beside the caller through ``prefetch``), so that rejected rows come with
    their line number. Only the ``include`` columns (default: all of
    ``fmt.columns``) are converted; with a header they are found by name.
    """
    rejected: list[tuple[int, str]] = []
    lines = _Lines(file, fmt, where, max_line=block_size // 2)
    include = list(fmt.columns) if include is None else include

    def on_invalid(row: pacsv.InvalidRow) -> str:
        reason = lines.reason(row.text) or f"expected {lines.expected} columns, got {row.actual_columns}"
        rejected.append((row.number, reason))
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
        column_types={c: pa.binary() for c in include},  # bytes: no UTF-8 check (only vocabularies are text)
        include_columns=include,
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
    )
    try:
        if fmt.has_header:
            missing_columns(include, lines.header(), f"{where}:1")
        reader = pacsv.open_csv(
            lines, read_options=read_options, parse_options=parse_options, convert_options=convert_options
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
        raise UserError(f"{where}: cannot parse: {clip(str(e))}") from None
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{where}: cannot read ({type(e).__name__}: {e}); truncated or corrupt file?") from None


def _parquet(file: Any, where: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{where}: not a readable Parquet file ({type(e).__name__}: {clip(str(e))})") from None


def read_parquet_chunks(
    file: Any, where: str, columns: list[str], chunk_rows: int, check: Callable[[pa.Schema], None] = lambda s: None
) -> Iterator[RawChunk]:
    """The ``columns`` of a Parquet file, one row group (in slices of ``chunk_rows``) at a time;
    ``check`` sees the file's schema first."""
    pf = _parquet(file, where)
    missing_columns(columns, pf.schema_arrow.names, where)
    check(pf.schema_arrow)
    for g in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(g, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{where}: row group {g}: cannot read ({type(e).__name__}: {clip(str(e))})") from None
        for start in range(0, table.num_rows, chunk_rows):
            yield RawChunk(table.slice(start, chunk_rows), [])


def parquet_row_groups(file: Any, where: str) -> list[int]:
    """Row counts of a Parquet file's row groups (to name a row as row group:row in errors)."""
    meta = _parquet(file, where).metadata
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
