"""Atomic distributed checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``CKPT_DIR/step-00001234`` holding the DCP shards
of the model and both optimizers (every rank writes its own shards; loading
into a different world size reshards), and ``meta.json``: the training
position and what the model was built from. It is written under a temporary
name, and ``meta.json`` plus the rename come last, after every rank has
finished: a checkpoint is complete or invisible.

This module owns the checkpoint format: the names (``step-XXXXXXXX``, ``meta.json``, DCP's
``.metadata``), listing and resolving checkpoints, and saving and loading them. Listing and
resolving need no torch (the sweep and the pipeline use them through ``trainer.run_dir``);
torch's DCP is imported by the functions that move tensors. The keys of the tables in the
saved state are ``trainer.table_layout``'s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from trainer.errors import UserError
from trainer.storage import filesystem, join

_NAME = re.compile(r"^step-(\d{8})$")
META = "meta.json"  # written last: the commit marker
DCP_METADATA = ".metadata"  # DCP's own index of the shards
RUN_CHECKPOINTS = "checkpoints"  # where a run directory keeps its checkpoints (trainer.run_dir)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    url: str
    step: int


def list_checkpoints(ckpt_dir: str) -> list[CheckpointInfo]:
    """Complete checkpoints under ``ckpt_dir``, oldest first (temporary ones, and any without
    ``meta.json``, e.g. left by an interrupted copy on an object store, are skipped)."""
    fs, path = filesystem(ckpt_dir)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _NAME.match(name)
        if match and fs.exists(f"{path.rstrip('/')}/{name}/{META}"):  # meta.json is the commit marker
            found.append(CheckpointInfo(join(ckpt_dir, name), int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def is_complete(url: str) -> bool:
    """Whether ``url`` is a committed checkpoint (it has ``meta.json``)."""
    fs, path = filesystem(url)
    return fs.exists(join(path, META))


def resolve_checkpoint(url: str) -> str:
    """The checkpoint ``url`` names: a checkpoint directory itself, or a run directory (or
    its ``checkpoints/``), meaning its latest complete checkpoint. UserError otherwise."""
    url = url.rstrip("/") or url
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise UserError(f"checkpoint not found: {url}")
    if fs.exists(join(path, META)):
        return url
    if fs.exists(join(path, DCP_METADATA)):
        raise UserError(f"checkpoint {url} is incomplete: it has no {META} (not written by a finished save)")
    for ckpt_dir in (join(url, RUN_CHECKPOINTS), url):
        found = list_checkpoints(ckpt_dir)
        if found:
            return found[-1].url
    raise UserError(
        f"{url} is not a checkpoint (no {META}) nor a run directory with complete checkpoints "
        f"(no {RUN_CHECKPOINTS}/step-XXXXXXXX/ in it)"
    )


def read_meta(url: str) -> dict[str, Any]:
    fs, path = filesystem(join(url, META))
    if not fs.exists(filesystem(url)[1]):
        raise UserError(f"checkpoint not found: {url}")
    if not fs.exists(path):
        raise UserError(f"checkpoint {url} is incomplete: it has no {META} (not written by a finished save)")
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {url}: {META} is corrupt ({e})") from None


def save(ckpt_dir: str, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Save ``state`` (model / optimizer state dicts) on every rank; rank 0 commits it. Returns its URL."""
    import torch.distributed.checkpoint as dcp

    final = join(ckpt_dir, checkpoint_name(step))
    tmp = final + ".tmp"
    fs, tmp_path = filesystem(tmp)

    def prepare() -> None:
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)  # left by a crashed save
        fs.makedirs(tmp_path, exist_ok=True)

    def commit() -> None:
        with fs.open(join(tmp_path, META), "w") as f:
            json.dump(meta, f, indent=2)
        final_path = filesystem(final)[1]
        if fs.exists(final_path):
            fs.rm(final_path, recursive=True)
        fs.mv(tmp_path, final_path, recursive=True)

    on_rank0(prepare)
    dcp.save(state, checkpoint_id=tmp)
    _barrier()
    on_rank0(commit)
    return final


def load(url: str, state: dict[str, Any]) -> None:
    """Load a checkpoint in place into ``state`` (every rank; check ``read_meta`` first). Clear
    errors, never a silent restart."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    fs, path = filesystem(url)
    if not fs.exists(path):
        raise UserError(f"checkpoint not found: {url}")
    try:
        dcp.load(state, checkpoint_id=url)
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank read errors in a BaseException
        first = first_error_line(e)
        raise UserError(f"checkpoint {url} is corrupt or does not match this model: {first[:500]}") from None


def first_error_line(e: BaseException) -> str:
    """The root cause of a DCP failure in one line (a CheckpointException holds the per-rank
    failures; its own text is a traceback)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException):
        failures = getattr(e, "failures", {}) or {}
        causes = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        causes = [c for c in causes if isinstance(c, BaseException)]
        if causes:
            cause = causes[0]
            while cause.__cause__ is not None:
                cause = cause.__cause__
            return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def prune(ckpt_dir: str, keep: set[int]) -> None:
    """Remove complete checkpoints whose step is not in ``keep`` (collective; rank 0 removes)."""

    def remove() -> None:
        fs = filesystem(ckpt_dir)[0]
        for info in list_checkpoints(ckpt_dir):
            if info.step not in keep:
                fs.rm(filesystem(info.url)[1], recursive=True)

    on_rank0(remove)


def on_rank0(work: Callable[[], None]) -> None:
    """Run ``work`` on rank 0 and make every rank raise if it failed (collective): a failure
    on rank 0 alone must not leave the other ranks waiting in the next collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        work()
        return
    outcome: list[BaseException | None] = [None]
    if dist.get_rank() == 0:
        try:
            work()
        except Exception as e:  # handed to every rank below
            outcome[0] = e
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        if dist.get_rank() == 0:
            raise outcome[0]
        raise UserError(f"rank 0 failed: {type(outcome[0]).__name__}: {outcome[0]}")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
