"""Synthetic Criteo-shaped click logs with a planted model: the embedded default dataset.

Rows look like Criteo Kaggle: a label, 13 integer features ``I1..I13``
(heavy-tailed counts up to ``MAX_INTEGER``) and 26 categorical fields
``C1..C26`` with Zipf-distributed ids over Criteo-like cardinalities (scaled by
``cardinality_scale``), each field with its own missing rate.

Labels come from a known model, so the best reachable AUC is known. Every one
of the 39 fields has a latent table ``E_f`` (rows: ``min(cardinality,
MAX_TABLE_ROWS)`` plus one row for "missing"; ``latent_dim`` columns) and
first-order weights ``w_f``. Generator id ``i`` of a categorical field uses row
``i % (table rows - 1)`` (ids beyond ``MAX_TABLE_ROWS`` alias onto head rows,
which keeps the tables small at 10M cardinality); an integer feature uses the
row of its ``criteo_integer_token``. The fields in ``LOW_RANK_FIELDS`` have
tables of rank 1 or 2 (``E_f = A_f @ B_f``), the others full rank. Then::

    logit = bias + sum_f w_f[x_f] + pair_weight * sum_{(a, b) in PAIRS} <E_a[x_a], E_b[x_b]>
    p_true = sigmoid(logit),  label ~ Bernoulli(p_true)

``bias`` is calibrated on a seeded sample so the CTR is about ``target_ctr``.
Everything is drawn from ``seed``: the model from ``SeedSequence(seed,
spawn_key=(0, field))``, rows in chunks of ``chunk_rows`` from ``(1, chunk,
stream)``, so output is identical for a seed and the first N rows do not depend
on ``rows``. Memory is bounded by the chunk size, whatever the row count.

Each row's split is ``assign_splits(row_index, parse_split(split), split_seed)``,
exactly as ``trainer.data.preprocess`` assigns it with the same flags, and the
oracle AUC / logloss of ``p_true`` are reported per split (AUC from fixed-size
histograms, ties within a bin counted half) beside the AUC of the first-order
part of the logit alone, which shows how much the interactions carry.

Formats: ``criteo-tsv`` writes the raw Criteo Kaggle format (categoricals as
8-hex hashes of (field, id)) plus ``OUTPUT.truth.parquet`` (``p_true``) and
``OUTPUT.oracle.json`` (the report), which ``read_oracle`` reads back for the
preprocessor; ``parquet`` writes a prepared dataset (see ``trainer.data.schema``)
whose ``recipe`` is the report.

``--schema ads_log`` writes another shape instead: raw daily Parquet files of an ads
log with a multi-hot history field (``trainer.data.synthetic_ads_log``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec.utils
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from trainer.atomic_output import atomic_directory, atomic_files
from trainer.cli_help import HelpFormatter, description
from trainer.data.schema import MISSING_ID, SPLITS, DatasetSchema, SparseField, write_schema
from trainer.data.splits import assign_splits, parse_split, splitmix64
from trainer.data.transforms import criteo_integer_token, log_dense
from trainer.data.writer import DatasetWriter, make_table
from trainer.errors import UserError, run_cli
from trainer.storage import filesystem

FORMATS = ("parquet", "criteo-tsv")
SCHEMAS = ("criteo", "ads_log")  # ads_log: trainer.data.synthetic_ads_log
ORACLE_SUFFIX = ".oracle.json"  # criteo-tsv: the report beside OUTPUT
INTEGER_FIELDS = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL_FIELDS = tuple(f"C{i}" for i in range(1, 27))
FIELDS = INTEGER_FIELDS + CATEGORICAL_FIELDS

# Criteo Kaggle cardinalities of C1..C26.
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
# Missing rates close to Criteo Kaggle's.
CATEGORICAL_MISSING = (
    0.0, 0.0, 0.034, 0.034, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.034, 0.0,
    0.0, 0.0, 0.034, 0.0, 0.0, 0.44, 0.44, 0.034, 0.76, 0.0, 0.034, 0.44, 0.44,
)  # fmt: skip
INTEGER_MISSING = (0.45, 0.0, 0.21, 0.22, 0.026, 0.22, 0.043, 0.0005, 0.043, 0.45, 0.043, 0.77, 0.22)
# Integer feature v = floor(exp(N(mu, sigma))) - 1, clipped to [0, MAX_INTEGER]: (mu, sigma)
# per field, fitted by eye to Criteo's medians and 99th percentiles.
INTEGER_LOGNORMAL = (
    (0.9, 1.3), (1.5, 2.6), (2.2, 1.5), (1.7, 0.95), (7.8, 1.9), (3.7, 1.6), (1.4, 1.6),
    (2.1, 0.8), (3.7, 1.45), (0.4, 0.5), (0.9, 1.0), (0.3, 1.0), (1.8, 1.1),
)  # fmt: skip
MAX_INTEGER = 10**6
MAX_INTEGER_TOKEN = int(criteo_integer_token(np.array([MAX_INTEGER]))[0])
MIN_INTEGER_TOKEN = int(criteo_integer_token(np.array([0]))[0])  # of the smallest value drawn, 0
INTEGER_TOKENS = MAX_INTEGER_TOKEN - MIN_INTEGER_TOKEN + 1  # token t has table row t - MIN_INTEGER_TOKEN

# The planted structure: low-rank fields (field -> rank) and the interacting field pairs.
LOW_RANK_FIELDS = {"C3": 1, "C12": 1, "C21": 1, "C4": 2, "C7": 2, "C16": 2}
PAIRS = (
    ("C1", "C2"), ("C3", "C4"), ("C3", "C14"), ("C4", "C13"), ("C5", "C6"), ("C7", "C10"),
    ("C8", "C11"), ("C12", "C15"), ("C12", "C19"), ("C16", "C24"), ("C21", "C26"), ("C2", "C17"),
    ("C9", "C23"), ("C18", "C25"), ("C20", "C22"), ("C13", "C26"), ("C7", "C16"),
    ("I1", "C1"), ("I3", "C7"), ("I5", "C16"), ("I6", "I13"), ("I7", "C21"), ("I11", "C10"),
)  # fmt: skip
_PAIR_FIELDS = sorted({f for pair in PAIRS for f in pair})
MAX_TABLE_ROWS = 1 << 14
AUC_BINS = 1 << 20
CALIBRATION_ROWS = 1 << 16
_BLOCK_ROWS = 1 << 13
_MODEL, _CHUNK, _CALIBRATION = 0, 1, 2  # SeedSequence spawn-key namespaces
_ZIPF, _C_MISSING, _I_NORMAL, _I_MISSING, _LABEL = range(5)  # per-chunk random streams
TSV_SCHEMA = pa.schema(
    [("label", pa.int8())] + [(f, pa.int64()) for f in INTEGER_FIELDS] + [(f, pa.string()) for f in CATEGORICAL_FIELDS]
)
_HEX_PAIRS = np.frombuffer(b"".join(b"%02x" % b for b in range(256)), dtype=np.uint16)  # byte -> its 2 hex chars


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Same config -> same bytes; ``chunk_rows`` is part of the data's identity."""

    rows: int
    seed: int = 0
    cardinality_scale: float = 1.0
    split: str = "8,1,1"
    split_seed: int = 0
    latent_dim: int = 16
    zipf_exponent: float = 1.1
    target_ctr: float = 0.25
    first_order_scale: float = 0.17
    interaction_scale: float = 0.22
    chunk_rows: int = 1 << 16

    def __post_init__(self) -> None:
        if self.rows <= 0:
            raise UserError(f"--rows must be positive, got {self.rows}")
        if self.seed < 0 or self.split_seed < 0:
            raise UserError(f"--seed and --split-seed must be non-negative, got {self.seed} and {self.split_seed}")
        if not self.cardinality_scale > 0:
            raise UserError(f"--cardinality-scale must be positive, got {self.cardinality_scale}")
        if not 0 < self.target_ctr < 1:
            raise UserError(f"target_ctr must be in (0, 1), got {self.target_ctr}")
        if self.zipf_exponent <= 1 or self.latent_dim < 1 or self.chunk_rows < 1:
            raise UserError("zipf_exponent must be > 1, latent_dim and chunk_rows >= 1")
        parse_split(self.split)
        if max(self.cardinalities) + 2 > np.iinfo(np.int32).max:
            raise UserError(f"--cardinality-scale {self.cardinality_scale} makes ids overflow int32")

    @property
    def fractions(self) -> tuple[float, float, float]:
        return parse_split(self.split)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Generator ids of C1..C26 lie in ``[0, cardinality)``; small fields keep at least 4 (or their own size)."""
        return tuple(max(min(c, 4), round(c * self.cardinality_scale)) for c in CRITEO_CARDINALITIES)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _field_major(draw: np.ndarray) -> np.ndarray:
    """A draw made in row order, (N, F) -> contiguous (F, N)."""
    return np.ascontiguousarray(draw.T)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Rows:
    """One chunk of N generated rows, field-major.

    cat_ids: int64 (26, N) generator ids; cat_missing: bool (26, N);
    ints: int64 (13, N) counts; int_tokens: int64 (13, N) their ``criteo_integer_token``;
    int_missing: bool (13, N); labels: int8 (N,); p_true, logit, first_order_logit:
    float64 (N,) (both logits include the bias).
    """

    cat_ids: np.ndarray
    cat_missing: np.ndarray
    ints: np.ndarray
    int_tokens: np.ndarray
    int_missing: np.ndarray
    labels: np.ndarray
    p_true: np.ndarray
    logit: np.ndarray
    first_order_logit: np.ndarray


class PlantedModel:
    """The latent tables and weights of the planted click model, drawn from ``config.seed``.

    ``latents[f]``: float32 (table_rows[f], latent_dim), last row = missing;
    ``weights[f]``: float32 (table_rows[f],); ``ranks[f]``: rank of ``latents[f]``.
    """

    def __init__(self, config: SyntheticConfig):
        self.config = config
        d = config.latent_dim
        rows = [INTEGER_TOKENS + 1] * len(INTEGER_FIELDS) + [min(c, MAX_TABLE_ROWS) + 1 for c in config.cardinalities]
        self.table_rows = dict(zip(FIELDS, rows))
        self.ranks = {f: min(LOW_RANK_FIELDS.get(f, d), n, d) for f, n in self.table_rows.items()}
        self.latents: dict[str, np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}
        for index, f in enumerate(FIELDS):
            rng = _rng(config.seed, _MODEL, index)
            n, r = self.table_rows[f], self.ranks[f]
            self.weights[f] = (config.first_order_scale * rng.standard_normal(n)).astype(np.float32)
            if r < min(n, d):
                # unit expected row norm, in an r-dimensional random subspace
                basis = np.linalg.qr(rng.standard_normal((d, r)))[0].T  # (r, d) orthonormal rows
                table = rng.standard_normal((n, r)) / np.sqrt(r) @ basis
            else:
                table = rng.standard_normal((n, d)) / np.sqrt(d)
            self.latents[f] = table.astype(np.float32)
        self.pair_weight = config.interaction_scale * np.sqrt(d)
        self.bias = 0.0  # the calibration sample's logits are computed without it
        self.bias = self._calibrate_bias()

    def logits(self, cat_ids: np.ndarray, cat_missing: np.ndarray, int_tokens: np.ndarray, int_missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first-order logit, full logit), both with the bias, float64 (N,) each (inputs shaped as in ``Rows``)."""
        rows = {}
        for j, f in enumerate(INTEGER_FIELDS):
            rows[f] = np.where(int_missing[j], self.table_rows[f] - 1, int_tokens[j] - MIN_INTEGER_TOKEN)
        for j, f in enumerate(CATEGORICAL_FIELDS):
            n = self.table_rows[f] - 1
            rows[f] = np.where(cat_missing[j], n, cat_ids[j] % n if n < self.config.cardinalities[j] else cat_ids[j])
        first = np.full(cat_ids.shape[1], self.bias, dtype=np.float64)
        for f in FIELDS:
            first += np.take(self.weights[f], rows[f])
        inter = np.zeros(cat_ids.shape[1], dtype=np.float64)
        for start in range(0, cat_ids.shape[1], _BLOCK_ROWS):  # blocks keep the gathered latents in cache
            block = slice(start, start + _BLOCK_ROWS)
            vectors = {f: np.take(self.latents[f], rows[f][block], axis=0) for f in _PAIR_FIELDS}
            for a, b in PAIRS:
                inter[block] += np.einsum("nd,nd->n", vectors[a], vectors[b])
        return first, first + self.pair_weight * inter

    def sample(self, key: tuple[int, ...], n: int) -> Rows:
        """Draw ``n`` rows from the random streams ``SeedSequence(config.seed, spawn_key=key + (stream,))``.

        Every stream is consumed in row order, so the first rows of a draw do not depend on ``n``.
        """
        c, seed = self.config, self.config.seed
        card = np.array(c.cardinalities, dtype=np.float64)[:, None]
        n_cat, n_int = len(CATEGORICAL_FIELDS), len(INTEGER_FIELDS)
        u = _field_major(_rng(seed, *key, _ZIPF).random((n, n_cat)))
        # bounded Zipf by inverse CDF of the power law x^-a on [1, card + 1): id = floor(x) - 1
        one_minus_a = 1.0 - c.zipf_exponent
        x = np.exp(np.log1p(u * ((card + 1.0) ** one_minus_a - 1.0)) / one_minus_a)
        cat_ids = np.minimum(x.astype(np.int64) - 1, card.astype(np.int64) - 1)
        cat_missing = _field_major(_rng(seed, *key, _C_MISSING).random((n, n_cat))) < np.array(CATEGORICAL_MISSING)[:, None]
        mu, sigma = np.array(INTEGER_LOGNORMAL).T[:, :, None]
        z = mu + sigma * _field_major(_rng(seed, *key, _I_NORMAL).standard_normal((n, n_int)))
        ints = np.maximum(np.exp(np.minimum(z, np.log(MAX_INTEGER + 1.0))).astype(np.int64) - 1, 0)
        int_missing = _field_major(_rng(seed, *key, _I_MISSING).random((n, n_int))) < np.array(INTEGER_MISSING)[:, None]
        int_tokens = criteo_integer_token(ints.reshape(-1)).reshape(ints.shape)
        first, logit = self.logits(cat_ids, cat_missing, int_tokens, int_missing)
        p_true = _sigmoid(logit)
        labels = (_rng(seed, *key, _LABEL).random(n) < p_true).astype(np.int8)
        return Rows(cat_ids, cat_missing, ints, int_tokens, int_missing, labels, p_true, logit, first)

    def _calibrate_bias(self) -> float:
        """Bias so that the mean p_true of a seeded calibration sample is ``target_ctr`` (bisection)."""
        rows = self.sample((_CALIBRATION,), CALIBRATION_ROWS)
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(rows.logit + mid).mean() < self.config.target_ctr else (lo, mid)
        return (lo + hi) / 2

    def describe(self) -> dict[str, Any]:
        """The planted structure, for the report."""
        return {
            "logit": "bias + sum_f w_f[x_f] + pair_weight * sum_(a,b) <E_a[x_a], E_b[x_b]>",
            "latent_dim": self.config.latent_dim,
            "bias": self.bias,
            "pair_weight": self.pair_weight,
            "table_rows": (
                f"categorical: min(cardinality, {MAX_TABLE_ROWS}) + 1, id i -> row i % (table_rows - 1) "
                f"(aliasing above {MAX_TABLE_ROWS}); integer: token t in {MIN_INTEGER_TOKEN}..{MAX_INTEGER_TOKEN} "
                f"-> row t + {-MIN_INTEGER_TOKEN}; last row = missing"
            ),
            "low_rank_fields": {f: self.ranks[f] for f in LOW_RANK_FIELDS},
            "pairs": [list(p) for p in PAIRS],
            "fields": [
                {"name": f, "ids": ids, "missing_rate": m, "table_rows": self.table_rows[f], "rank": self.ranks[f]}
                for f, ids, m in zip(
                    FIELDS,
                    [INTEGER_TOKENS] * len(INTEGER_FIELDS) + list(self.config.cardinalities),
                    INTEGER_MISSING + CATEGORICAL_MISSING,
                )
            ],
        }


