"""The dataset spec: a YAML file that says how raw logs become a prepared dataset.

Read by ``python -m trainer.data.preprocess --spec FILE``; ``--dataset NAME`` is
short for the shipped ``configs/datasets/NAME.yaml``. Example (Criteo's Kaggle TSV)::

    name: criteo
    input: {format: tsv, paths: train.txt, header: false, quoted: false}
    columns:                      # no header: every file column, in file order
      - {name: label, type: label}
      - {name: I1, type: numeric, token: criteo_log, dense: log1p}
      - {name: C1, type: categorical}
    defaults: {min_count: 10}
    split: {kind: random, ratios: [8, 1, 1], seed: 0}

Column types: ``label`` (0/1), ``categorical`` (one id: a vocabulary cut at
``min_count``, or ``hash_buckets`` ids by a stable hash with no vocabulary),
``multi_hot`` (0 to ``max_length`` ids a row, pooled by ``pooling``: a text
value cut at ``separator``, or a Parquet list column), ``numeric`` (a token field
by ``token`` -- ``criteo_log`` or ``buckets`` with ``boundaries`` -- and/or a
dense feature by ``dense``), ``ignore``. Splits: ``random`` (ratios + seed, by
row), ``time`` (a column against cut points), ``files`` (globs per split; a file
listed under several splits has its rows spread over them by ``ratios``).
Errors name the key path (``spec.yaml: columns[3].pooling``) and the allowed values.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.data.schema import LABEL_COLUMN
from trainer.errors import UserError
from trainer.typed_yaml import build

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "configs" / "datasets"
FORMATS = ("csv", "tsv", "parquet")
COLUMN_TYPES = ("label", "categorical", "multi_hot", "numeric", "ignore")
SPLIT_KINDS = ("random", "time", "files")
# which optional column keys each type takes (name and type: every type)
_COLUMN_KEYS = {
    "label": set(),
    "categorical": {"min_count", "hash_buckets"},
    "multi_hot": {"min_count", "hash_buckets", "separator", "max_length", "pooling"},
    "numeric": {"min_count", "token", "boundaries", "dense"},
    "ignore": set(),
}


@dataclass(frozen=True)
class InputSpec:
    format: Literal["csv", "tsv", "parquet"] = field(metadata={"doc": "file format"})
    paths: list[str] = field(
        default_factory=list, metadata={"doc": "a path, a glob or a list of them (fsspec URLs; compression by suffix)"}
    )
    header: bool = field(default=False, metadata={"doc": "csv/tsv: the first line names the columns"})
    delimiter: str | None = field(default=None, metadata={"doc": 'csv/tsv: default "," for csv, "\\t" for tsv'})
    quoted: bool = field(default=True, metadata={"doc": 'csv/tsv: values may be "quoted"'})

    @property
    def sep(self) -> str:
        return self.delimiter or ("\t" if self.format == "tsv" else ",")


@dataclass(frozen=True)
class ColumnSpec:
    name: str = field(metadata={"doc": "the column's name (header, parquet) or its name in file order (no header)"})
    type: Literal["label", "categorical", "multi_hot", "numeric", "ignore"] = field(metadata={"doc": "what it is"})
    min_count: int | None = field(default=None, metadata={"doc": "train tokens rarer than this -> OOV id"})
    hash_buckets: int | None = field(default=None, metadata={"doc": "ids by a stable hash into this many buckets"})
    separator: str | None = field(default=None, metadata={"doc": "multi_hot text value: what separates ids"})
    max_length: int = field(default=1, metadata={"doc": "multi_hot: ids kept per row (the first ones)"})
    pooling: Literal["sum", "mean"] = field(default="sum", metadata={"doc": "multi_hot: how ids become one vector"})
    token: Literal["criteo_log", "buckets"] | None = field(
        default=None, metadata={"doc": "numeric -> token field: criteo_log (integers) or buckets (boundaries)"}
    )
    boundaries: list[float] | None = field(default=None, metadata={"doc": "token buckets: sorted cut points"})
    dense: Literal["log1p", "identity"] | None = field(
        default=None, metadata={"doc": "numeric -> dense feature: log1p(max(v, 0)) or v; missing -> 0"}
    )

    @property
    def is_field(self) -> bool:
        """Whether it becomes a sparse field of the dataset."""
        return self.type in ("categorical", "multi_hot") or (self.type == "numeric" and self.token is not None)


@dataclass(frozen=True)
class Defaults:
    min_count: int = field(default=1, metadata={"doc": "the min_count of fields that set none"})


@dataclass(frozen=True)
class TimeSplit:
    column: str = field(metadata={"doc": "the timestamp column (any type but multi_hot; may be ignore)"})
    train_before: Any = field(metadata={"doc": "rows with time < this -> train"})
    val_before: Any = field(metadata={"doc": "rows with train_before <= time < this -> val; the rest -> test"})


@dataclass(frozen=True)
class SplitSpec:
    kind: Literal["random", "time", "files"] = field(default="random", metadata={"doc": "how rows get a split"})
    ratios: list[float] = field(
        default_factory=lambda: [8.0, 1.0, 1.0], metadata={"doc": "random: train,val,test proportions"}
    )
    seed: int = field(default=0, metadata={"doc": "random split seed"})
    time: TimeSplit | None = field(default=None, metadata={"doc": "kind time: column and cut points"})
    files: dict[str, list[str]] | None = field(
        default=None, metadata={"doc": "kind files: split -> globs of input files (matched against the paths)"}
    )


@dataclass(frozen=True)
class DatasetSpec:
    name: str = field(metadata={"doc": "the dataset's name (schema.json's dataset)"})
    input: InputSpec = field(metadata={"doc": "where and how to read"})
    columns: list[ColumnSpec] = field(metadata={"doc": "the columns (no header: every file column, in order)"})
    defaults: Defaults = field(default_factory=Defaults, metadata={"doc": "per-field defaults"})
    split: SplitSpec = field(default_factory=SplitSpec, metadata={"doc": "train/val/test assignment"})

    @property
    def label(self) -> ColumnSpec:
        return next(c for c in self.columns if c.type == "label")

    @property
    def fields(self) -> list[ColumnSpec]:
        """The sparse fields, in column order."""
        return [c for c in self.columns if c.is_field]

    @property
    def dense_columns(self) -> list[ColumnSpec]:
        return [c for c in self.columns if c.type == "numeric" and c.dense is not None]

    def min_count(self, column: ColumnSpec) -> int:
        return self.defaults.min_count if column.min_count is None else column.min_count

    def read_columns(self) -> list[str]:
        """The file columns the preprocessor reads (not the ignored ones unless the time split needs it)."""
        time_column = self.split.time.column if self.split.kind == "time" and self.split.time else None
        return [c.name for c in self.columns if c.type != "ignore" or c.name == time_column]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "DatasetSpec":
        return dataclasses.replace(self, **changes)


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and validate a spec file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read dataset spec {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    return spec_from_dict(raw, str(path))


def shipped_spec(name: str) -> DatasetSpec:
    """``configs/datasets/NAME.yaml``."""
    path = SHIPPED_DIR / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"unknown dataset {name!r}; shipped specs: {shipped_names()}")
    return load_spec(path)


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def spec_from_dict(raw: Any, where: str) -> DatasetSpec:
    """Build and check a spec from parsed YAML; every error names ``where: key.path``."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with keys name, input, columns")
    raw = dict(raw)
    if isinstance(raw.get("input"), dict) and isinstance(raw["input"].get("paths"), str):
        raw["input"] = {**raw["input"], "paths": [raw["input"]["paths"]]}
    split = raw.get("split")
    if isinstance(split, dict) and isinstance(split.get("time"), dict):  # YAML reads 2026-01-04 as a date
        time = {k: v.isoformat() if isinstance(v, (datetime.date, datetime.datetime)) else v
                for k, v in split["time"].items()}  # fmt: skip
        raw["split"] = {**split, "time": time}
    if isinstance(raw.get("columns"), list):
        for i, c in enumerate(raw["columns"]):
            _check_column_keys(c, f"{where}: columns[{i}]")
    try:
        spec = build(DatasetSpec, raw, where=where)
    except UserError as e:  # typed_yaml writes "where.key.path": the spec's errors read "where: key.path"
        text = str(e)
        raise UserError(f"{where}: {text[len(where) + 1:]}" if text.startswith(where + ".") else text) from None
    _validate(spec, where)
    return spec


