"""A synthetic ads click log with a planted model, as raw daily Parquet files: "your own data".

``python -m trainer.data.synthetic --schema ads_log --rows N --output DIR`` writes
``DIR/day_YYYY-MM-DD.parquet`` (one file per day, ``days`` days from ``START_DAY``)
and ``DIR/report.json``. They are raw logs, the input of ``trainer.data.preprocess
--spec configs/datasets/ads_log.yaml``, not a prepared dataset. Columns:

- ``click`` int8, the label;
- ``user_id``, ``item_id`` int64, Zipf-distributed over ``USERS`` and ``ITEMS``
  (scaled by ``cardinality_scale``);
- ``item_category`` int32: item ``i`` belongs to category ``i % CATEGORIES``;
- ``history`` list<int32>: the categories of the user's recent clicks, 0 to
  ``MAX_HISTORY`` of them, most recent first;
- ``price`` float64, log-normal;
- ``hour`` int64 ``YYYYMMDDHH``, rows spread evenly over the days' hours, in time order.

Each row has a session interest (a category); the history's entries are that
category with probability ``HISTORY_FOCUS``, else a uniform one, and the shown
item is from that category with probability ``ITEM_FOCUS``. The planted model::

    logit = bias + w_user[u] + w_item[i] + price_weight * log(price) + hour_of_day[h]
            + history_weight * <mean_{c in history} L[c], L[item_category]>

``L`` is a random (CATEGORIES, latent_dim) table with unit-norm rows, so the last
term is largest when the history holds the item's category; an empty history adds
nothing. Only a model that sees ``history`` (pooled by its mean) can learn that
term: ``report.json`` gives the oracle AUC of the whole logit and of the logit
without it, over each day. ``bias`` is calibrated on a seeded sample so the CTR is
about ``target_ctr``; rows are drawn day by day from ``(seed, day)``, so a day's rows
do not depend on the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.atomic_output import atomic_directory
from trainer.errors import UserError
from trainer.storage import join

START_DAY = datetime.date(2026, 1, 1)
USERS, ITEMS, CATEGORIES = 20_000, 50_000, 100
MAX_HISTORY = 30  # the spec keeps the first max_length (20) of them
HISTORY_FOCUS, ITEM_FOCUS = 0.6, 0.5
REPORT = "report.json"
SCHEMA = pa.schema([
    ("click", pa.int8()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("item_category", pa.int32()),
    ("history", pa.list_(pa.int32())), ("price", pa.float64()), ("hour", pa.int64()),
])  # fmt: skip
_MODEL, _DAY, _CALIBRATION = 0, 1, 2  # SeedSequence spawn-key namespaces


@dataclass(frozen=True)
class AdsLogConfig:
    """What to generate. Same config -> same bytes."""

    rows: int
    days: int = 7
    seed: int = 0
    cardinality_scale: float = 1.0  # multiplies USERS and ITEMS
    latent_dim: int = 8
    zipf_exponent: float = 1.1
    target_ctr: float = 0.2
    history_weight: float = 3.0
    first_order_scale: float = 0.3
    price_weight: float = -0.25

    def __post_init__(self) -> None:
        if self.rows < self.days or self.days < 1:
            raise UserError(f"--rows {self.rows} and --days {self.days}: need at least one day and one row a day")
        if self.seed < 0 or not self.cardinality_scale > 0:
            raise UserError("--seed must be non-negative and --cardinality-scale positive")

    @property
    def users(self) -> int:
        return max(10, round(USERS * self.cardinality_scale))

    @property
    def items(self) -> int:
        return max(CATEGORIES, round(ITEMS * self.cardinality_scale))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _zipf(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """Bounded Zipf ids in [0, size) by inverse CDF of x^-a on [1, size + 1)."""
    a = 1.0 - exponent
    x = np.exp(np.log1p(rng.random(n) * ((size + 1.0) ** a - 1.0)) / a)
    return np.minimum(x.astype(np.int64) - 1, size - 1)


class AdsLogModel:
    """The planted click model (weights drawn from ``(seed, _MODEL)``) and the row sampler."""

    def __init__(self, config: AdsLogConfig):
        self.config = config
        rng = _rng(config.seed, _MODEL)
        s = config.first_order_scale
        self.user_weight = s * rng.standard_normal(config.users)
        self.item_weight = s * rng.standard_normal(config.items)
        self.hour_weight = 0.3 * np.sin(np.arange(24) / 24 * 2 * np.pi)  # busier evenings click less
        latent = rng.standard_normal((CATEGORIES, config.latent_dim))
        self.latent = latent / np.linalg.norm(latent, axis=1, keepdims=True)
        self.bias = 0.0
        self.bias = self._calibrate()

    def sample(self, key: tuple[int, ...], n: int, hours: np.ndarray) -> dict[str, Any]:
        """``n`` rows with the given hours (YYYYMMDDHH): the columns, the logits with and without
        the history term, and the click probability."""
        c = self.config
        rng = _rng(c.seed, *key)
        user = _zipf(rng, n, c.users, c.zipf_exponent)
        interest = rng.integers(0, CATEGORIES, n)
        lengths = rng.integers(0, MAX_HISTORY + 1, n)
        total = int(lengths.sum())
        focused = rng.random(total) < HISTORY_FOCUS
        history = np.where(focused, np.repeat(interest, lengths), rng.integers(0, CATEGORIES, total)).astype(np.int32)
        popular = _zipf(rng, n, c.items, c.zipf_exponent)
        in_interest = rng.integers(0, c.items // CATEGORIES, n) * CATEGORIES + interest
        item = np.where(rng.random(n) < ITEM_FOCUS, in_interest, popular)
        category = (item % CATEGORIES).astype(np.int32)
        price = np.exp(rng.normal(2.5, 1.0, n))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        sums = np.concatenate([np.zeros((1, c.latent_dim)), np.cumsum(self.latent[history], axis=0)])
        pooled = (sums[offsets[1:]] - sums[offsets[:-1]]) / np.maximum(lengths, 1)[:, None]  # mean; 0 for no history
        interaction = c.history_weight * np.einsum("nd,nd->n", pooled, self.latent[category])
        base = (
            self.bias + self.user_weight[user] + self.item_weight[item] + c.price_weight * np.log(price)
            + self.hour_weight[hours % 100]
        )  # fmt: skip
        p = 1.0 / (1.0 + np.exp(-(base + interaction)))
        click = (rng.random(n) < p).astype(np.int8)
        return {
            "columns": {
                "click": click, "user_id": user, "item_id": item, "item_category": category,
                "history": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(history, pa.int32())),
                "price": np.round(price, 2), "hour": hours,
            },  # fmt: skip
            "logit": base + interaction,
            "logit_without_history": base,
            "p_true": p,
        }

    def _calibrate(self) -> float:
        """Bias so that the mean click probability of a seeded sample is ``target_ctr`` (bisection)."""
        n = 1 << 15
        drawn = self.sample((_CALIBRATION,), n, np.full(n, 2026010112, dtype=np.int64))
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (1 / (1 + np.exp(-(drawn["logit"] + mid)))).mean() < self.config.target_ctr else (lo, mid)
        return (lo + hi) / 2


def _auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Rank-sum AUC with average ranks for ties (None for a one-class day)."""
    pos = int(labels.sum())
    neg = len(labels) - pos
    if not pos or not neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def day_hours(day: datetime.date, n: int) -> np.ndarray:
    """``n`` rows spread evenly over the 24 hours of ``day``, in order: int64 YYYYMMDDHH (n,)."""
    stamp = (day.year * 10000 + day.month * 100 + day.day) * 100
    return stamp + (np.arange(n) * 24 // n).astype(np.int64)


def generate_ads_log(config: AdsLogConfig, output: str, overwrite: bool = False) -> dict[str, Any]:
    """Write the daily files and the report into the directory ``output``; returns the report."""
    model = AdsLogModel(config)
    days = []
    with atomic_directory(output, overwrite=overwrite, marker=REPORT, what="synthetic ads log") as tmp:
        for d in range(config.days):
            day = START_DAY + datetime.timedelta(days=d)
            n = config.rows // config.days + (d < config.rows % config.days)
            drawn = model.sample((_DAY, d), n, day_hours(day, n))
            name = f"day_{day.isoformat()}.parquet"
            with fsspec.open(join(tmp, name), "wb") as f:
                pq.write_table(pa.table(drawn["columns"], schema=SCHEMA), f, compression="zstd")
            clicks = drawn["columns"]["click"]
            days.append({
                "file": name, "rows": n, "ctr": float(clicks.mean()),
                "oracle_auc": _auc(drawn["logit"], clicks),
                "oracle_auc_without_history": _auc(drawn["logit_without_history"], clicks),
            })  # fmt: skip
        report = {
            "generator": "trainer.data.synthetic --schema ads_log",
            "config": dataclasses.asdict(config),
            "rows": config.rows,
            "days": days,
            "columns": {f.name: str(f.type) for f in SCHEMA},
            "model": {
                "logit": "bias + w_user[u] + w_item[i] + price_weight * log(price) + hour_of_day[h] "
                "+ history_weight * <mean_{c in history} L[c], L[item_category]>",
                "bias": model.bias,
                "users": config.users, "items": config.items, "categories": CATEGORIES, "max_history": MAX_HISTORY,
            },  # fmt: skip
        }
        with fsspec.open(join(tmp, REPORT), "w") as f:
            json.dump(report, f, indent=2)
    return report


def summary(report: dict[str, Any], output: str, seconds: float) -> str:
    last = report["days"][-1]
    auc = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731 - a one-class day has none
    return "\n".join([
        f"synthetic ads log: {report['rows']:,} rows over {len(report['days'])} days in {seconds:.1f}s -> {output}",
        f"last day ({last['file']}): CTR {last['ctr']:.4f}, oracle AUC {auc(last['oracle_auc'])} "
        f"({auc(last['oracle_auc_without_history'])} without the history term)",
    ])  # fmt: skip
