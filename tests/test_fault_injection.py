"""SIGKILL at random moments: preprocess, training and export never leave a half output.

Each tool runs once uninterrupted (the reference), then again killed with SIGKILL after a
random fraction of the reference's wall time, for a few seeds; the last seed's kill then
waits for the tool to be writing (its temporary output or checkpoint exists: much of a
run's time is imports and reading, where a kill proves little) and the test checks that
it landed there, with the process frozen (SIGSTOP) so that it cannot finish the write
between the check and the kill. After every kill the output
is checked to be either the old complete output (what was there before) or the new
complete one, never a mixture; a rerun of the same command then finishes with exactly the
uninterrupted result. The offsets come from a seeded generator, so a failure reproduces.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers import PYTHON, ROOT, TINY, cli_env, ok, run
from trainer import checkpoint
from trainer.export.runtime import verify_manifest

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)


def _killed_at_random(cmd: list[str], seconds: float, seed: int, writing: Callable[[], list[Path]] | None = None) -> float:
    """Start ``cmd`` and SIGKILL its whole process group after a seeded random share of
    ``seconds`` (5% to 95%). With ``writing`` (the temporaries the tool is writing, if any),
    the offset is at most half the time (so that a write is still to come, even when this run
    is faster than the reference), the kill waits after it until there is a temporary, and
    asserts that it landed while one was there. Returns the offset used."""
    offset = random.Random(seed).uniform(0.05, 0.5 if writing else 0.95) * seconds
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=offset)
    except subprocess.TimeoutExpired:
        if writing is not None:
            _wait_for_a_write(proc, writing, offset)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if writing is not None:
            assert writing(), f"seed {seed}: the kill at {offset:.2f}s found no temporary left"
        return offset
    assert writing is None, f"seed {seed}: the run ended before {offset:.2f}s, before a kill while writing"
    return offset


def _wait_for_a_write(proc: subprocess.Popen, writing: Callable[[], list[Path]], offset: float) -> None:
    """Poll until ``writing()`` finds a temporary, then freeze the process group (SIGSTOP) and
    check again: the kill that follows lands while the temporary is being written."""
    while True:
        assert proc.poll() is None, f"the run ended after {offset:.2f}s without a write seen in progress"
        if writing():
            os.killpg(proc.pid, signal.SIGSTOP)
            if writing():
                return
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.001)


def _timed(cmd: list[str]) -> float:
    start = time.monotonic()
    ok(run(cmd, timeout=300))
    return time.monotonic() - start


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hex)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _temporaries(out: Path) -> Callable[[], list[Path]]:
    """The temporary directories of ``trainer.atomic_output`` beside ``out`` (not their owner files)."""
    pattern = re.compile(re.escape(out.name) + r"\.tmp-[0-9a-f]{8}")
    return lambda: [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]


def _siblings(path: Path) -> list[str]:
    """Names beside ``path`` that start with its name (temporaries, swapped-out old outputs)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path)


# ---- preprocess ------------------------------------------------------------------------------


def test_preprocess_killed_anywhere_leaves_the_old_or_the_new_dataset(tmp_path):
    raw = tmp_path / "raw.tsv"
    ok(run([PYTHON, "-m", "trainer.data.synthetic", "--rows", "30000", "--output", str(raw), "--format", "criteo-tsv",
            "--cardinality-scale", "0.002"], timeout=120))
    old_raw = tmp_path / "old.tsv"
    ok(run([PYTHON, "-m", "trainer.data.synthetic", "--rows", "3000", "--seed", "5", "--output", str(old_raw),
            "--format", "criteo-tsv", "--cardinality-scale", "0.002"], timeout=120))

    def preprocess(source: Path, out: Path) -> list[str]:
        return [PYTHON, "-m", "trainer.data.preprocess", "--dataset", "criteo", "--input", str(source), "--output", str(out),
                "--overwrite", "--no-progress"]

    reference = tmp_path / "reference"
    seconds = _timed(preprocess(raw, reference))
    new = _digest(reference)
    for seed in SEEDS:
        out = tmp_path / f"out{seed}"
        ok(run(preprocess(old_raw, out), timeout=120))
        old = _digest(out)
        offset = _killed_at_random(preprocess(raw, out), seconds, seed, _temporaries(out) if seed == SEEDS[-1] else None)
        state = _digest(out) if out.exists() else None
        assert state in (old, new), f"seed {seed}: killed at {offset:.2f}s of {seconds:.2f}s, the dataset is neither old nor new"
        ok(run(preprocess(raw, out), timeout=120))
        assert _digest(out) == new, f"seed {seed}: the rerun after a kill at {offset:.2f}s differs from the uninterrupted run"
        assert not _siblings(out), f"seed {seed}: left beside the output after the rerun: {_siblings(out)}"


