"""Helpers of the sweep tests (``tests/test_sweep.py``, ``tests/test_sweep_torchx.py``): a tiny
sweep spec over the tiny dataset, and ``python -m pipelines.sweep`` in a subprocess."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from pipelines import sweep_spec
from tests.helpers import PYTHON, TINY, run

# TINY without the keys every cell sets from the grid (model, mode, scale, base dim)
TINY_SWEEP = [o for o in TINY if o.split("=")[0] not in sweep_spec.CELL_KEYS] + ["train.epochs=1"]


def tiny_spec(tmp: Path, dataset: Path, name: str, **extra) -> Path:
    """``tmp/NAME.yaml``: DNN and DCNv2, SE and ME, 1x and 2x, seed 0 on ``dataset``, output
    ``tmp/NAME``; ``extra`` replaces top-level keys."""
    spec = {
        "output": str(tmp / name),
        "datasets": {"tiny": str(dataset)},
        "models": ["dnn", "dcnv2"],
        "modes": ["se", "me"],
        "scales": [1, 2],
        "seeds": [0],
        "base_dim": {"default": 4},
        "overrides": TINY_SWEEP,
        **extra,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_cli(spec: Path, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``python -m pipelines.sweep --spec SPEC ARGS...`` with ``env`` added to its environment."""
    return run([PYTHON, "-m", "pipelines.sweep", "--spec", str(spec), *args], timeout=timeout, **env)