class OracleMetrics:
    """Streaming AUC and logloss per split in fixed memory: histograms of p over ``AUC_BINS`` bins."""

    def __init__(self) -> None:
        shape = (len(SPLITS), 2, AUC_BINS)  # split, label, bin
        self.p_hist = np.zeros(shape, dtype=np.int64)
        self.first_hist = np.zeros(shape, dtype=np.int64)
        self.logloss = np.zeros(len(SPLITS))
        self.p_sum = np.zeros(len(SPLITS))

    def update(self, split: np.ndarray, labels: np.ndarray, p_true: np.ndarray, first_order_logit: np.ndarray) -> None:
        """split: int8 (N,); labels: (N,) 0/1; p_true, first_order_logit: float64 (N,)."""
        group = (split.astype(np.int64) * 2 + labels) * AUC_BINS
        for hist, p in ((self.p_hist, p_true), (self.first_hist, _sigmoid(first_order_logit))):
            np.add.at(hist.reshape(-1), group + np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1), 1)
        p = np.clip(p_true, 1e-12, 1 - 1e-12)
        self.logloss += np.bincount(split, -np.where(labels == 1, np.log(p), np.log1p(-p)), minlength=len(SPLITS))
        self.p_sum += np.bincount(split, p_true, minlength=len(SPLITS))

    @staticmethod
    def _auc(neg: np.ndarray, pos: np.ndarray) -> float | None:
        if neg.sum() == 0 or pos.sum() == 0:
            return None
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (float(pos.sum()) * float(neg.sum())))

    def report(self) -> dict[str, dict[str, Any]]:
        out = {}
        for s, name in enumerate(SPLITS):
            neg, pos = int(self.p_hist[s, 0].sum()), int(self.p_hist[s, 1].sum())
            rows = neg + pos
            out[name] = {
                "rows": rows,
                "positives": pos,
                "ctr": pos / rows if rows else None,
                "mean_p_true": self.p_sum[s] / rows if rows else None,
                "auc": self._auc(*self.p_hist[s]),
                "logloss": self.logloss[s] / rows if rows else None,
                "first_order_auc": self._auc(*self.first_hist[s]),
            }
        return out


