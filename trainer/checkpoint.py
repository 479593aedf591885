"""Atomic distributed checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``CKPT_DIR/step-00001234`` holding the DCP shards
of the model and both optimizers (every rank writes its own shards; loading
into a different world size reshards), and ``meta.json``: the training
position and what the model was built from. It is written under a temporary
name, and ``meta.json`` plus the rename come last, after every rank has
finished: a checkpoint is complete or invisible.

This module owns the checkpoint format and needs no torch (the sweep and the pipeline use
it through ``trainer.run_dir``): the names (``step-XXXXXXXX``, ``meta.json``, DCP's
``.metadata``), listing and resolving checkpoints, and the sha256 of every file, recorded
in ``meta.json`` when a checkpoint is committed and verified before one is read
(``verify_files``), and the sha256 of ``meta.json``'s own content (``seal``), verified by
``read_meta``: an edited or damaged ``meta.json`` (a flipped digit of the training
position) is an error, one written before digests were recorded is read with a warning.
Saving and loading the tensors is ``trainer.dcp_io``; the keys of the tables in the saved
state are ``trainer.table_layout``'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from trainer.errors import UserError
from trainer.storage import filesystem, join

_NAME = re.compile(r"^step-(\d{8})$")
META = "meta.json"  # written last: the commit marker
DCP_METADATA = ".metadata"  # DCP's own index of the shards
RUN_CHECKPOINTS = "checkpoints"  # where a run directory keeps its checkpoints (trainer.run_dir)
FILES_KEY = "files"  # meta.json: {file name: {"sha256": hex, "bytes": size}} of every other file
DIGEST_KEY = "meta_sha256"  # meta.json: sha256 of the rest of its content (``seal``)
_HASH_BLOCK = 8 << 20

log = logging.getLogger("trainer.checkpoint")


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


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the sha256 of its content under ``DIGEST_KEY``: what ``meta.json`` holds."""
    return {**meta, DIGEST_KEY: _content_digest(json.loads(json.dumps(meta)))}


def _content_digest(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` (as read back from JSON) in a canonical JSON form: key order and
    whitespace do not matter, every value does."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_meta(url: str) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (without its digest), after checking that digest."""
    fs, path = filesystem(join(url, META))
    if not fs.exists(filesystem(url)[1]):
        raise UserError(f"checkpoint not found: {url}")
    if not fs.exists(path):
        raise UserError(f"checkpoint {url} is incomplete: it has no {META} (not written by a finished save)")
    try:
        with fs.open(path, "r") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {url}: {META} is corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint {url}: {META} is corrupt (a JSON {type(meta).__name__}, not an object)")
    recorded = meta.pop(DIGEST_KEY, None)
    if recorded is None:
        log.warning("checkpoint %s: its %s has no digest (written by an older trainer): it is not verified", url, META)
    elif recorded != _content_digest(meta):
        raise UserError(
            f"checkpoint {url} is corrupt: {join(url, META)} does not match the sha256 recorded in it when it was "
            "written (edited or damaged since)"
        )
    return meta


def file_digests(url: str) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` of every file of the checkpoint directory ``url``
    except ``meta.json`` (streamed, 8 MiB at a time)."""
    fs, path = filesystem(url)
    digests = {}
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name == META or entry.get("type") == "directory":
            continue
        sha, size = hashlib.sha256(), 0
        with fs.open(entry["name"], "rb") as f:
            while block := f.read(_HASH_BLOCK):
                sha.update(block)
                size += len(block)
        digests[name] = {"sha256": sha.hexdigest(), "bytes": size}
    return digests


def verify_files(url: str, meta: dict[str, Any] | None = None) -> None:
    """UserError unless every file ``meta.json`` lists is there with its recorded size and
    sha256 (a flipped byte, a truncated or missing shard). A checkpoint written before
    checksums were recorded is read with a warning."""
    meta = read_meta(url) if meta is None else meta
    recorded = meta.get(FILES_KEY)
    if recorded is None:
        log.warning("checkpoint %s has no checksums (written by an older trainer): its files are not verified", url)
        return
    if not isinstance(recorded, dict) or not recorded:
        raise UserError(f"checkpoint {url}: {META} has an invalid {FILES_KEY!r} entry")
    found = file_digests(url)
    for name, expected in sorted(recorded.items()):
        actual = found.get(name)
        if actual is None:
            raise UserError(f"checkpoint {url} is corrupt: its file {name} is missing")
        if actual != expected:
            what = "size" if actual["bytes"] != expected.get("bytes") else "sha256"
            raise UserError(
                f"checkpoint {url} is corrupt: {name} does not match the {what} recorded when it was written "
                f"({actual['bytes']} bytes now, {expected.get('bytes')} recorded)"
            )
