"""The feature spec of an artifact: how a raw row becomes the program's (B, W) ids.

Built from a preprocessed dataset (``schema.json`` with the dataset spec in its recipe,
``vocab/FIELD.parquet``), so the serving transform is the training transform: the raw
layout of the spec's input, the field order of the model, the id conventions, each
field's transform (categorical text, the integer recipe, bucket boundaries; a multi-hot
field's separator and max_length), its vocabulary (token text by id) or hash buckets,
and the integer recipe. The integer recipe is stored as the shift of small values
and thresholds found with the preprocessor's own function (``criteo_integer_token``), so
the runtime reproduces it exactly without numpy's ``log``. A dataset whose recipe names
another integer rule (one made before the rule changed) is refused: its vocabulary
holds the other rule's tokens.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.dataset_spec import shipped_spec
from trainer.data.raw_formats import FORMATS
from trainer.data.schema import MISSING_ID, OOV_ID, DatasetSchema
from trainer.data.transforms import INTEGER_TOKEN_RULE, SMALL_MAX, SMALL_SHIFT, criteo_integer_token
from trainer.errors import UserError
from trainer.storage import filesystem, join

LARGEST_INTEGER = 10**18 - 1  # the preprocessor accepts at most 18 digits
_KINDS = {"criteo_log": "integer", "buckets": "buckets"}  # a numeric column's token -> the field's kind
HASH_RECIPE = (  # trainer.data.hashing, which the runtime reproduces
    "token bytes cut into little-endian 8-byte words (the last zero-padded), h = byte length, "
    "h = splitmix64(h ^ word) per word; id = first_vocab_id + h % hash_buckets"
)


def integer_token_thresholds() -> list[int]:
    """``T`` with ``criteo_integer_token(v) == number of T[j] <= v`` for every ``v > SMALL_MAX``:
    ``T[j]`` is the smallest ``v > SMALL_MAX`` whose token is at least ``j + 1``."""
    top = int(criteo_integer_token(np.array([LARGEST_INTEGER]))[0])
    wanted = np.arange(1, top + 1, dtype=np.int64)
    lo = np.full(len(wanted), SMALL_MAX + 1, dtype=np.int64)  # token(lo) may already be >= wanted
    hi = np.full(len(wanted), LARGEST_INTEGER, dtype=np.int64)  # token(hi) >= wanted
    while np.any(lo < hi):  # smallest v in [lo, hi] with token(v) >= wanted, all at once
        mid = lo + (hi - lo) // 2
        reached = criteo_integer_token(mid) >= wanted
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid + 1)
    thresholds = lo
    below = np.maximum(thresholds - 1, SMALL_MAX + 1)
    ok = (criteo_integer_token(thresholds) >= wanted) & (
        (thresholds == SMALL_MAX + 1) | (criteo_integer_token(below) < wanted)
    )
    if not ok.all() or np.any(np.diff(thresholds) < 0):
        raise AssertionError("criteo_integer_token is not monotone: thresholds do not reproduce it")
    return thresholds.tolist()


def read_vocabulary(dataset_url: str, field: str, cardinality: int) -> list[str]:
    """The tokens of ``field`` by id (token ``i`` has id ``MISSING_ID + 1 + i``)."""
    url = join(dataset_url, "vocab", f"{field}.parquet")
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise UserError(f"missing vocabulary of {field}: {url} (was the dataset made by trainer.data.preprocess?)")
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["token", "id"])
    except (pa.ArrowException, OSError, KeyError) as e:
        raise UserError(f"{url}: unreadable vocabulary ({type(e).__name__}: {e})") from None
    table = table.sort_by("id")
    ids = table["id"].to_numpy()
    first = MISSING_ID + 1
    if not np.array_equal(ids, np.arange(first, first + len(ids))) or first + len(ids) != cardinality:
        raise UserError(
            f"{url}: ids are not {first}..{cardinality - 1} for the {cardinality} ids of {field} in schema.json; "
            "vocabulary and dataset do not belong together"
        )
    return table["token"].to_pylist()


def dataset_spec_of(dataset_url: str, schema: DatasetSchema) -> dict[str, Any]:
    """The dataset spec that made the dataset (``recipe["spec"]``, as plain data); for a
    Criteo or Avazu dataset preprocessed before specs existed, the shipped spec of its name."""
    spec = schema.recipe.get("spec")
    if isinstance(spec, dict):
        return spec
    if schema.recipe.get("source") == "trainer.data.preprocess" and schema.dataset in FORMATS:
        return shipped_spec(schema.dataset).to_dict()
    raise UserError(
        f"{dataset_url} is a {schema.dataset!r} dataset without raw rows or vocabularies (e.g. made by "
        "trainer.data.synthetic --format parquet): there is no raw value -> id transform to export. "
        "Train on a dataset made by trainer.data.preprocess (for synthetic data: generate a TSV, then preprocess it)."
    )


def build_feature_spec(dataset_url: str, schema: DatasetSchema, fields: list[str]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(feature_spec.json content, {artifact-relative path: bytes} of the vocabulary files)
    for the model's ``fields`` (in the program's column order), from the dataset spec that
    made the dataset: per field its raw column's transform (categorical text, the integer
    recipe, bucket boundaries; multi-hot separator and max_length) and its ids (a vocabulary,
    or hash buckets)."""
    dataset_spec = dataset_spec_of(dataset_url, schema)
    columns = {c["name"]: c for c in dataset_spec["columns"]}
    integer_fields = [c["name"] for c in dataset_spec["columns"] if c["type"] == "numeric" and c.get("token") == "criteo_log"]
    transform = schema.recipe.get("integer_transform") or ""
    if integer_fields and INTEGER_TOKEN_RULE not in transform:
        raise UserError(
            f"{dataset_url} was preprocessed with the integer transform {transform!r}, not this version's "
            f"token rule {INTEGER_TOKEN_RULE!r}: its integer vocabularies hold other tokens. "
            "Preprocess the raw data again and retrain."
        )
    if fields != schema.field_names:
        raise UserError(f"the model's fields {fields} are not the fields of {dataset_url}: {schema.field_names}")
    files: dict[str, bytes] = {}
    entries = []
    for f in schema.sparse_fields:
        column = columns.get(f.name)
        if column is None:
            raise UserError(f"{dataset_url}: field {f.name} is not a column of the dataset spec in its recipe")
        entry = {
            "name": f.name,
            "kind": _KINDS.get(column.get("token"), "categorical"),
            "cardinality": f.cardinality,
            "max_length": f.max_length,
            "pooling": f.pooling,
            "separator": column.get("separator"),
            "boundaries": column.get("boundaries"),
            "hash_buckets": column.get("hash_buckets"),
            "vocab": None,
        }
        if column.get("hash_buckets") is None:
            tokens = read_vocabulary(dataset_url, f.name, f.cardinality)
            entry["vocab"] = f"vocab/{f.name}.json"
            files[entry["vocab"]] = json.dumps(tokens, ensure_ascii=False).encode()
        elif MISSING_ID + 1 + column["hash_buckets"] != f.cardinality:
            raise UserError(f"{dataset_url}: field {f.name} has {f.cardinality} ids, not {column['hash_buckets']} hash buckets + 2")
        entries.append(entry)
    raw = dataset_spec["input"]
    label = next(c["name"] for c in dataset_spec["columns"] if c["type"] == "label")
    spec = {
        "raw": {
            "format": raw["format"],
            "columns": list(columns),
            "label": label,
            "delimiter": raw.get("delimiter") or ("\t" if raw["format"] == "tsv" else ","),
            "has_header": bool(raw.get("header")),
            "quoted": bool(raw.get("quoted", True)),
        },
        "fields": entries,
        "ids": {"oov": OOV_ID, "missing": MISSING_ID, "first_vocab_id": MISSING_ID + 1},
        "integer_token": {
            "recipe": f"{INTEGER_TOKEN_RULE}; token = v + small_shift for v <= small_max, "
            "else the number of thresholds <= v",
            "small_max": SMALL_MAX,
            "small_shift": SMALL_SHIFT,
            "thresholds": integer_token_thresholds() if integer_fields else [],
        },
        "hash": HASH_RECIPE,
        "recipe": schema.recipe,
    }
    return spec, files
