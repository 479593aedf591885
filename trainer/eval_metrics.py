"""Exact evaluation metrics on all rows of a split.

Every rank scores its own part of the split; ``gather`` brings all scores to
every rank (so every rank takes the same early-stopping decision), and the
metrics are computed exactly, in float64, with ties handled (AUC by the
rank-sum formula with average ranks). NE (normalized entropy, as
``torchrec.metrics.ne``) is the logloss divided by the entropy of the split's
base rate: below 1 a model beats always predicting the observed CTR.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of scores (N,) against 0/1 labels (N,); ties count one half. NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def logloss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of logits (N,) against 0/1 labels (N,), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def base_rate_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the base rate p of 0/1 labels (N,): -(p log p + (1-p) log(1-p)), the
    logloss of always predicting p. 0 for a single-class split, NaN for an empty one."""
    y = np.asarray(labels, dtype=np.float64)
    if not len(y):
        return float("nan")
    p = float(y.mean())
    return float(sum(-q * np.log(q) for q in (p, 1.0 - p) if q > 0))


def normalized_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """NE: logloss of logits (N,) against 0/1 labels (N,) over the entropy of their base rate
    (both in nats, float64). NaN where the entropy is 0 (a single-class split) or undefined."""
    entropy = base_rate_entropy(labels)
    if not entropy > 0:
        return float("nan")
    return logloss(logits, labels) / entropy


def gather(values: torch.Tensor) -> np.ndarray:
    """Concatenate a 1-D tensor from every rank (rank order), on every rank. (n_r,) -> (sum n_r,)."""
    values = values.detach().reshape(-1)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values.cpu().numpy()
    sizes = [torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu().numpy()


def binary_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC, logloss, NE (normalized entropy) and calibration (mean predicted CTR / observed CTR) of one split."""
    probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    observed = float(np.mean(labels)) if len(labels) else float("nan")
    return {
        "auc": auc(logits, labels),
        "logloss": logloss(logits, labels),
        "ne": normalized_entropy(logits, labels),
        "calibration": float(probabilities.mean() / observed) if observed > 0 else float("nan"),
        "rows": int(len(labels)),
    }


def undefined_metrics(labels: np.ndarray, split: str) -> dict[str, str]:
    """Why ``binary_metrics`` of 0/1 labels (N,), N >= 1, is NaN, per metric ({} when all are defined)."""
    rows, positives = len(labels), int(np.sum(labels))
    reasons = {}
    if positives in (0, rows):
        single = f"single-class {split} split (all {rows} labels are {int(positives == rows)})"
        reasons["auc"] = f"{single}: AUC undefined"
        reasons["ne"] = f"{single}: NE undefined (the entropy of its base rate is 0)"
    if positives == 0:
        reasons["calibration"] = f"no positive label in the {split} split: calibration (predicted / observed CTR) undefined"
    return reasons
