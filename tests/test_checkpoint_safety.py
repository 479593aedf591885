"""No code runs from a checkpoint, and a checkpoint whose bytes changed is never read as good.

A tiny model is trained once; copies of its checkpoint are then crafted (a ``.metadata``
whose unpickling would run a command) or corrupted (one byte flipped inside a tensor of a
``.distcp`` shard, which DCP loads without complaint), and every way in that reads a
checkpoint is tried: the offline collapse monitor, export, and ``--resume``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ckpt_path, ok, run, train, user_error
from trainer import checkpoint

pytestmark = pytest.mark.slow

STEPS = 12


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    ok(train(f"data.path={tiny_dataset}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "train.eval_every_steps=6"))
    return run_dir


def _copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


class _RunsACommand:
    """Unpickling this runs ``touch MARKER``: what a crafted ``.metadata`` could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _ways_in(run_dir: Path, ckpt: Path, tiny_dataset: Path, tmp_path: Path) -> dict[str, object]:
    """Every CLI that reads a checkpoint, on ``ckpt`` (resume: the run directory's latest)."""
    return {
        "collapse": run([PYTHON, "-m", "trainer.collapse", "--checkpoint", str(ckpt), "--output", str(tmp_path / "report"),
                         "--no-plots"]),
        "export": run([PYTHON, "-m", "trainer.export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "artifact"),
                       "--dataset", str(tiny_dataset)]),
        "resume": train(f"data.path={tiny_dataset}", f"run.dir={run_dir}", f"train.max_steps={STEPS + 6}", resume=str(ckpt)),
    }


def test_a_crafted_metadata_runs_no_code_anywhere(trained, tiny_dataset, tmp_path):
    run_dir = _copy_run(trained, tmp_path / "crafted")
    ckpt = ckpt_path(run_dir, STEPS)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))
    for name, proc in _ways_in(run_dir, ckpt, tiny_dataset, tmp_path).items():
        assert not marker.exists(), f"{name}: the crafted .metadata ran a command"
        user_error(proc, "cannot read its DCP metadata", "posix.system is not allowed")
    assert not (tmp_path / "report").exists() and not (tmp_path / "artifact").exists()


def test_a_flipped_byte_in_a_shard_is_an_error_everywhere(trained, tiny_dataset, tmp_path):
    run_dir = _copy_run(trained, tmp_path / "flipped")
    ckpt = ckpt_path(run_dir, STEPS)
    # flip one byte in the middle of the largest stored tensor (not the zip headers around it)
    storage = pickle.loads((ckpt / ".metadata").read_bytes()).storage_data
    item = max(storage.values(), key=lambda s: s.length)
    shard = ckpt / item.relative_path
    data = bytearray(shard.read_bytes())
    data[item.offset + item.length // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    for name, proc in _ways_in(run_dir, ckpt, tiny_dataset, tmp_path).items():
        user_error(proc, "is corrupt", item.relative_path, "sha256")
    assert not (tmp_path / "report").exists() and not (tmp_path / "artifact").exists()


def test_a_missing_shard_is_an_error(trained, tiny_dataset, tmp_path):
    run_dir = _copy_run(trained, tmp_path / "missing")
    ckpt = ckpt_path(run_dir, STEPS)
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.unlink()
    proc = run([PYTHON, "-m", "trainer.collapse", "--checkpoint", str(ckpt), "--output", str(tmp_path / "report")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(ckpt) in proc.stderr


def test_an_intact_checkpoint_verifies(trained):
    ckpt = ckpt_path(trained, STEPS)
    checkpoint.verify_files(str(ckpt))  # raises on any mismatch
    recorded = json.loads((ckpt / "meta.json").read_text())[checkpoint.FILES_KEY]
    assert set(recorded) == {p.name for p in ckpt.iterdir() if p.name != "meta.json"}
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in recorded.values())
