"""A training checkpoint as an unsharded model on one CPU process.

DCP reshards on load: the checkpoint of any world size (table-wise, column-wise or
data-parallel shards) loads into the plain ``MultiEmbeddingCTR`` its ``meta.json``
describes, with no process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer import checkpoint, dcp_io
from trainer.data.schema import SparseField
from trainer.errors import UserError
from trainer.job_config import EmbeddingConfig, ModelConfig
from trainer.model import MultiEmbeddingCTR
from trainer.run_dir import RunDir
from trainer.table_layout import TRAIN_MODULE_PREFIX


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


def resolve_for_export(url: str) -> str:
    """A checkpoint directory itself, or for a run directory its best checkpoint (from
    ``summary.json``) when that still exists, else its latest."""
    if not checkpoint.is_complete(url):
        best = RunDir(url).best_checkpoint()
        if best:
            return best
    return checkpoint.resolve_checkpoint(url)


def build_model(identity: dict[str, Any], where: str) -> MultiEmbeddingCTR:
    """The unsharded model a checkpoint's identity describes (weights: the seeded init)."""
    try:
        pooling = identity.get("pooling", {})  # fields pooled otherwise than by sum (multi-hot, mean)
        fields = [SparseField(str(name), int(card), pooling=str(pooling.get(name, "sum"))) for name, card in identity["fields"]]
        # checkpoints written before model.nfwfm_pairs existed trained NFwFM on the i < j pairs
        model_config = ModelConfig(**{"nfwfm_pairs": "upper", **identity["model"]})
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
    state = {"model": {TRAIN_MODULE_PREFIX + k: v for k, v in model.state_dict().items()}}
    dcp_io.load(url, state)
    model.load_state_dict({k[len(TRAIN_MODULE_PREFIX):]: v for k, v in state["model"].items()})
    run_dir = RunDir.of_checkpoint(url)
    summary = run_dir.read_summary() if run_dir else None
    train_config = run_dir.read_config() if run_dir else None
    return CheckpointModel(model.eval(), url, meta, run_dir.url if run_dir else None, summary, train_config)