def _hex_hashes(cat_ids: np.ndarray) -> np.ndarray:
    """Criteo-style categorical values: 8 lowercase hex chars of a 32-bit hash of (field, id).

    cat_ids: int64 (F, N) -> uint8 (F, N, 8) ASCII.
    """
    field_salt = (np.arange(1, len(cat_ids) + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))[:, None]
    with np.errstate(over="ignore"):
        h = splitmix64(cat_ids.astype(np.uint64) ^ field_salt) >> np.uint64(32)
    big_endian = h.astype(">u4").view(np.uint8)  # (F, N * 4), high byte first
    return _HEX_PAIRS[big_endian].view(np.uint8).reshape(*cat_ids.shape, 8)


def _tsv_table(rows: Rows) -> pa.Table:
    """Columns of ``TSV_SCHEMA``, nulls for missing values (written as empty cells)."""
    n = len(rows.labels)
    columns = [pa.array(rows.labels)]
    columns += [pa.array(v, mask=m) for v, m in zip(rows.ints, rows.int_missing)]
    offsets = pa.py_buffer(np.arange(0, 8 * n + 1, 8, dtype=np.int32))
    for j, chars in enumerate(_hex_hashes(rows.cat_ids)):
        valid = pa.py_buffer(np.packbits(~rows.cat_missing[j], bitorder="little"))
        columns.append(pa.StringArray.from_buffers(n, offsets, pa.py_buffer(chars), valid))
    return pa.Table.from_arrays(columns, schema=TSV_SCHEMA)