def _check_column_keys(raw: Any, where: str) -> None:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping like {{name: C1, type: categorical}}, got {raw!r}")
    kind = raw.get("type")
    if kind not in COLUMN_TYPES:
        raise UserError(f"{where}.type: {kind!r} is not one of {list(COLUMN_TYPES)}")
    allowed = _COLUMN_KEYS[kind]
    extra = sorted(set(raw) - {"name", "type"} - allowed)
    known = {f.name for f in dataclasses.fields(ColumnSpec)}
    if extra and set(extra) <= known:
        raise UserError(
            f"{where} ({raw.get('name')}, {kind}): key(s) {extra} do not apply to a {kind} column; "
            f"it takes {sorted(allowed | {'name', 'type'})}"
        )


def _validate(spec: DatasetSpec, where: str) -> None:
    names = [c.name for c in spec.columns]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{where}: columns: names {dup} appear more than once")
    labels = [i for i, c in enumerate(spec.columns) if c.type == "label"]
    if len(labels) != 1:
        raise UserError(f"{where}: columns: exactly one column must have type label, found {len(labels)}")
    reserved = {LABEL_COLUMN, "dense"} - {spec.label.name}
    for i, c in enumerate(spec.columns):
        at = f"{where}: columns[{i}]"
        if c.is_field and c.name in reserved:
            raise UserError(f"{at}.name: {c.name!r} is reserved for the prepared dataset's own columns")
        if c.min_count is not None and c.min_count < 1:
            raise UserError(f"{at}.min_count: must be >= 1, got {c.min_count}")
        if c.hash_buckets is not None and c.hash_buckets < 1:
            raise UserError(f"{at}.hash_buckets: must be >= 1, got {c.hash_buckets}")
        if c.hash_buckets is not None and c.min_count is not None:
            raise UserError(f"{at}: set min_count or hash_buckets, not both")
        if c.type == "multi_hot":
            if c.max_length < 2:
                raise UserError(f"{at}.max_length: a multi_hot column needs max_length >= 2, got {c.max_length}")
            if spec.input.format != "parquet" and not c.separator:
                raise UserError(f"{at}.separator: a multi_hot column of a {spec.input.format} file needs a separator")
            if c.separator is not None and c.separator == spec.input.sep:
                raise UserError(f"{at}.separator: {c.separator!r} is the file's delimiter")
        if c.type == "numeric":
            if c.token is None and c.dense is None:
                raise UserError(f"{at}: a numeric column needs token (criteo_log | buckets) and/or dense (log1p | identity)")
            if (c.token == "buckets") != (c.boundaries is not None):
                raise UserError(f"{at}.boundaries: set exactly when token is buckets")
            if c.boundaries is not None and (not c.boundaries or sorted(set(c.boundaries)) != list(c.boundaries)):
                raise UserError(f"{at}.boundaries: must be strictly increasing and not empty, got {c.boundaries}")
            if c.token is None and c.min_count is not None:
                raise UserError(f"{at}.min_count: only for a numeric column with a token")
    if not spec.fields:
        raise UserError(f"{where}: columns: no sparse field (categorical, multi_hot, or numeric with a token)")
    if spec.defaults.min_count < 1:
        raise UserError(f"{where}: defaults.min_count: must be >= 1, got {spec.defaults.min_count}")
    if spec.input.format == "parquet" and (spec.input.header or spec.input.delimiter is not None):
        raise UserError(f"{where}: input: header and delimiter are for csv/tsv, not parquet")
    if spec.input.delimiter is not None and len(spec.input.delimiter) != 1:
        raise UserError(f"{where}: input.delimiter: one character, got {spec.input.delimiter!r}")
    _validate_split(spec, names, where)


