"""The on-disk contract of a prepared dataset (``schema.json`` + parquet splits).

Layout written by ``trainer.data.preprocess`` and ``trainer.data.synthetic --format parquet``::

    DATASET/
      schema.json            # DatasetSchema below
      vocab/FIELD.parquet    # preprocess only: token (string) -> id (int32), count
      train/part-00000.parquet, part-00001.parquet, ...
      val/...
      test/...

Parquet columns of every split file:

- ``label``: int8, 0 or 1
- one column per sparse field, named by the field, ids in ``[0, cardinality)``: int32
  for a single-valued field (``max_length`` 1), ``list<int32>`` for a multi-hot
  field (``max_length`` > 1: 0 to ``max_length`` ids per row, already truncated;
  an empty list is a row without ids), pooled into one vector by ``pooling``
- ``dense``: fixed_size_list<float32>[len(dense_fields)], only when there are dense fields
- extra float32 columns listed in ``extra_columns`` (synthetic data: ``p_true``,
  the planted click probability)

Id conventions of preprocessed data: ``OOV_ID`` (0) for values unseen in train
or rarer than the min-count, ``MISSING_ID`` (1) for an empty value, then the
vocabulary by descending train count. A hashed field (``hash_buckets`` in the
dataset spec) keeps the same two reserved ids, then its buckets.

Schema version 2 added ``max_length`` and ``pooling``; version 1 files (every
field single-valued) are still read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import UserError
from trainer.storage import filesystem, join

SPLITS = ("train", "val", "test")
LABEL_COLUMN = "label"
DENSE_COLUMN = "dense"
OOV_ID = 0
MISSING_ID = 1
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no max_length / pooling, every field single-valued
POOLINGS = ("sum", "mean")


@dataclass(frozen=True)
class SparseField:
    """A categorical field: ids in ``[0, cardinality)``; up to ``max_length`` ids per row, pooled by ``pooling``."""

    name: str
    cardinality: int
    max_length: int = 1  # 1: one id per row (an int32 column); > 1: a multi-hot field (a list<int32> column)
    pooling: str = "sum"  # "sum" | "mean": how a multi-hot field's embeddings become one vector

    @property
    def multi_hot(self) -> bool:
        return self.max_length > 1


@dataclass(frozen=True)
class SplitInfo:
    """One split: its row count and parquet files (relative to the dataset root)."""

    rows: int
    files: list[str]


@dataclass(frozen=True)
class DatasetSchema:
    dataset: str  # "criteo" | "avazu" | "synthetic"
    sparse_fields: list[SparseField]
    dense_fields: list[str]
    splits: dict[str, SplitInfo]
    recipe: dict[str, Any] = field(default_factory=dict)  # how it was made (flags, seed, bad rows...)
    extra_columns: list[str] = field(default_factory=list)
    version: int = SCHEMA_VERSION

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.sparse_fields]

    def cardinality(self, name: str) -> int:
        for f in self.sparse_fields:
            if f.name == name:
                return f.cardinality
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "schema.json") -> "DatasetSchema":
        try:
            if raw.get("version") not in READABLE_VERSIONS:
                raise UserError(
                    f"{where}: schema version {raw.get('version')!r}, this code reads {list(READABLE_VERSIONS)}"
                )
            schema = cls(
                dataset=str(raw["dataset"]),
                sparse_fields=[
                    SparseField(
                        str(f["name"]), int(f["cardinality"]), int(f.get("max_length", 1)), str(f.get("pooling", "sum"))
                    )
                    for f in raw["sparse_fields"]
                ],
                dense_fields=[str(d) for d in raw["dense_fields"]],
                splits={k: SplitInfo(int(v["rows"]), [str(p) for p in v["files"]]) for k, v in raw["splits"].items()},
                recipe=dict(raw.get("recipe", {})),
                extra_columns=[str(c) for c in raw.get("extra_columns", [])],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: malformed schema ({type(e).__name__}: {e})") from None
        schema.validate(where)
        return schema

    def validate(self, where: str = "schema.json") -> None:
        names = self.field_names
        if not names:
            raise UserError(f"{where}: no sparse fields")
        if len(set(names)) != len(names):
            raise UserError(f"{where}: duplicate sparse field names")
        bad = [f.name for f in self.sparse_fields if f.cardinality < 1]
        if bad:
            raise UserError(f"{where}: fields with cardinality < 1: {bad}")
        bad = [f.name for f in self.sparse_fields if f.max_length < 1]
        if bad:
            raise UserError(f"{where}: fields with max_length < 1: {bad}")
        bad = [f.name for f in self.sparse_fields if f.pooling not in POOLINGS]
        if bad:
            raise UserError(f"{where}: fields with a pooling other than {list(POOLINGS)}: {bad}")
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise UserError(f"{where}: unknown splits {sorted(unknown)}; expected {list(SPLITS)}")


def write_schema(dataset_url: str, schema: DatasetSchema) -> None:
    schema.validate()
    fs, path = filesystem(join(dataset_url, "schema.json"))
    with fs.open(path, "w") as f:
        f.write(schema.to_json())


def read_schema(dataset_url: str) -> DatasetSchema:
    """Read and validate ``DATASET/schema.json``; a clear error when missing or malformed."""
    url = join(dataset_url, "schema.json")
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise UserError(f"no schema.json in {dataset_url}: not a prepared dataset (run trainer.data.preprocess or trainer.data.synthetic first)")
    try:
        with fs.open(path, "r") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{url}: not valid JSON ({e})") from None
    return DatasetSchema.from_dict(raw, where=url)