def _dataset_tables(rows: Rows, split: np.ndarray) -> Iterator[tuple[str, pa.Table]]:
    """(split name, table in the prepared-dataset layout) for each split present in the chunk."""
    sparse = {}
    for j, f in enumerate(INTEGER_FIELDS):
        sparse[f] = np.where(rows.int_missing[j], MISSING_ID, rows.int_tokens[j] - MIN_INTEGER_TOKEN + 2)
    for j, f in enumerate(CATEGORICAL_FIELDS):
        sparse[f] = np.where(rows.cat_missing[j], MISSING_ID, rows.cat_ids[j] + 2)
    dense = log_dense(rows.ints.T, rows.int_missing.T)
    for s, name in enumerate(SPLITS):
        m = split == s
        if m.any():
            yield name, make_table(rows.labels[m], {f: v[m] for f, v in sparse.items()}, dense[m], {"p_true": rows.p_true[m]})


def _chunks(model: PlantedModel, metrics: OracleMetrics, progress: bool) -> Iterator[tuple[Rows, np.ndarray]]:
    """(rows, split per row) chunk by chunk, feeding the oracle metrics on the way."""
    c = model.config
    with tqdm(total=c.rows, unit="rows", unit_scale=True, file=sys.stderr, disable=not progress, desc="synthetic") as bar:
        for chunk, start in enumerate(range(0, c.rows, c.chunk_rows)):
            n = min(c.chunk_rows, c.rows - start)
            rows = model.sample((_CHUNK, chunk), n)
            split = assign_splits(np.arange(start, start + n, dtype=np.int64), c.fractions, c.split_seed)
            metrics.update(split, rows.labels, rows.p_true, rows.first_order_logit)
            yield rows, split
            bar.update(n)


