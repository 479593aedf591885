"""The feature spec of an artifact: how a raw row becomes the program's (B, F) ids.

Built from a preprocessed dataset (``schema.json`` + ``vocab/FIELD.parquet``), so the
serving transform is the training transform: the raw layout of the dataset's format,
the field order of the model, the id conventions, each field's vocabulary (token text
by id) and the integer recipe. The integer recipe is stored as thresholds found with
the preprocessor's own function (``criteo_integer_token``), so the runtime reproduces
it exactly without numpy's ``log``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.raw_formats import FORMATS
from trainer.data.schema import MISSING_ID, OOV_ID, DatasetSchema
from trainer.data.transforms import criteo_integer_token
from trainer.errors import UserError
from trainer.storage import filesystem, join

IDENTITY_MAX = 2  # criteo_integer_token keeps v <= 2 as is
LARGEST_INTEGER = 10**18 - 1  # the preprocessor accepts at most 18 digits


def integer_token_thresholds() -> list[int]:
    """``T`` with ``criteo_integer_token(v) == number of T[j] <= v`` for every ``v > 2``:
    ``T[j]`` is the smallest ``v > 2`` whose token is at least ``j + 1``."""
    top = int(criteo_integer_token(np.array([LARGEST_INTEGER]))[0])
    wanted = np.arange(1, top + 1, dtype=np.int64)
    lo = np.full(len(wanted), IDENTITY_MAX + 1, dtype=np.int64)  # token(lo) may already be >= wanted
    hi = np.full(len(wanted), LARGEST_INTEGER, dtype=np.int64)  # token(hi) >= wanted
    while np.any(lo < hi):  # smallest v in [lo, hi] with token(v) >= wanted, all at once
        mid = lo + (hi - lo) // 2
        reached = criteo_integer_token(mid) >= wanted
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid + 1)
    thresholds = lo
    below = np.maximum(thresholds - 1, IDENTITY_MAX + 1)
    ok = (criteo_integer_token(thresholds) >= wanted) & (
        (thresholds == IDENTITY_MAX + 1) | (criteo_integer_token(below) < wanted)
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


def build_feature_spec(dataset_url: str, schema: DatasetSchema, fields: list[str]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(feature_spec.json content, {artifact-relative path: bytes} of the vocabulary files)
    for the model's ``fields`` (in the program's column order)."""
    fmt = FORMATS.get(schema.dataset)
    if fmt is None:
        raise UserError(
            f"{dataset_url} is a {schema.dataset!r} dataset without raw rows or vocabularies (e.g. made by "
            "trainer.data.synthetic --format parquet): there is no raw value -> id transform to export. "
            "Train on a dataset made by trainer.data.preprocess (for synthetic data: generate a TSV, then preprocess it)."
        )
    if fields != schema.field_names:
        raise UserError(f"the model's fields {fields} are not the fields of {dataset_url}: {schema.field_names}")
    files: dict[str, bytes] = {}
    entries = []
    for f in schema.sparse_fields:
        tokens = read_vocabulary(dataset_url, f.name, f.cardinality)
        path = f"vocab/{f.name}.json"
        files[path] = json.dumps(tokens, ensure_ascii=False).encode()
        kind = "integer" if f.name in fmt.integer_fields else "categorical"
        entries.append({"name": f.name, "kind": kind, "cardinality": f.cardinality, "vocab": path})
    spec = {
        "raw": {
            "format": fmt.name,
            "columns": list(fmt.columns),
            "label": fmt.label,
            "delimiter": fmt.delimiter,
            "has_header": fmt.has_header,
            "quoted": fmt.quoted,
        },
        "fields": entries,
        "ids": {"oov": OOV_ID, "missing": MISSING_ID, "first_vocab_id": MISSING_ID + 1},
        "integer_token": {
            "recipe": "v if v <= 2 else floor(ln(v)^2); token = number of thresholds <= v for v > 2",
            "identity_max": IDENTITY_MAX,
            "thresholds": integer_token_thresholds() if fmt.integer_fields else [],
        },
        "recipe": schema.recipe,
    }
    return spec, files
