"""The sweep's cell processes: starting a cell's trainer in its own process group with its
log, watching it to its outcome, stopping it on a timeout or with the sweep; the parallel
slots' GPUs (``CUDA_VISIBLE_DEVICES``), the output directory's lock and SIGTERM."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

from pipelines.sweep_spec import Cell, LauncherSpec, SweepSpec, cell_command, cell_dir, cell_log
from trainer.errors import UserError
from trainer.run_dir import RunDir

# the repository root: the cells' trainer imports from here
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


@dataclass
class Outcome:
    status: str  # done | failed | skipped
    seconds: float | None = None
    error: str | None = None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a cell's whole process group (torchrun and its ranks): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error: ") or "Error:" in line or " ERROR " in line]
    return (errors or lines or ["(empty log)"])[-1][:300]


class CellJob:
    """One cell training in a subprocess (its own process group, so that stopping it takes
    torchrun's ranks along), its output appended to the cell's log."""

    def __init__(self, spec: SweepSpec, cell: Cell, output: str, env: dict[str, str] | None = None):
        self.cell, self.output = cell, output
        self.log_path = cell_log(output, cell)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        cmd = cell_command(spec, cell, output)
        self.timeout = spec.launcher.timeout_minutes * 60 or None
        self.timeout_minutes = spec.launcher.timeout_minutes
        self.start = time.monotonic()
        with open(self.log_path, "a") as logf:
            logf.write(f"\n=== {_dt.datetime.now().isoformat(timespec='seconds')} sweep: {shlex.join(cmd)}\n")
            logf.flush()
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**_child_env(), **(env or {})},
                                         start_new_session=True)  # fmt: skip

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def poll(self) -> Outcome | None:
        """The outcome once the cell has ended (or overrun its time: then it is stopped), else None."""
        rc = self.proc.poll()
        if rc is None:
            if self.timeout is not None and self.seconds > self.timeout:
                self.stop()
                return Outcome("failed", self.seconds, f"stopped after launcher.timeout_minutes={self.timeout_minutes}")
            return None
        if rc == 0 and RunDir(cell_dir(self.output, self.cell)).read_summary() is not None:
            return Outcome("done", self.seconds)
        why = f"exit {rc}" if rc != 0 else "exit 0 but no complete summary.json"
        return Outcome("failed", self.seconds, f"{why}: {_last_error(self.log_path)}")

    def stop(self) -> None:
        _stop(self.proc)


def slot_environments(launcher: LauncherSpec) -> list[dict[str, str]]:
    """The environment of each parallel slot: its own GPUs on a CUDA host, nothing on CPU."""
    if launcher.parallel == 1:
        return [{}]
    try:
        import torch  # here, not at the top: the sweep's CLI answers --help without torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    if gpus == 0:
        return [{} for _ in range(launcher.parallel)]
    need = launcher.parallel * launcher.nproc
    if need > gpus:
        raise UserError(f"launcher.parallel {launcher.parallel} x nproc {launcher.nproc} = {need} GPUs, but this host has {gpus}")
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or [str(i) for i in range(gpus)]
    n = launcher.nproc
    return [{"CUDA_VISIBLE_DEVICES": ",".join(visible[k * n : (k + 1) * n])} for k in range(launcher.parallel)]


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """One sweep at a time per output directory."""
    os.makedirs(output, exist_ok=True)
    f = open(os.path.join(output, ".sweep.lock"), "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise UserError(f"another sweep is running on {output} ({f.read().strip() or 'unknown pid'})") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so that the sweep stops its running cells as on Ctrl-C."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)
