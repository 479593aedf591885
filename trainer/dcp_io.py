"""Saving and loading training checkpoints with ``torch.distributed.checkpoint`` (DCP), safely.

``save`` writes every rank's shards under a temporary name; rank 0 then records the sha256
of every file (and of ``meta.json``'s own content) in ``meta.json`` and renames the directory
(``trainer.checkpoint`` owns that format). ``load`` verifies those checksums, so a flipped
byte or a truncated shard is an error, never a silently different model.

No code runs from a checkpoint. DCP's own reader unpickles ``.metadata`` with plain
``pickle`` and non-tensor entries with ``torch.load(weights_only=False)``: a crafted file
would run what it likes. Here ``.metadata`` goes through an allow-list unpickler (only the
DCP metadata classes, torch dtypes and sizes, and paths) and non-tensor entries through
``torch.load(weights_only=True)``; anything else is refused with a clear error.
"""

from __future__ import annotations

import io
import json
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from trainer import checkpoint
from trainer.dist_context import barrier, on_rank0
from trainer.errors import UserError
from trainer.storage import filesystem, join

# (module, name) a DCP .metadata may name; checked against what torch 2.13 writes
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class MetadataRefused(Exception):
    """A ``.metadata`` that is not plain DCP metadata (crafted, truncated or foreign)."""


class _SafeMetadata:
    """``read_metadata`` through the allow-list unpickler (mixed into DCP's readers)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except Exception as e:  # a crafted, truncated or foreign file
                raise MetadataRefused(f"{type(e).__name__}: {e}") from None
        if not isinstance(metadata, Metadata):
            raise MetadataRefused(f"it holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    pass


class _SafeFsspecReader(_SafeMetadata, FsspecReader):
    pass


def storage_reader(url: str) -> FileSystemReader:
    """DCP's reader for a local path or an fsspec URL, with the safe ``read_metadata``."""
    if "://" in url and not url.startswith("file://"):
        return _SafeFsspecReader(url)
    return _SafeFileSystemReader(filesystem(url)[1])


def read_metadata(url: str) -> Metadata:
    """The DCP metadata of the checkpoint ``url`` (UserError for a refused or unreadable file)."""
    try:
        return storage_reader(url).read_metadata()
    except MetadataRefused as e:
        raise UserError(f"checkpoint {url}: cannot read its DCP metadata, refused ({str(e)[:300]})") from None
    except Exception as e:
        raise UserError(f"checkpoint {url}: cannot read its DCP metadata ({type(e).__name__}: {e})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor entries read by ``torch.load(weights_only=True)``
    (the default's ``load_bytes`` with that one change)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as e:
            raise UserError(f"entry {fqn} refused: {type(e).__name__}: {str(e)[:200]}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def save(ckpt_dir: str, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Save ``state`` (model / optimizer state dicts) on every rank; rank 0 records every file's
    sha256 in ``meta.json``, seals it (``checkpoint.seal``) and commits the checkpoint. Returns its URL."""
    final = join(ckpt_dir, checkpoint.checkpoint_name(step))
    tmp = final + ".tmp"
    fs, tmp_path = filesystem(tmp)

    def prepare() -> None:
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)  # left by a crashed save
        fs.makedirs(tmp_path, exist_ok=True)

    def commit() -> None:
        committed = checkpoint.seal({**meta, checkpoint.FILES_KEY: checkpoint.file_digests(tmp)})
        with fs.open(join(tmp_path, checkpoint.META), "w") as f:
            json.dump(committed, f, indent=2)
        final_path = filesystem(final)[1]
        if fs.exists(final_path):
            fs.rm(final_path, recursive=True)
        fs.mv(tmp_path, final_path, recursive=True)

    on_rank0(prepare)
    dcp.save(state, checkpoint_id=tmp)
    barrier()
    on_rank0(commit)
    return final


def load(url: str, state: dict[str, Any]) -> None:
    """Load a checkpoint in place into ``state`` (every rank; check ``checkpoint.read_meta``
    first), then have rank 0 verify the files' checksums: a checkpoint whose bytes changed
    since it was written is an error even when its tensors still load. Clear errors, never
    a silent restart."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise UserError(f"checkpoint not found: {url}")
    read_metadata(url)  # a refused .metadata is named as such, not as a failed read
    try:
        dcp.load(state, storage_reader=storage_reader(url), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank read errors in a BaseException
        first = first_error_line(e)
        raise UserError(f"checkpoint {url} is corrupt or does not match this model: {first[:500]}") from None
    on_rank0(lambda: checkpoint.verify_files(url))


def first_error_line(e: BaseException) -> str:
    """The root cause of a DCP failure in one line (a CheckpointException holds the per-rank
    failures; its own text is a traceback)."""
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
        for info in checkpoint.list_checkpoints(ckpt_dir):
            if info.step not in keep:
                fs.rm(filesystem(info.url)[1], recursive=True)

    on_rank0(remove)
