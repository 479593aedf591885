"""The evaluation metrics of ``trainer.eval_metrics`` on made-up scores: normalized entropy
(NE) by hand and against TorchRec's own NE, and what is undefined on a single-class split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.eval_metrics import base_rate_entropy, binary_metrics, logloss, normalized_entropy, undefined_metrics


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_ne_by_hand():
    logits = [2.0, -1.0, 0.5, 0.0, -3.0]
    labels = [1, 0, 0, 1, 0]
    # logloss: -mean(y log p + (1 - y) log(1 - p)), written out row by row
    rows = [
        -math.log(_sigmoid(2.0)),
        -math.log(1 - _sigmoid(-1.0)),
        -math.log(1 - _sigmoid(0.5)),
        -math.log(_sigmoid(0.0)),
        -math.log(1 - _sigmoid(-3.0)),
    ]
    hand_logloss = sum(rows) / 5
    p = 2 / 5  # the base rate
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert base_rate_entropy(np.array(labels)) == pytest.approx(entropy, rel=1e-14)
    assert logloss(np.array(logits), np.array(labels)) == pytest.approx(hand_logloss, rel=1e-14)
    assert normalized_entropy(np.array(logits), np.array(labels)) == pytest.approx(hand_logloss / entropy, rel=1e-14)
    metrics = binary_metrics(np.array(logits, dtype=np.float32), np.array(labels, dtype=np.float32))
    assert metrics["ne"] == pytest.approx(hand_logloss / entropy, rel=1e-6)  # float32 logits in, float64 inside


def test_predicting_the_base_rate_is_ne_one():
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)
    p = labels.mean()
    logits = np.full(len(labels), math.log(p / (1 - p)))
    assert normalized_entropy(logits, labels) == pytest.approx(1.0, abs=1e-12)
    better = np.where(labels == 1, 1.0, -2.0)  # separates the classes: beats the base rate
    assert normalized_entropy(better, labels) < 1.0


def test_ne_matches_torchrec():
    torch = pytest.importorskip("torch")
    from torchrec.metrics.ne import compute_ne, get_ne_states

    rng = np.random.default_rng(0)
    logits = rng.normal(-1.0, 1.5, size=5000).astype(np.float32)
    labels = (rng.random(5000) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    eta = 1e-12  # NEMetric's default
    states = get_ne_states(
        torch.from_numpy(labels).double(), torch.sigmoid(torch.from_numpy(logits).double()), torch.ones(5000, dtype=torch.double), eta
    )
    theirs = compute_ne(states["cross_entropy_sum"], states["weighted_num_samples"], states["pos_labels"], states["neg_labels"], eta)
    ours = binary_metrics(logits, labels)["ne"]
    assert ours == pytest.approx(float(theirs), rel=1e-9)
    assert 0.5 < ours < 1.0


@pytest.mark.parametrize("label", [0, 1])
def test_ne_of_a_single_class_split_is_undefined_with_a_reason(label):
    labels = np.full(4, label, dtype=np.float32)
    logits = np.array([0.1, -0.2, 0.3, 0.0])
    assert base_rate_entropy(labels) == 0.0
    assert math.isnan(binary_metrics(logits, labels)["ne"])
    reasons = undefined_metrics(labels, "val")
    assert f"single-class val split (all 4 labels are {label})" in reasons["ne"] and "NE undefined" in reasons["ne"]
    assert math.isnan(normalized_entropy(np.array([]), np.array([])))


def test_ne_is_defined_with_both_classes():
    labels = np.array([0, 1, 0, 0], dtype=np.float32)
    assert "ne" not in undefined_metrics(labels, "test")
    assert math.isfinite(binary_metrics(np.zeros(4), labels)["ne"])


def test_summary_text_shows_ne_and_reads_summaries_without_it():
    from trainer.run_dir import format_summary

    summary = {
        "model": "dcnv2", "embedding": "me 2x", "world_size": 1, "device": "cpu", "dataset": "d",
        "test_auc": 0.7, "oracle_test_auc": 0.8, "test_logloss": 0.45, "oracle_test_logloss": 0.4,
        "test_ne": 0.91234, "val_auc": 0.69, "val_ne": None, "best_step": 10, "steps": 10,
        "epochs_completed": 1, "stopped_early": False, "train_examples": 100, "train_examples_per_sec": 50.0,
    }  # fmt: skip
    text = format_summary(summary, "runs/x")
    assert "test NE       0.91234" in text and "val NE        n/a" in text
    del summary["test_ne"], summary["val_ne"]  # a summary written before NE was reported
    assert "test NE       n/a" in format_summary(summary, "runs/x")