def _validate_split(spec: DatasetSpec, names: list[str], where: str) -> None:
    s = spec.split
    r = s.ratios
    if len(r) != 3 or any(x < 0 for x in r) or sum(r) <= 0:
        raise UserError(f"{where}: split.ratios: three non-negative numbers like [8, 1, 1], got {r}")
    if s.kind == "random" and r[0] == 0:
        raise UserError(f"{where}: split.ratios: the train part must be positive, got {r}")
    if s.kind == "time":
        if s.time is None:
            raise UserError(f"{where}: split.time: kind time needs {{column, train_before, val_before}}")
        if s.time.column not in names:
            raise UserError(f"{where}: split.time.column: {s.time.column!r} is not a column; columns are {names}")
        if next(c for c in spec.columns if c.name == s.time.column).type == "multi_hot":
            raise UserError(
                f"{where}: split.time.column: {s.time.column!r} is multi_hot; "
                "the time column is a label, categorical, numeric or ignore column"
            )
        cuts = (s.time.train_before, s.time.val_before)
        if any(isinstance(v, bool) or not isinstance(v, (int, float, str)) for v in cuts):
            raise UserError(f"{where}: split.time: train_before and val_before are numbers or ISO timestamps")
        if type(cuts[0]) is not type(cuts[1]) and not all(isinstance(v, (int, float)) for v in cuts):
            raise UserError(f"{where}: split.time: train_before and val_before must both be numbers or both text")
        if cuts[0] > cuts[1]:
            raise UserError(f"{where}: split.time: train_before {cuts[0]!r} is after val_before {cuts[1]!r}")
    elif s.time is not None:
        raise UserError(f"{where}: split.time: only with kind time (kind is {s.kind})")
    if s.kind == "files":
        if not s.files:
            raise UserError(f"{where}: split.files: kind files needs {{train: [globs], val: [...], test: [...]}}")
        bad = sorted(set(s.files) - {"train", "val", "test"})
        if bad:
            raise UserError(f"{where}: split.files: unknown split(s) {bad}; allowed: ['train', 'val', 'test']")
        if not s.files.get("train"):
            raise UserError(f"{where}: split.files.train: no globs; train needs files")
    elif s.files is not None:
        raise UserError(f"{where}: split.files: only with kind files (kind is {s.kind})")
