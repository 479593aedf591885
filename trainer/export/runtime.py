"""Scoring runtime of an exported CTR model: ``Predictor(ARTIFACT).score_file(raw, out)``.

This file is self-contained (the standard library and torch, nothing else) and is
copied into every artifact as ``predictor.py``, so a serving host scores raw rows with
the artifact alone::

    import sys; sys.path.insert(0, "ARTIFACT")
    from predictor import Predictor
    p = Predictor("ARTIFACT")                 # checks every file's sha256 first
    p.predict_ids(ids)                        # (B, F) int64 ids -> (B,) click probabilities
    p.predict_rows([["1", "", ...]])          # raw rows without the label -> (B,)
    p.score_file("day_0.tsv", "scores.csv", labeled=False)   # raw file -> row,probability[,label]

Artifact layout (``trainer.export`` writes it; every file is listed with its sha256 in
``MANIFEST.json``)::

    program.pt2          torch.export program: ids (B, F) int64 -> probabilities (B,) float32
    feature_spec.json    the raw layout, field order and the raw value -> id transform
    vocab/FIELD.json     the field's vocabulary: token i has id first_vocab_id + i
    model_card.json/.md  what the model is, where it came from, how good it is
    predictor.py         this file

Safety: nothing is loaded before the manifest matches, and the program archive is
refused if any of its tensors is stored as a pickle (plain tensors are raw bytes), so
loading it runs no pickled code.

The raw value -> id transform is the preprocessing recipe (``trainer.data.preprocess``):
an empty value is ``missing_id``; an integer field's value ``v`` becomes the token
``v`` if ``v <= 2`` else ``floor(ln(v)^2)``, computed here exactly as the preprocessor's
numpy code did by the thresholds in the spec (``token = number of thresholds <= v``);
the token's text is looked up in the vocabulary, and a token not in it is ``oov_id``.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import os
import re
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

ARTIFACT_FORMAT = 1
PROGRAM = "program.pt2"
FEATURE_SPEC = "feature_spec.json"
MANIFEST = "MANIFEST.json"
RUNTIME = "predictor.py"
_INTEGER = re.compile(r"^-?[0-9]{1,18}$")  # as the preprocessor: at most 18 digits
_CHUNK = 1 << 20


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
    """Raw rows -> (B, F) int64 ids, exactly as the preprocessor mapped them."""

    def __init__(self, root: Path, spec: dict):
        raw = spec["raw"]
        self.layout = RawLayout(tuple(raw["columns"]), raw["label"], raw["delimiter"], raw["has_header"], raw["quoted"])
        self.fields: list[str] = [f["name"] for f in spec["fields"]]
        self.kinds: list[str] = [f["kind"] for f in spec["fields"]]
        self.cardinalities: list[int] = [f["cardinality"] for f in spec["fields"]]
        ids = spec["ids"]
        self.oov_id, self.missing_id, first = ids["oov"], ids["missing"], ids["first_vocab_id"]
        self.thresholds: list[int] = spec["integer_token"]["thresholds"]
        self.identity_max: int = spec["integer_token"]["identity_max"]
        self.vocab: list[dict[str, int]] = []
        for f in spec["fields"]:
            path = root / f["vocab"]
            try:
                tokens = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{path}: cannot read the vocabulary of {f['name']} ({e})") from None
            if first + len(tokens) != f["cardinality"]:
                raise ArtifactError(f"{path}: {len(tokens)} tokens, but {f['name']} has cardinality {f['cardinality']}")
            self.vocab.append({t: first + i for i, t in enumerate(tokens)})
        self._integer_tokens: list[dict[str, str]] = [{} for _ in self.fields]  # raw text -> token text, memoised

    def integer_token(self, value: int) -> int:
        return value if value <= self.identity_max else bisect.bisect_right(self.thresholds, value)

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

    def ids(self, rows: Sequence[Sequence[str]], positions: list[int], lines: Sequence[int] | None = None, source: str = "row") -> torch.Tensor:
        """(B, F) int64 ids of raw ``rows`` (value strings, "" = missing; every row as wide as
        the first), column by column. ``lines`` (default 1, 2, ...) name rows in errors."""
        columns = list(zip(*rows))
        out = []
        for f, p in enumerate(positions):
            values = columns[p]
            vocab, missing, oov = self.vocab[f], self.missing_id, self.oov_id
            if self.kinds[f] == "integer":
                tokens = self._integer_tokens[f]
                for r, value in enumerate(values):
                    if value not in tokens and value != "":
                        if not _INTEGER.match(value):
                            line = lines[r] if lines is not None else r + 1
                            raise ArtifactError(f"{source}:{line}: {self.fields[f]} {value!r} is not an integer")
                        tokens[value] = str(self.integer_token(int(value)))
                values = [tokens.get(v, v) for v in values]
            out.append([vocab.get(v, oov) if v != "" else missing for v in values])
        return torch.tensor(out, dtype=torch.int64).reshape(len(positions), len(rows)).t().contiguous()


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
        self._cardinalities = torch.tensor(self.transform.cardinalities, dtype=torch.int64)
        check_no_pickles(self.root / PROGRAM)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.program = torch.export.load(str(self.root / PROGRAM)).module()

    def predict_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids (torch.Tensor): (B, F) int64, column f = the id of field ``fields[f]``.

        Returns:
            torch.Tensor: (B,) float32 click probabilities.
        """
        if ids.dim() != 2 or ids.shape[1] != len(self.fields) or ids.dtype != torch.int64:
            raise ArtifactError(f"ids: expected a (B, {len(self.fields)}) int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[0] == 0:
            return torch.zeros(0)
        bad = (ids < 0) | (ids >= self._cardinalities)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ArtifactError(
                f"ids[{row}, {col}] = {int(ids[row, col])}: outside [0, {int(self._cardinalities[col])}) of {self.fields[col]}"
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
                        f"(the {layout.label} column optional), got {layout.delimiter.join(header)}"
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
        """Score every row of ``input_path`` into ``output_path`` (CSV ``row,probability[,label]``,
        written under a temporary name and renamed when complete). ``labeled``: whether the rows
        have the label column (required when the layout has no header; see ``read_rows``). An
        existing output is an error unless ``overwrite``. Returns the row count."""
        output = Path(output_path)
        if not output.parent.is_dir():
            raise ArtifactError(f"cannot write {output}: its directory {output.parent} does not exist")
        if output.exists() and not overwrite:
            raise ArtifactError(f"output already exists: {output} (remove it or pass --overwrite)")
        has_label, rows = self.read_rows(input_path, labeled)
        tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
        count = 0
        try:
            with open(tmp, "w", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(["row", "probability"] + (["label"] if has_label else []))
                for lines, batch in _batches(rows, batch_rows):
                    ids, label = self._ids(batch, has_label, str(input_path), lines)
                    probabilities = self.predict_ids(ids).tolist()
                    if label is None:
                        writer.writerows([count + i, f"{p:.9g}"] for i, p in enumerate(probabilities))
                    else:
                        writer.writerows([count + i, f"{p:.9g}", row[label]] for i, (p, row) in enumerate(zip(probabilities, batch)))
                    count += len(batch)
            os.replace(tmp, output)
        finally:
            rows.close()
            if tmp.exists():
                tmp.unlink()
        return count


def _rows(f: Any, reader: Any, path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """(line number, values) of the rest of ``reader``; closes ``f`` at the end."""
    with f:
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as e:
            raise ArtifactError(f"{path}:{reader.line_num}: {e}") from None


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

        return gzip.open(path, "rt", newline="")
    return open(path, newline="")
