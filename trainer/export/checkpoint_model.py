"""A training checkpoint as an unsharded model on one CPU process.

DCP reshards on load: the checkpoint of any world size (table-wise, column-wise or
data-parallel shards) loads into the plain ``MultiEmbeddingCTR`` its ``meta.json``
describes, with no process group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from trainer import checkpoint
from trainer.collapse.checkpoint_reader import resolve_checkpoint
from trainer.data.schema import SparseField
from trainer.data.storage import filesystem, join
from trainer.errors import UserError
from trainer.model import EmbeddingConfig, ModelConfig, MultiEmbeddingCTR

STATE_PREFIX = "model."  # the trainer saves {"model": TrainModule(model).state_dict(), "optim": ...}: keys model.model.*


@dataclass
class CheckpointModel:
    """An unsharded model loaded from a checkpoint, with what is known about its run."""

    model: MultiEmbeddingCTR
    url: str  # the checkpoint directory
    meta: dict[str, Any]  # its meta.json
    run_dir: str | None  # RUN of RUN/checkpoints/step-N, when it has one
    summary: dict[str, Any] | None  # RUN/summary.json, when present
    train_config: dict[str, Any] | None  # RUN/config.yaml, when present

    @property
    def dataset(self) -> str | None:
        """data.path of the run's config.yaml."""
        return ((self.train_config or {}).get("data") or {}).get("path")

    @property
    def step(self) -> int | None:
        return (self.meta.get("progress") or {}).get("step")

    @property
    def is_best(self) -> bool:
        """Whether the run's summary metrics (validation and test) are this checkpoint's."""
        best = (self.summary or {}).get("best_checkpoint")
        return bool(best) and best.rstrip("/").rsplit("/", 1)[-1] == self.url.rstrip("/").rsplit("/", 1)[-1]


def _read_json(url: str) -> dict[str, Any] | None:
    fs, path = filesystem(url)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except json.JSONDecodeError:
        return None


def _run_dir_of(url: str) -> str | None:
    parts = url.rstrip("/").rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[1] == "checkpoints" else None


def resolve_for_export(url: str) -> str:
    """A checkpoint directory itself, or for a run directory its best checkpoint (from
    ``summary.json``) when that still exists, else its latest."""
    summary = _read_json(join(url, "summary.json"))
    best = (summary or {}).get("best_checkpoint")
    if best:
        name = best.rstrip("/").rsplit("/", 1)[-1]
        candidate = join(url, "checkpoints", name)
        fs, path = filesystem(candidate)
        if fs.exists(join(path, checkpoint.META)):
            return candidate
    return resolve_checkpoint(url)


def build_model(identity: dict[str, Any], where: str) -> MultiEmbeddingCTR:
    """The unsharded model a checkpoint's identity describes (weights: the seeded init)."""
    try:
        fields = [SparseField(str(name), int(card)) for name, card in identity["fields"]]
        model_config = ModelConfig(**identity["model"])
        embedding = EmbeddingConfig(**identity["embedding"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {where}: its meta.json does not describe a model this code builds ({type(e).__name__}: {e})") from None
    return MultiEmbeddingCTR.from_config(fields, model_config, embedding, seed=0)


def load_checkpoint_model(url: str) -> CheckpointModel:
    """Load the checkpoint ``url`` names (see ``resolve_for_export``) into an unsharded model in eval mode."""
    url = resolve_for_export(url)
    meta = checkpoint.read_meta(url)
    identity = meta.get("identity")
    if not isinstance(identity, dict):
        raise UserError(f"checkpoint {url}: its meta.json has no model identity (not written by trainer.main?)")
    model = build_model(identity, url)
    state = {"model": {STATE_PREFIX + k: v for k, v in model.state_dict().items()}}
    checkpoint.load(url, state)
    model.load_state_dict({k[len(STATE_PREFIX):]: v for k, v in state["model"].items()})
    run_dir = _run_dir_of(url)
    summary = _read_json(join(run_dir, "summary.json")) if run_dir else None
    train_config = None
    if run_dir:
        fs, path = filesystem(join(run_dir, "config.yaml"))
        if fs.exists(path):
            with fs.open(path, "r") as f:
                train_config = yaml.safe_load(f) or None
    return CheckpointModel(model.eval(), url, meta, run_dir, summary, train_config)