def _write_tsv(config: SyntheticConfig, output: str, overwrite: bool, progress: bool) -> dict[str, Any]:
    urls = [output, output + ".truth.parquet", output + ORACLE_SUFFIX]
    compression = fsspec.utils.infer_compression(output)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    truth_schema = pa.schema([("p_true", pa.float32())])
    with atomic_files(urls, overwrite) as (data_url, truth_url, report_url):
        model, metrics = PlantedModel(config), OracleMetrics()
        with (
            fsspec.open(data_url, "wb", compression=compression) as data,
            fsspec.open(truth_url, "wb") as truth,
            pacsv.CSVWriter(data, TSV_SCHEMA, write_options=options) as csv_writer,
            pq.ParquetWriter(truth, truth_schema, compression="zstd") as truth_writer,
        ):
            for rows, _ in _chunks(model, metrics, progress):
                csv_writer.write_table(_tsv_table(rows))
                truth_writer.write_table(pa.table({"p_true": rows.p_true.astype(np.float32)}, schema=truth_schema))
        report = _report(model, metrics, "criteo-tsv", urls)
        with fsspec.open(report_url, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _write_parquet(config: SyntheticConfig, output: str, overwrite: bool, progress: bool) -> dict[str, Any]:
    with atomic_directory(output, overwrite=overwrite, marker="schema.json", what="dataset") as tmp:
        model, metrics = PlantedModel(config), OracleMetrics()
        writer = DatasetWriter(tmp)
        for rows, split in _chunks(model, metrics, progress):
            for name, table in _dataset_tables(rows, split):
                writer.write(name, table)
        cards = [INTEGER_TOKENS + 2] * len(INTEGER_FIELDS) + [c + 2 for c in config.cardinalities]
        report = _report(model, metrics, "parquet", [output])
        schema = DatasetSchema(
            dataset="synthetic",
            sparse_fields=[SparseField(f, c) for f, c in zip(FIELDS, cards)],
            dense_fields=list(INTEGER_FIELDS),
            splits=writer.close(),
            recipe={**report, "train_order": "iid"},  # rows are drawn independently
            extra_columns=["p_true"],
        )
        write_schema(tmp, schema)
    return report


def _report(model: PlantedModel, metrics: OracleMetrics, fmt: str, outputs: list[str]) -> dict[str, Any]:
    oracle = metrics.report()
    rows = sum(s["rows"] for s in oracle.values())
    return {
        "generator": "trainer.data.synthetic",
        "format": fmt,
        "outputs": outputs,
        "config": dataclasses.asdict(model.config),
        "rows": rows,
        "ctr": sum(s["positives"] for s in oracle.values()) / rows,
        "model": model.describe(),
        "oracle": oracle,
    }


def generate(config: SyntheticConfig, output: str, fmt: str = "parquet", overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Generate ``config.rows`` rows into ``output`` (a path or fsspec URL) in ``fmt``; returns the report."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    write = _write_tsv if fmt == "criteo-tsv" else _write_parquet
    return write(config, output, overwrite, progress)


def read_oracle(raw_url: str, split: str, split_seed: int) -> dict[str, Any]:
    """The oracle metrics of a generated raw file (``RAW.oracle.json`` beside it), as recipe entries.

    ``{}`` unless they describe exactly the splits made with ``split`` and ``split_seed``
    (preprocess ``--split`` and ``--seed``); the trainer reports them beside its own test AUC.
    """
    fs, path = filesystem(raw_url + ORACLE_SUFFIX)
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        report = json.load(f)
    generated = report.get("config", {})
    same_split = generated.get("split") == split or (
        isinstance(generated.get("split"), str) and parse_split(generated["split"]) == parse_split(split)
    )
    if not same_split or generated.get("split_seed") != split_seed or "oracle" not in report:
        return {}
    return {"oracle": report["oracle"], "oracle_source": raw_url + ORACLE_SUFFIX}


def _summary(report: dict[str, Any], seconds: float) -> str:
    test = report["oracle"]["test"]
    lines = [
        f"synthetic: {report['rows']:,} rows in {seconds:.1f}s ({report['rows'] / seconds:,.0f} rows/s), "
        f"CTR {report['ctr']:.4f}, format {report['format']}",
    ]
    if test["rows"] and test["auc"] is not None:
        lines.append(
            f"oracle on test ({test['rows']:,} rows): AUC {test['auc']:.4f} "
            f"(first-order part alone {test['first_order_auc']:.4f}), logloss {test['logloss']:.4f}"
        )
    lines.append("wrote: " + ", ".join(report["outputs"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainer.data.synthetic", description=description(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--rows", type=int, required=True, help="number of data rows")
    p.add_argument("--output", required=True, help="file (criteo-tsv; .gz compresses) or dataset directory (parquet, ads_log)")
    p.add_argument("--schema", default="criteo", choices=SCHEMAS,
                   help="criteo: Criteo-shaped rows (as --format says); ads_log: raw daily Parquet files of an ads log "
                        "with a multi-hot history field (trainer.data.synthetic_ads_log)")  # fmt: skip
    p.add_argument("--days", type=int, default=7, help="ads_log: days of logs, one file each")
    p.add_argument("--format", default="parquet", choices=FORMATS,
                   help="parquet: a prepared dataset directory; criteo-tsv: raw Criteo Kaggle rows to preprocess")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the planted model and the rows")
    p.add_argument("--cardinality-scale", type=float, default=1.0, help="multiplies the Criteo cardinalities")
    p.add_argument("--split", default="8,1,1", help="train,val,test proportions (as preprocess)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split assignment (as preprocess --seed)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    if args.schema == "ads_log":
        from trainer.data.synthetic_ads_log import AdsLogConfig, generate_ads_log, summary

        start = time.perf_counter()
        ads = AdsLogConfig(rows=args.rows, days=args.days, seed=args.seed, cardinality_scale=args.cardinality_scale)
        print(summary(generate_ads_log(ads, args.output, overwrite=args.overwrite), args.output, time.perf_counter() - start))
        return
    config = SyntheticConfig(
        rows=args.rows,
        seed=args.seed,
        cardinality_scale=args.cardinality_scale,
        split=args.split,
        split_seed=args.split_seed,
    )
    start = time.perf_counter()
    report = generate(config, args.output, args.format, overwrite=args.overwrite)
    print(_summary(report, time.perf_counter() - start))


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
