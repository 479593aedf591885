"""Deterministic random train/val/test assignment of rows, by row index.

Each row's split is a pure function of (seed, row index), so a streaming pass
needs no row count and no memory, and two programs agree on it: the synthetic
generator reports oracle metrics for exactly the rows ``preprocess`` will put
in ``test`` (same seed, same fractions).
"""

from __future__ import annotations

import numpy as np

from trainer.errors import UserError

TRAIN, VAL, TEST = 0, 1, 2


def parse_split(spec: str) -> tuple[float, float, float]:
    """``"8,1,1"`` -> (0.8, 0.1, 0.1)."""
    try:
        parts = [float(p) for p in spec.split(",")]
    except ValueError:
        raise UserError(f"--split must be three comma-separated numbers like 8,1,1, got {spec!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0 or parts[0] == 0:
        raise UserError(f"--split must be three non-negative numbers with a positive train part, got {spec!r}")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64: a fast, well-mixed integer hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def assign_splits(row_index: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Split id (TRAIN/VAL/TEST) per row. row_index: int64 (N,) -> int8 (N,)."""
    with np.errstate(over="ignore"):
        h = splitmix64(row_index.astype(np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64)))
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    out = np.full(row_index.shape, TEST, dtype=np.int8)
    out[u < fractions[0] + fractions[1]] = VAL
    out[u < fractions[0]] = TRAIN
    return out


def file_key(file_index: int, row_index: np.ndarray) -> np.ndarray:
    """The random split's key of a row: its index in the file, offset by ``file_index * 2^40``.

    File 0's keys are its row indices: one input file splits exactly as before
    inputs could be several. int64 (N,) -> int64 (N,).
    """
    return row_index + (np.int64(file_index) << np.int64(40))


def files_fractions(splits: set[int], ratios: tuple[float, float, float]) -> tuple[float, float, float]:
    """The fractions a file listed under ``splits`` spreads its rows by: ``ratios`` kept for those splits."""
    kept = [r if s in splits else 0.0 for s, r in enumerate(ratios)]
    if sum(kept) == 0:
        kept = [1.0 if s in splits else 0.0 for s in range(3)]
    total = sum(kept)
    return (kept[0] / total, kept[1] / total, kept[2] / total)


def time_splits(times: np.ndarray, train_before: object, val_before: object) -> np.ndarray:
    """Split id per row by time: ``< train_before`` -> TRAIN, ``< val_before`` -> VAL, else TEST.

    times: (N,) numbers, datetime64 or bytes, comparable with the cut points -> int8 (N,).
    """
    out = np.full(times.shape, TEST, dtype=np.int8)
    out[times < val_before] = VAL
    out[times < train_before] = TRAIN
    return out
