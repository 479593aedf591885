"""Plain helpers shared by the tests: ``from tests.helpers import ...`` (fixtures, such as
``tiny_dataset``, live in ``tests/conftest.py`` and need no import).

The CLI helpers run the real CLI in subprocesses (``python -m trainer.main``, ``torchrun``,
``torchx``) from the repository root, on a tiny synthetic dataset and a tiny model, so
the whole trainer suite stays within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable

# A model small enough to train an epoch in about a second, big enough to learn something:
# DCNv2, multi-embedding with 2 sets of dim 4 (2 x 39 tables).
TINY = [
    "model.name=dcnv2",
    "model.hidden=16",
    "model.cross_layers=1",
    "embedding.mode=me",
    "embedding.scale=2",
    "embedding.base_dim=4",
    "train.batch_size=256",
    "train.log_every_steps=5",
    "optim.embedding=rowwise_adagrad",
    "optim.embedding_lr=0.1",
    "optim.dense_lr=0.01",
]

SUMMARY_KEYS = {
    "val_auc",
    "val_logloss",
    "val_ne",
    "test_auc",
    "test_logloss",
    "test_ne",
    "test_calibration",
    "best_step",
    "best_checkpoint",
    "steps",
    "epochs_completed",
    "stopped_early",
    "train_examples",
    "train_seconds",
    "train_examples_per_sec",
    "world_size",
    "device",
    "model",
    "embedding",
    "dataset",
    "oracle_test_auc",
    "oracle_test_logloss",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID",
                "CTR_FAIL_AT_STEP", "CTR_FAIL_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def train(*overrides: str, resume: str | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``python -m trainer.main --set TINY... overrides... [--resume R]`` (one process)."""
    cmd = [PYTHON, "-m", "trainer.main", "--set", *TINY, *overrides]
    if resume is not None:
        cmd += ["--resume", resume]
    return run(cmd, timeout=timeout, **env)


def torchrun(*overrides: str, nproc: int = 2, max_restarts: int = 0, resume: str | None = None,
             timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N trainer/main.py --set TINY... overrides...`` (gloo ranks)."""
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
           "--monitor-interval", "0.5",
           "trainer/main.py", "--set", *TINY, *overrides]
    if resume is not None:
        cmd += ["--resume", resume]
    return run(cmd, timeout=timeout, **env)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): what a killed run's owner file names."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert a clean user error: exit 2, ``error: ...`` naming every needle, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}\nstderr:\n{err[-6000:]}"
    assert "Traceback" not in err, err[-6000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines, f"no 'error: ' line on stderr:\n{err[-6000:]}"
    message = err[err.index(lines[0]):]
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in the error message:\n{message}"
    return message


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir()) if ckpts.exists() else []


def ckpt_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def load_checkpoint_tensors(path: Path, tmp: Path) -> dict:
    """Every tensor of a DCP checkpoint (model + optimizer state), whatever world size wrote it,
    as one flat ``{key: tensor}`` dict (DCP -> torch.save, no process group needed)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=False)
    flat: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}{i}.", v)
        else:
            flat[prefix.rstrip(".")] = node

    walk("", state)
    return flat


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-6, what: str = "checkpoint") -> None:
    import torch

    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:10]}"
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert any(".weight" in k and "embedding" in k for k in tensors), f"{what}: no embedding tables among {tensors[:5]}"
    for key in tensors:
        x, y = a[key], b[key]
        assert x.shape == y.shape, f"{what}: {key} has shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.is_floating_point():
            diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            assert diff <= atol, f"{what}: {key} differs by {diff}"
        else:
            assert torch.equal(x, y), f"{what}: {key} differs"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def make_dataset(out: Path, cardinality_scale: float = 0.0005, rows: int = 6000) -> Path:
    ok(run([PYTHON, "-m", "trainer.data.synthetic", "--rows", str(rows), "--output", str(out), "--format", "parquet",
            "--cardinality-scale", str(cardinality_scale)], timeout=120))
    return out


class Launcher:
    """Runs slow CLI jobs (mostly interpreter and TorchRec start-up) two at a time in the
    background, so a module's independent runs overlap; tests pick results up by name.

    ``submit(name, fn, ...)`` starts ``fn`` now; ``after(name, dep, fn)`` starts it once job
    ``dep`` succeeded (and fails with ``dep``'s error otherwise); ``result(name)`` waits.
    """

    def __init__(self, workers: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[str, Future] = {}

    def submit(self, name: str, fn, *args, **kwargs) -> None:
        self.futures[name] = self.pool.submit(fn, *args, **kwargs)

    def after(self, name: str, dep: str, fn, *args, **kwargs) -> None:
        placeholder: Future = Future()
        self.futures[name] = placeholder

        def relay(inner: Future) -> None:
            if inner.exception() is not None:
                placeholder.set_exception(inner.exception())
            else:
                placeholder.set_result(inner.result())

        def start(done: Future) -> None:
            if done.exception() is not None:
                placeholder.set_exception(RuntimeError(f"{dep!r}, which {name!r} needs, failed: {done.exception()}"))
            else:
                self.pool.submit(fn, *args, **kwargs).add_done_callback(relay)

        self.futures[dep].add_done_callback(start)

    def result(self, name: str, timeout: float = 900):
        return self.futures[name].result(timeout=timeout)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