# ---- training --------------------------------------------------------------------------------


def _train_cmd(data: Path, run_dir: Path) -> list[str]:
    return [PYTHON, "-m", "trainer.main", "--set", *TINY, f"data.path={data}", f"run.dir={run_dir}", "train.epochs=2",
            "train.checkpoint_every_steps=3", "--resume", "auto"]


def _complete_checkpoints_only(run_dir: Path) -> None:
    """Every checkpoint the run directory shows as complete verifies; summary.json, when
    there, is whole JSON."""
    for info in checkpoint.list_checkpoints(str(run_dir / "checkpoints")):
        checkpoint.verify_files(info.url)
    if (run_dir / "summary.json").exists():
        json.loads((run_dir / "summary.json").read_text())


def test_training_killed_anywhere_resumes_to_the_uninterrupted_result(tiny_dataset, tmp_path):
    reference = tmp_path / "reference"
    seconds = _timed(_train_cmd(tiny_dataset, reference))
    expected = json.loads((reference / "summary.json").read_text())
    for seed in SEEDS:
        run_dir = tmp_path / f"run{seed}"
        saving = lambda: list((run_dir / "checkpoints").glob("step-*.tmp")) if (run_dir / "checkpoints").exists() else []  # noqa: E731, B023
        offset = _killed_at_random(_train_cmd(tiny_dataset, run_dir), seconds, seed, saving if seed == SEEDS[-1] else None)
        if run_dir.exists():
            _complete_checkpoints_only(run_dir)
        ok(run(_train_cmd(tiny_dataset, run_dir), timeout=300))
        got = json.loads((run_dir / "summary.json").read_text())
        for key in ("test_auc", "test_logloss", "val_auc", "best_step", "steps"):
            assert got[key] == expected[key], f"seed {seed}: killed at {offset:.2f}s of {seconds:.2f}s, {key} differs"


# ---- export ----------------------------------------------------------------------------------


def test_export_killed_anywhere_leaves_the_old_or_the_new_artifact(tmp_path):
    raw, data = tmp_path / "raw.tsv", tmp_path / "data"  # export needs a preprocessed dataset (raw -> id maps)
    ok(run([PYTHON, "-m", "trainer.data.synthetic", "--rows", "6000", "--output", str(raw), "--format", "criteo-tsv",
            "--cardinality-scale", "0.0005"], timeout=120))
    ok(run([PYTHON, "-m", "trainer.data.preprocess", "--dataset", "criteo", "--input", str(raw), "--output", str(data),
            "--no-progress"], timeout=120))
    runs = {}
    for name, mode in (("old", "se"), ("new", "me")):
        runs[name] = tmp_path / f"train-{name}"
        ok(run([PYTHON, "-m", "trainer.main", "--set", *TINY, f"data.path={data}", f"run.dir={runs[name]}",
                f"embedding.mode={mode}", "train.epochs=1"], timeout=300))

    def export(name: str, out: Path) -> list[str]:
        return [PYTHON, "-m", "trainer.export", "--checkpoint", str(runs[name]), "--output", str(out), "--overwrite"]

    def program(out: Path) -> str | None:
        """The artifact's identity: its program's sha256 as its manifest records it (None: no artifact)."""
        if not out.exists():
            return None
        return verify_manifest(out)["files"]["program.pt2"]["sha256"]  # raises for a half-written artifact

    reference = tmp_path / "reference"
    seconds = _timed(export("new", reference))
    for seed in SEEDS:
        out = tmp_path / f"artifact{seed}"
        ok(run(export("old", out), timeout=300))
        old = program(out)
        offset = _killed_at_random(export("new", out), seconds, seed, _temporaries(out) if seed == SEEDS[-1] else None)
        assert program(out) in (old, program(reference)), f"seed {seed}: killed at {offset:.2f}s, neither old nor new"
        ok(run(export("new", out), timeout=300))
        assert program(out) == program(reference), f"seed {seed}: the rerun differs from the uninterrupted export"
