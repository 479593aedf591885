"""The training job's config: one YAML file of sections, checked at load time.

    data:      the prepared dataset
    run:       where the run directory goes, which device
    model:     the interaction tower (trainer.model.config.ModelConfig)
    embedding: SE/ME, scale, base dim (trainer.model.config.EmbeddingConfig)
    train:     epochs, batch size, seed, evaluation / checkpoint cadence, early stopping
    optim:     the fused embedding optimizer and the dense Adam
    sharding:  planner constraints (trainer.sharding.ShardingConfig)
    monitoring: collapse monitoring cadence, Prometheus export

``python -m trainer.main --config FILE --set train.epochs=3`` overrides any key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer import configlib
from trainer.errors import UserError
from trainer.model.config import EmbeddingConfig, ModelConfig
from trainer.sharding import ShardingConfig

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    path: str  # a prepared dataset directory (path or fsspec URL)
    shuffle_window_rows: int = 1 << 18

    def __post_init__(self) -> None:
        if self.shuffle_window_rows < 1:
            raise UserError(f"data.shuffle_window_rows must be >= 1, got {self.shuffle_window_rows}")


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # the run directory: config, plan, metrics, checkpoints, summary
    device: str = "auto"  # auto = cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UserError(f"run.device {self.device!r}: expected one of {list(DEVICES)}")


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 10
    batch_size: int = 2048  # per rank
    seed: int = 0
    eval_every_steps: int = 0  # also evaluate every N steps (0: at epoch ends only)
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0: with evaluations only)
    patience: int = 3  # evaluations without a better validation AUC before stopping
    max_steps: int = 0  # stop after this many steps (0: no limit)
    log_every_steps: int = 50

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "eval_every_steps", "checkpoint_every_steps", "max_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.patience < 1 or self.log_every_steps < 1:
            raise UserError("train.patience and train.log_every_steps must be >= 1")


@dataclass(frozen=True)
class OptimConfig:
    embedding: str = "rowwise_adagrad"  # sgd | adagrad | rowwise_adagrad; adam on CUDA (the paper's)
    embedding_lr: float = 0.05
    dense_lr: float = 1e-3  # dense Adam, as the paper
    weight_decay: float = 1e-6  # dense Adam; the embedding tables too on CUDA (L2 on looked-up rows; CPU kernels have none)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (self.embedding_lr > 0 and self.dense_lr > 0):
            raise UserError("optim.embedding_lr and optim.dense_lr must be positive")
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class MonitoringConfig:
    """Collapse monitoring and metric export (see trainer/telemetry.py for the series)."""

    run_id: str = ""  # the ``run`` label of every series; "" = $CTR_RUN_ID, else the run directory's name
    pushgateway: str = ""  # host:port of a Prometheus Pushgateway; "" = $CTR_PUSHGATEWAY, else no push
    metrics_port: int = 0  # also serve /metrics from rank 0 on this port (0 = no)
    collapse_every_steps: int = 0  # IA / set diversity every N steps too (0 = at each evaluation only)

    def __post_init__(self) -> None:
        if self.metrics_port < 0 or self.collapse_every_steps < 0:
            raise UserError("monitoring.metrics_port and monitoring.collapse_every_steps must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides; clear errors for unknown keys and bad values."""
    return configlib.load(TrainConfig, path, list(overrides))
