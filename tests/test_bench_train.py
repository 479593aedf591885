"""``bench.bench_train`` runs end to end at a tiny size and prints its columns (it times
nothing that a test checks: the figures only have to be numbers)."""

from __future__ import annotations

import re

import pytest

from bench.bench_train import cardinalities, grid
from tests.helpers import PYTHON, run


def test_grid_runs_se_and_me_1x_once_and_vocabulary_is_criteo_sized():
    rows = grid(["dcnv2"], ["se", "me"], [1, 2])
    assert [(r.mode, r.scale, r.num_sets, r.dim) for r in rows] == [("se", 1, 1, 10), ("se", 2, 1, 20), ("me", 2, 2, 10)]
    cards = cardinalities(1_090_000)
    assert len(cards) == 39 and abs(sum(cards) - 1_090_000) < 2_000 and min(cards) >= 4


@pytest.mark.slow
def test_bench_train_runs_tiny_beside_the_baseline_and_prints_its_columns():
    proc = run([PYTHON, "-m", "bench.bench_train", "--models", "dcnv2", "--modes", "me", "--scales", "2", "--ranks", "1",
                "--vocab", "400", "--batch", "64", "--warmup", "1", "--steps", "2", "--profile-steps", "1"], timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("machine: ")
    assert re.search(r"model\s+emb\s+layout\s+ex/s\s+/authors\s+outside mm\s+peak MiB\s+peak/model\s+state/model\s+activ MiB", out)
    number = r"[\d,]+"
    assert re.search(rf"dcnv2\s+ME 2x\s+authors\s+{number}\s+1\.00x\s+\d+%\s+{number}\s+-", out), out
    ours = re.search(rf"dcnv2\s+ME 2x\s+ours 1 proc\s+{number}\s+[\d.]+x\s+\d+%\s+{number}\s+[\d.]+\s+([\d.]+)\s+({number})", out)
    assert ours, out
    assert float(ours.group(1)) >= 1.0, out  # the built trainer holds at least its tables and dense model
