"""The sweep's cell processes: starting a cell's trainer in its own process group with its
log, watching it to its outcome, stopping it on a timeout or with the sweep; or, with
``launcher.scheduler`` local_cwd or kubernetes, submitting it as its own torchx job (the
``train`` component) and polling it; the parallel slots' GPUs (``CUDA_VISIBLE_DEVICES``),
the output directory's lock and SIGTERM."""

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

from pipelines.sweep_spec import (
    Cell,
    LauncherSpec,
    SweepSpec,
    cell_command,
    cell_dir,
    cell_log,
    cell_overrides,
    is_url,
)  # fmt: skip
from trainer.errors import UserError
from trainer.run_dir import RunDir
from trainer.storage import filesystem

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


# ---- a cell as a torchx job ---------------------------------------------------------------

LOG_TAIL_LINES = 200  # of a torchx cell's job log, kept in the cell's log file


def cell_app(spec: SweepSpec, cell: Cell, output: str) -> Any:
    """The torchx AppDef that trains ``cell``: the ``train`` component on one host of
    ``launcher.nproc`` ranks, with the cell's --set values (data.path and run.dir included)."""
    from pipelines import components  # torchx: imported only when a scheduler needs it

    la = spec.launcher
    return components.train(
        *cell_overrides(spec, cell, output), config=spec.config, data=spec.datasets[cell.dataset],
        run_dir=cell_dir(output, cell), j=f"1x{la.nproc}", image=la.image, cpu=la.cpu, gpu=la.gpu, memMB=la.memMB,
        run_id=cell.id, env=dict(la.env), max_retries=la.max_restarts, mounts=list(la.mounts) or None,
    )  # fmt: skip


def scheduler_cfg(spec: SweepSpec, output: str) -> dict[str, Any]:
    """torchx's run config for the cells' scheduler (``launcher.scheduler_args``; on local_cwd
    the jobs' logs kept under OUT/logs/torchx, not in a temporary directory)."""
    cfg: dict[str, Any] = dict(spec.launcher.scheduler_args)
    if spec.launcher.scheduler == "local_cwd" and "log_dir" not in cfg and not is_url(output):
        cfg["log_dir"] = os.path.abspath(os.path.join(output, "logs", "torchx"))
    return cfg


def prepare_scheduler(spec: SweepSpec) -> None:
    """local_cwd runs ``torchrun trainer/main.py`` in the current directory with the venv's tools."""
    if spec.launcher.scheduler != "local_cwd":
        return
    if not os.path.isfile(os.path.join("trainer", "main.py")):
        raise UserError(f"launcher.scheduler local_cwd runs trainer/main.py from the current directory: run the sweep from {ROOT}")
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def append_text(url: str, text: str) -> None:
    """Append to a local file or an fsspec URL (object stores: read, then write the whole)."""
    fs, path = filesystem(url)
    fs.makedirs(os.path.dirname(path) if not is_url(url) else path.rsplit("/", 1)[0], exist_ok=True)
    if not is_url(url):
        with open(url, "a") as f:
            f.write(text)
        return
    old = fs.cat_file(path).decode(errors="replace") if fs.exists(path) else ""
    fs.pipe_file(path, (old + text).encode())


class TorchxCellJob:
    """One cell as its own torchx job on ``launcher.scheduler``, polled for its outcome; when it
    ends, the tail of its job log is appended to the cell's log (where the table points)."""

    def __init__(self, runner: Any, spec: SweepSpec, cell: Cell, output: str):
        self.runner, self.cell, self.output = runner, cell, output
        self.scheduler = spec.launcher.scheduler
        self.log_path = cell_log(output, cell)
        self.timeout = spec.launcher.timeout_minutes * 60 or None
        self.timeout_minutes = spec.launcher.timeout_minutes
        self.app = cell_app(spec, cell, output)
        self.start = time.monotonic()
        try:
            self.handle = runner.run(self.app, self.scheduler, cfg=scheduler_cfg(spec, output))
        except Exception as e:  # noqa: BLE001 - the scheduler's client raises anything (no cluster config, RBAC, ...)
            raise UserError(f"cell {cell.id}: cannot submit it to {self.scheduler} ({type(e).__name__}: {e})") from None
        append_text(self.log_path, f"\n=== {_dt.datetime.now().isoformat(timespec='seconds')} sweep: torchx job {self.handle}\n")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def _job_log(self) -> list[str]:
        lines: list[str] = []
        for role in self.app.roles:
            for replica in range(role.num_replicas):
                try:
                    lines += [line.rstrip("\n") for line in self.runner.log_lines(self.handle, role.name, replica)]
                except Exception as e:  # noqa: BLE001 - logs are best effort: the outcome is what we report
                    lines.append(f"(no log of {role.name}/{replica}: {type(e).__name__}: {e})")
        return lines

    def poll(self) -> Outcome | None:
        from torchx import specs

        status = self.runner.status(self.handle)
        state = status.state if status is not None else specs.AppState.UNKNOWN
        if not specs.is_terminal(state):
            if self.timeout is not None and self.seconds > self.timeout:
                self.stop()
                return Outcome("failed", self.seconds, f"stopped after launcher.timeout_minutes={self.timeout_minutes} ({self.handle})")
            return None
        lines = self._job_log()
        append_text(self.log_path, "".join(f"{line}\n" for line in lines[-LOG_TAIL_LINES:]))
        if state == specs.AppState.SUCCEEDED and RunDir(cell_dir(self.output, self.cell)).read_summary() is not None:
            return Outcome("done", self.seconds)
        errors = [line for line in lines if "error: " in line or "Error:" in line]
        last = (errors or [line for line in lines if line.strip()] or ["(empty log)"])[-1].strip()[:300]
        why = f"job {state.name.lower()}" if state != specs.AppState.SUCCEEDED else "job succeeded but no complete summary.json"
        return Outcome("failed", self.seconds, f"{why} ({self.handle}): {last}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # best effort: the job may be gone already
            self.runner.cancel(self.handle)


def slot_environments(launcher: LauncherSpec) -> list[dict[str, str]]:
    """The environment of each parallel slot: its own GPUs on a CUDA host; on CPU its share of
    the cores as each rank's thread count (``CTR_CPU_THREADS``, read by the trainer), so that
    parallel cells do not oversubscribe the host (a rank whose threads outnumber its cores
    stalls whenever one of them is descheduled)."""
    if launcher.parallel == 1:
        return [{}]
    try:
        import torch  # here, not at the top: the sweep's CLI answers --help without torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    if gpus == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // (launcher.parallel * launcher.nproc))
        return [{"CTR_CPU_THREADS": str(threads)} for _ in range(launcher.parallel)]
    need = launcher.parallel * launcher.nproc
    if need > gpus:
        raise UserError(f"launcher.parallel {launcher.parallel} x nproc {launcher.nproc} = {need} GPUs, but this host has {gpus}")
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or [str(i) for i in range(gpus)]
    n = launcher.nproc
    return [{"CUDA_VISIBLE_DEVICES": ",".join(visible[k * n : (k + 1) * n])} for k in range(launcher.parallel)]


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """One sweep at a time per output directory (an object-store URL cannot be locked: there
    it is up to you to run one sweep at a time)."""
    if is_url(output):
        yield
        return
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
