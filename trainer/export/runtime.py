"""Scoring runtime of an exported CTR model: ``Predictor(ARTIFACT).score_file(raw, out)``.

This file is self-contained (the standard library and torch, nothing else) and is
copied into every artifact as ``predictor.py``, so a serving host scores raw rows with
the artifact alone::

    import sys; sys.path.insert(0, "ARTIFACT")
    from predictor import Predictor
    p = Predictor("ARTIFACT")                 # checks every file's sha256 first
    p.predict_ids(ids)                        # (B, W) int64 ids -> (B,) click probabilities
    p.predict_rows([["1", "", ...]])          # raw rows without the label -> (B,)
    p.score_file("day_0.tsv", "scores.csv", labeled=False)   # raw file -> row,probability[,label]

Artifact layout (``trainer.export`` writes it; every file is listed with its sha256 in
``MANIFEST.json``)::

    program.pt2          torch.export program: ids (B, W) int64 -> probabilities (B,) float32
    feature_spec.json    the raw layout, field order and the raw value -> id transform
    vocab/FIELD.json     the field's vocabulary: token i has id first_vocab_id + i (not for a hashed field)

The ids have a column per field (W = F), except that a multi-hot field (``max_length``
L > 1 in the spec) takes L columns: its ids, then -1 (no id).
    model_card.json/.md  what the model is, where it came from, how good it is
    predictor.py         this file

Safety: nothing is loaded before the manifest matches, and the program archive is
refused if any of its tensors is stored as a pickle (plain tensors are raw bytes), so
loading it runs no pickled code.

The raw value -> id transform is the preprocessing recipe (``trainer.data.preprocess``):
an empty value is ``missing_id``; an integer field's value ``v`` becomes the token
``v - 2`` if ``v <= 2`` else ``floor(ln(v)^2)``, computed here exactly as the preprocessor's
numpy code did by the shift and thresholds in the spec (``token = v + small_shift`` for
``v <= small_max``, else ``token = number of thresholds <= v``);
a bucketed number's token is the number of boundaries <= v; the token's text is looked
up in the vocabulary, and a token not in it is ``oov_id``; a hashed field's id is
``first_vocab_id + hash % hash_buckets`` (``hash_token``, the preprocessor's hash). A
multi-hot value is cut at its separator (or is a list), empty pieces dropped, the first
``max_length`` kept.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import logging
import os
import re
import shlex
import uuid
import zipfile
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

ARTIFACT_FORMAT = 1
PROGRAM = "program.pt2"
FEATURE_SPEC = "feature_spec.json"
MANIFEST = "MANIFEST.json"
RUNTIME = "predictor.py"
_INTEGER = re.compile(r"^-?[0-9]{1,18}$")  # as the preprocessor: at most 18 digits
_NUMBER = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")  # as the preprocessor
_MASK64 = (1 << 64) - 1
_CHUNK = 1 << 20
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as ``errors="surrogateescape"`` reads them
_log = logging.getLogger("predictor")


class ArtifactError(Exception):
    """A broken or tampered artifact, or input it cannot score. The message says what and where."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_manifest(root: Path) -> dict:
    """Check that ``root`` holds exactly the files of its manifest, with their sha256; returns the manifest."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}: not an exported model (or an unfinished copy)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{manifest_path}: malformed ({type(e).__name__}: {e})") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{manifest_path}: artifact format {manifest.get('format')!r}, this runtime reads {ARTIFACT_FORMAT}")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    present.discard(MANIFEST)
    missing = sorted(set(files) - present)
    extra = sorted(present - set(files))
    if missing or extra:
        raise ArtifactError(f"{root}: files do not match {MANIFEST}: missing {missing}, not listed {extra}")
    for name, entry in sorted(files.items()):
        path = root / name
        if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: checksum mismatch with {MANIFEST}: the file was changed or truncated")
    return manifest


def check_no_pickles(program: Path) -> None:
    """Refuse a program archive that stores any tensor or constant as a pickle."""
    try:
        with zipfile.ZipFile(program) as archive:
            for name in archive.namelist():
                if name.endswith(".json") and "config" in name.rsplit("/", 1)[-1]:
                    config = json.loads(archive.read(name))
                    for fqn, payload in (config.get("config") or {}).items():
                        if isinstance(payload, dict) and payload.get("use_pickle"):
                            raise ArtifactError(f"{program}: {fqn} is stored as a pickle; refusing to load it")
            # torch.export.load retries a sample-inputs file that weights_only refuses with full
            # unpickling: make sure it never has to
            for name in archive.namelist():
                if "/sample_inputs/" in name:
                    try:
                        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                    except Exception as e:
                        raise ArtifactError(f"{program}: {name} is not weights-only loadable ({e}); refusing to load it") from None
    except (zipfile.BadZipFile, ValueError) as e:
        raise ArtifactError(f"{program}: not a torch.export archive ({e})") from None


@dataclass(frozen=True)
class RawLayout:
    """The columns of a raw row, with and without the label (scoring files usually have none)."""

    columns: tuple[str, ...]
    label: str
    delimiter: str
    has_header: bool
    quoted: bool

    @property
    def unlabeled(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c != self.label)


class FeatureTransform:
    """Raw rows -> (B, W) int64 ids, exactly as the preprocessor mapped them."""

    def __init__(self, root: Path, spec: dict):
        raw = spec["raw"]
        self.layout = RawLayout(tuple(raw["columns"]), raw["label"], raw["delimiter"], raw["has_header"], raw["quoted"])
        self.fields: list[str] = [f["name"] for f in spec["fields"]]
        self.kinds: list[str] = [f["kind"] for f in spec["fields"]]  # categorical | integer | buckets
        self.cardinalities: list[int] = [f["cardinality"] for f in spec["fields"]]
        self.max_lengths: list[int] = [f.get("max_length", 1) for f in spec["fields"]]
        self.separators: list[str | None] = [f.get("separator") for f in spec["fields"]]
        self.boundaries: list[list[float] | None] = [f.get("boundaries") for f in spec["fields"]]
        self.hash_buckets: list[int | None] = [f.get("hash_buckets") for f in spec["fields"]]
        ids = spec["ids"]
        self.oov_id, self.missing_id, self.first_id = ids["oov"], ids["missing"], ids["first_vocab_id"]
        self.thresholds: list[int] = spec["integer_token"]["thresholds"]
        self.small_max: int = spec["integer_token"]["small_max"]
        self.small_shift: int = spec["integer_token"]["small_shift"]
        self.vocab: list[dict[str, int] | None] = []
        for f in spec["fields"]:
            if f.get("vocab") is None:  # a hashed field
                self.vocab.append(None)
                continue
            path = root / f["vocab"]
            try:
                tokens = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{path}: cannot read the vocabulary of {f['name']} ({e})") from None
            if self.first_id + len(tokens) != f["cardinality"]:
                raise ArtifactError(f"{path}: {len(tokens)} tokens, but {f['name']} has cardinality {f['cardinality']}")
            self.vocab.append({t: self.first_id + i for i, t in enumerate(tokens)})
        self._numeric_tokens: list[dict[str, str]] = [{} for _ in self.fields]  # raw text -> token text, memoised

    def integer_token(self, value: int) -> int:
        if value <= self.small_max:
            return value + self.small_shift
        return bisect.bisect_right(self.thresholds, value)

    def field_positions(self, width: int, where: str, labeled: bool) -> tuple[list[int], int | None]:
        """Positions of the fields in a row of ``width`` columns with (``labeled``) or without
        the label column, and of its label (None without). The layout is given, never guessed
        from the width: a labelled row that lost a column is as wide as an unlabelled one."""
        columns = self.layout.columns if labeled else self.layout.unlabeled
        if width != len(columns):
            other = self.layout.unlabeled if labeled else self.layout.columns
            hint = (
                f" ({width} is the width {'without' if labeled else 'with'} the label: is the file "
                f"{'unlabelled' if labeled else 'labelled'}?)" if width == len(other) else ""
            )
            raise ArtifactError(
                f"{where}: expected {len(columns)} columns ({'with' if labeled else 'without'} {self.layout.label}), "
                f"got {width}{hint}"
            )
        return [columns.index(f) for f in self.fields], (columns.index(self.layout.label) if labeled else None)

    def ids(self, rows: Sequence[Sequence[Any]], positions: list[int], lines: Sequence[int] | None = None, source: str = "row") -> torch.Tensor:
        """(B, W) int64 ids of raw ``rows`` (every row as wide as the first; the fields at
        ``positions``), see ``column_ids``. ``lines`` (default 1, 2, ...) name rows in errors."""
        columns = list(zip(*rows))
        return self.column_ids([columns[p] for p in positions], len(rows), lines, source)

    def column_ids(
        self, columns: Sequence[Sequence[Any]], rows: int, lines: Sequence[int] | None = None, source: str = "row"
    ) -> torch.Tensor:
        """(B, W) int64 ids from each field's raw values (``columns[f]``, B of them): a value is
        text ("" or None = missing); a multi-hot field's value is text cut at its separator, or
        a list of texts (a Parquet list), its first ``max_length`` non-empty pieces kept and -1
        in its remaining columns."""
        out: list[list[int]] = []
        for f, values in enumerate(columns):
            if self.max_lengths[f] == 1:
                out.append(self._single_ids(f, values, lines, source))
                continue
            width, separator = self.max_lengths[f], self.separators[f]
            padded: list[list[int]] = [[] for _ in range(width)]
            for value in values:
                if value is None or value == "":
                    pieces = []
                elif isinstance(value, str):
                    if separator is None:
                        raise ArtifactError(f"{source}: {self.fields[f]} is a list column; got the text {value!r}")
                    pieces = [p for p in value.split(separator) if p]
                else:
                    pieces = [p for p in value if p is not None and p != ""]
                found = [self._token_id(f, p) for p in pieces[:width]]
                for j in range(width):
                    padded[j].append(found[j] if j < len(found) else -1)
            out.extend(padded)
        return torch.tensor(out, dtype=torch.int64).reshape(len(out), rows).t().contiguous()

    def _single_ids(self, f: int, values: Sequence[Any], lines: Sequence[int] | None, source: str) -> list[int]:
        if self.kinds[f] in ("integer", "buckets"):
            tokens = self._numeric_tokens[f]
            for r, value in enumerate(values):
                if value is not None and value != "" and value not in tokens:
                    tokens[value] = self._numeric_token(f, value, lines[r] if lines is not None else r + 1, source)
            values = [tokens.get(v, v) for v in values]
        missing = self.missing_id
        return [self._token_id(f, v) if v is not None and v != "" else missing for v in values]

    def _numeric_token(self, f: int, value: str, line: int, source: str) -> str:
        """The token text of a numeric field's raw text: the integer recipe, or the bucket index."""
        if self.kinds[f] == "integer":
            if not _INTEGER.match(value):
                raise ArtifactError(f"{source}:{line}: {self.fields[f]} {value!r} is not an integer")
            return str(self.integer_token(int(value)))
        if not _NUMBER.fullmatch(value):
            raise ArtifactError(f"{source}:{line}: {self.fields[f]} {value!r} is not a number")
        return str(bisect.bisect_right(self.boundaries[f], float(value)))

    def _token_id(self, f: int, token: str) -> int:
        vocab = self.vocab[f]
        if vocab is not None:
            return vocab.get(token, self.oov_id)
        return self.first_id + hash_token(token.encode()) % self.hash_buckets[f]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_token(token: bytes) -> int:
    """The preprocessor's 64-bit token hash (``trainer.data.hashing``): the bytes cut into
    little-endian 8-byte words, the last zero-padded, folded by splitmix64 from the byte length."""
    h = len(token)
    for start in range(0, len(token), 8):
        h = _splitmix64(h ^ int.from_bytes(token[start : start + 8].ljust(8, b"\0"), "little"))
    return h


class Predictor:
    """Loads an artifact (after checking its manifest) and scores ids or raw rows.

    Args:
        artifact (str | Path): the artifact directory.
        num_threads (int | None): torch intra-op threads (default: torch's choice).
    """

    def __init__(self, artifact: str | os.PathLike, num_threads: int | None = None):
        self.root = Path(artifact)
        if not self.root.is_dir():
            raise ArtifactError(f"artifact not found: {self.root}")
        self.manifest = verify_manifest(self.root)
        try:
            self.spec = json.loads((self.root / FEATURE_SPEC).read_text())
            self.card = json.loads((self.root / "model_card.json").read_text())
        except ValueError as e:
            raise ArtifactError(f"{self.root}: malformed JSON ({e})") from None
        self.transform = FeatureTransform(self.root, self.spec)
        self.fields = self.transform.fields
        self.max_lengths: list[int] = self.transform.max_lengths
        self.width = sum(self.max_lengths)  # the program's ids columns
        # per column: its field, the field's cardinality and its lowest id (-1 = no id, in a multi-hot field)
        self._column_field = [f for f, n in enumerate(self.max_lengths) for _ in range(n)]
        self._cardinalities = torch.tensor([self.transform.cardinalities[f] for f in self._column_field], dtype=torch.int64)
        self._lowest = torch.tensor([-1 if self.max_lengths[f] > 1 else 0 for f in self._column_field], dtype=torch.int64)
        check_no_pickles(self.root / PROGRAM)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.program = torch.export.load(str(self.root / PROGRAM)).module()

    def predict_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids (torch.Tensor): (B, W) int64: field ``fields[f]`` takes ``max_lengths[f]``
                consecutive columns (one per field without multi-hot fields); a multi-hot
                field's columns hold its ids and -1 for no id.

        Returns:
            torch.Tensor: (B,) float32 click probabilities.
        """
        if ids.dim() != 2 or ids.shape[1] != self.width or ids.dtype != torch.int64:
            raise ArtifactError(f"ids: expected a (B, {self.width}) int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[0] == 0:
            return torch.zeros(0)
        bad = (ids < self._lowest) | (ids >= self._cardinalities)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            field = self._column_field[col]
            raise ArtifactError(
                f"ids[{row}, {col}] = {int(ids[row, col])}: outside [{int(self._lowest[col])}, "
                f"{int(self._cardinalities[col])}) of {self.fields[field]}"
            )
        with torch.no_grad():
            return self.program(ids)

    def predict_rows(
        self, rows: Sequence[Sequence[str]], labeled: bool = False, source: str = "row", lines: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Raw rows (split into values; all without the label column, or all with it when
        ``labeled``) -> (B,) probabilities."""
        if not rows:
            return torch.zeros(0)
        return self.predict_ids(self._ids(rows, labeled, source, lines)[0])

    def _ids(
        self, rows: Sequence[Sequence[str]], labeled: bool, source: str, lines: Sequence[int] | None
    ) -> tuple[torch.Tensor, int | None]:
        """(ids, position of the label or None) of rows in the given layout."""
        line_of = (lambda r: lines[r]) if lines is not None else (lambda r: r + 1)
        width = len(rows[0])
        positions, label = self.transform.field_positions(width, f"{source}:{line_of(0)}", labeled)
        for r, row in enumerate(rows):
            if len(row) != width:
                self.transform.field_positions(len(row), f"{source}:{line_of(r)}", labeled)  # raises
        return self.transform.ids(rows, positions, lines, source), label

    def read_rows(self, path: str | os.PathLike, labeled: bool | None = None) -> tuple[bool, Iterator[tuple[int, list[str]]]]:
        """Whether the rows of the raw file ``path`` have the label column, and an iterator of
        its data rows (line number, values). With a header the header says (and ``labeled``,
        when given, must agree); without one ``labeled`` must say."""
        layout = self.transform.layout
        f = _open_text(path)
        reader = csv.reader(
            f, delimiter=layout.delimiter, quoting=csv.QUOTE_MINIMAL if layout.quoted else csv.QUOTE_NONE, strict=True
        )
        try:
            if layout.has_header:
                header = tuple(next(reader, None) or ())
                if header and header not in (layout.columns, layout.unlabeled):
                    raise ArtifactError(
                        f"{path}:1: header is not the model's layout: expected {layout.delimiter.join(layout.columns)} "
                        f"(the {layout.label} column optional), got "
                        f"{_excerpt(layout.delimiter.join(header).encode('utf-8', 'surrogateescape'), 300)}"
                    )
                has_label = header == layout.columns if header else bool(labeled)
                if labeled is not None and header and labeled != has_label:
                    raise ArtifactError(
                        f"{path}:1: the header {'has' if has_label else 'has no'} {layout.label} column, but the file "
                        f"was given as {'labelled' if labeled else 'unlabelled'}"
                    )
            elif labeled is None:
                raise ArtifactError(
                    f"{path}: this layout has no header, so say whether its rows have the {layout.label} column "
                    f"(--labeled or --unlabeled): {len(layout.columns)} and {len(layout.unlabeled)} columns are both "
                    "possible widths, and a guess would shift every feature of a row that lost a column"
                )
            else:
                has_label = labeled
        except BaseException:
            f.close()
            raise
        return has_label, _rows(f, reader, path)

    def score_file(
        self,
        input_path: str | os.PathLike,
        output_path: str | os.PathLike,
        batch_rows: int = 8192,
        labeled: bool | None = None,
        overwrite: bool = False,
    ) -> int:
        """Score every row of the raw text file ``input_path`` into ``output_path`` (CSV
        ``row,probability[,label]``, written under a temporary name and renamed when complete).
        ``labeled``: whether the rows have the label column (required when the layout has no
        header; see ``read_rows``). An existing output is an error unless ``overwrite``.
        Returns the row count."""
        output = self.check_output(output_path, overwrite, input_path)
        has_label, rows = self.read_rows(input_path, labeled)

        def batches() -> Iterator[tuple[torch.Tensor, list[str] | None]]:
            for lines, batch in _batches(rows, batch_rows):
                ids, label = self._ids(batch, has_label, str(input_path), lines)
                yield ids, None if label is None else [row[label] for row in batch]

        try:
            return self.write_scores(output, batches(), has_label)
        finally:
            rows.close()

    def check_output(self, output_path: str | os.PathLike, overwrite: bool, input_path: str | os.PathLike | None = None) -> Path:
        """The output path, after checking that it can be written, is not the input (not even
        with ``overwrite``) and may be replaced. Temporaries that killed runs left beside it
        are reported with their size and how to remove them."""
        output = Path(output_path)
        if not output.parent.is_dir():
            raise ArtifactError(f"cannot write {output}: its directory {output.parent} does not exist")
        if input_path is not None and output.exists() and os.path.exists(input_path) and os.path.samefile(output, input_path):
            raise ArtifactError(f"output {output} is the input {input_path}: scoring would destroy it; choose another output")
        if output.exists() and not overwrite:
            raise ArtifactError(f"output already exists: {output} (remove it or pass --overwrite)")
        stale = sorted(output.parent.glob(f".{glob_escape(output.name)}.tmp-*"))
        if stale:
            size = sum(p.stat().st_size for p in stale if p.is_file())
            _log.warning(
                "%d temporar%s of %s left by a killed run (or one still running), %d bytes: if no run is writing %s, "
                "remove %s: rm %s",
                len(stale), "y" if len(stale) == 1 else "ies", output, size, output,
                "it" if len(stale) == 1 else "them", " ".join(shlex.quote(str(p)) for p in stale),
            )  # fmt: skip
        return output

    def write_scores(self, output: Path, batches: Iterable[tuple[torch.Tensor, list[str] | None]], has_label: bool) -> int:
        """Write ``row,probability[,label]`` for batches of (ids (B, W), labels or None) into
        ``output`` (under a temporary name, renamed when complete); returns the row count."""
        tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
        count = 0
        try:
            with open(tmp, "w", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(["row", "probability"] + (["label"] if has_label else []))
                for ids, labels in batches:
                    probabilities = self.predict_ids(ids).tolist()
                    if labels is None:
                        writer.writerows([count + i, f"{p:.9g}"] for i, p in enumerate(probabilities))
                    else:
                        writer.writerows([count + i, f"{p:.9g}", y] for i, (p, y) in enumerate(zip(probabilities, labels)))
                    count += len(probabilities)
            os.replace(tmp, output)
        finally:
            if tmp.exists():
                tmp.unlink()
        return count


def _rows(f: Any, reader: Any, path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """(line number, values) of the rest of ``reader``; closes ``f`` at the end. A row that
    is not UTF-8 text (``_open_text`` keeps its bytes as surrogates) is an error naming its line."""
    with f:
        try:
            for row in reader:
                if not "".join(row).isascii() and _NOT_UTF8.search("".join(row)):
                    text = reader.dialect.delimiter.join(row).encode("utf-8", "surrogateescape")
                    raise ArtifactError(f"{path}:{reader.line_num}: not UTF-8 text: {_excerpt(text)}")
                yield reader.line_num, row
        except csv.Error as e:
            raise ArtifactError(f"{path}:{reader.line_num}: {e}") from None


def _excerpt(raw: bytes, limit: int = 60) -> str:
    """``raw`` for a terminal: its first ``limit`` bytes, escaped (no control characters, no raw bytes)."""
    return repr(raw[:limit])[1:] + (f" ... ({len(raw)} bytes)" if len(raw) > limit else "")


def _batches(rows: Iterable[tuple[int, list[str]]], size: int) -> Iterator[tuple[list[int], list[list[str]]]]:
    lines: list[int] = []
    batch: list[list[str]] = []
    for line, row in rows:
        lines.append(line)
        batch.append(row)
        if len(batch) == size:
            yield lines, batch
            lines, batch = [], []
    if batch:
        yield lines, batch


def _open_text(path: str | os.PathLike):
    path = str(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"input not found: {path}")
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", newline="", encoding="utf-8", errors="surrogateescape")
    return open(path, newline="", encoding="utf-8", errors="surrogateescape")
