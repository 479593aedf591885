"""The training job's config: one YAML file of sections, checked at load time.

    recipe:    industrial (the keys' defaults) or paper (presets the authors' training, ``RECIPES``)
    data:      the prepared dataset
    run:       where the run directory goes, which device
    model:     the interaction tower (``ModelConfig``)
    embedding: SE/ME, scale, base dim (``EmbeddingConfig``; shapes in ``trainer.table_layout``)
    train:     epochs, batch size, seed, evaluation / checkpoint cadence, early stopping
    optim:     the embedding optimizer (fused and lazy, or dense_adam) and the dense Adam
    sharding:  planner constraints (``ShardingConfig``)
    monitoring: collapse monitoring cadence, Prometheus export

Pure data: every section is a frozen dataclass that checks its own values, and nothing
here imports torch, so a CLI's ``--help``, the sweep and the pipeline read configs
cheaply. What a device can run (sharding types, fused optimizers) is checked where the
device is known: ``trainer.sharding`` and ``trainer.embedding_optim``.

``python -m trainer.main --config FILE --set train.epochs=3`` overrides any key. Every field
carries one line of documentation, ``field(..., metadata={"doc": ...})``, which
``python -m trainer.main --help`` lists with the key's type and default (``typed_yaml.keys_help``).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from trainer import typed_yaml
from trainer.errors import UserError
from trainer.table_layout import EMBEDDING_MODES, PAPER_SCALES, embedding_shape

DEVICES = ("auto", "cpu", "cuda")
# every sharding type TorchRec knows; trainer.sharding says which ones a device runs
SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")
# embedding compute kernels: auto = the planner's choice; fused = FBGEMM's fused kernel, table in
# HBM (CPU: host memory); fused_uvm_caching = table in UVM (host memory) with an HBM cache (CUDA only)
COMPUTE_KERNELS = ("auto", "fused", "fused_uvm_caching")
# embedding table storage; trainer.sharding says which ones a device trains
EMBEDDING_DATA_TYPES = ("fp32", "fp16")
# autocast of the dense part of the forward (the embedding lookup stays in the tables' type)
DENSE_AUTOCASTS = ("none", "bf16")
# initial tables: uniform = U(+-sqrt(1/cardinality)) per table (TorchRec's default); xavier_concat =
# the authors': Xavier-uniform over one set's concatenated vocabulary, U(+-sqrt(6/(sum of cardinalities + dim)))
EMBEDDING_INITS = ("uniform", "xavier_concat")
# the models of trainer.model.interactions.INTERACTIONS (tests/test_structure.py keeps the two equal)
MODEL_NAMES = ("dnn", "dcnv2", "ipnn", "nfwfm", "xdeepfm", "finalmlp", "autoint")
# NFwFM field pairs: all F x F ordered pairs with the diagonal (the reference) | i < j only
NFWFM_PAIRS = ("all", "upper")


def _require_positive_ints(config: object, section: str, names: tuple[str, ...], hint: str = "") -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{section} {name} {value!r}: expected a positive integer{hint}")


@dataclass(frozen=True)
class EmbeddingConfig:
    """``mode``: ``"se"`` or ``"me"``; ``scale``: the paper's k (1, 2, 3, 4, 10);
    ``base_dim``: the 1x embedding dim (10 in the paper, 50 for NFwFM)."""

    mode: str = field(default="me", metadata={"doc": "se: one embedding set of dim scale*base_dim; me: scale sets of dim base_dim"})
    scale: int = field(default=1, metadata={"doc": "the paper's k, the embedding size multiplier (paper scales: 1, 2, 3, 4, 10)"})
    base_dim: int = field(default=10, metadata={"doc": "the 1x embedding dim (10 in the paper, 50 for NFwFM)"})
    data_type: str = field(
        default="fp32", metadata={"doc": "storage of the embedding tables: fp32, or fp16 (half the memory; lookups return fp32)"}
    )
    init: str = field(
        default="uniform",
        metadata={"doc": "initial tables: uniform (U(+-sqrt(1/cardinality)) per table) or xavier_concat (the paper's: "
                         "U(+-sqrt(6/(sum of all fields' cardinalities + dim))) for every table)"},
    )

    def __post_init__(self) -> None:
        if self.init not in EMBEDDING_INITS:
            raise UserError(f"embedding.init {self.init!r}: expected one of {list(EMBEDDING_INITS)}")
        if self.mode not in EMBEDDING_MODES:
            raise UserError(f"embedding mode {self.mode!r}: expected one of {list(EMBEDDING_MODES)}")
        if self.data_type not in EMBEDDING_DATA_TYPES:
            raise UserError(f"embedding.data_type {self.data_type!r}: expected one of {list(EMBEDDING_DATA_TYPES)}")
        _require_positive_ints(self, "embedding", ("scale", "base_dim"), f" (paper scales: {list(PAPER_SCALES)})")

    @property
    def num_sets(self) -> int:
        """M: the number of independent embedding sets."""
        return embedding_shape(self.mode, self.scale, self.base_dim)[0]

    @property
    def dim(self) -> int:
        """K: the embedding dim of every table."""
        return embedding_shape(self.mode, self.scale, self.base_dim)[1]


@dataclass(frozen=True)
class ModelConfig:
    """``name``: the model, i.e. its interaction (run once per embedding set) and the head
    that follows it: ``"dnn"``, ``"dcnv2"``, ``"ipnn"``, ``"nfwfm"``, ``"xdeepfm"``,
    ``"finalmlp"`` or ``"autoint"`` (see ``trainer.model.interactions``; ``MODEL_NAMES``).

    ``hidden`` and ``dropout`` size every MLP: the per-set projection, the shared tail and
    FinalMLP's towers (400 and 0.2 in the paper). The other keys are read by one model
    each (and validated always):

    - ``cross_layers``: depth of the DCNv2 cross net (4).
    - ``cin_layers``: xDeepFM's CIN layer sizes ((16, 16)).
    - ``tower_layers``: the depth of each FinalMLP tower, of width ``hidden`` (2).
    - ``attention_dim``, ``attention_heads``, ``attention_layers``: AutoInt's
      self-attention width (divisible by the heads), heads and layers (64, 2, 3).
    - ``nfwfm_pairs``: NFwFM's field pairs, ``"all"`` F x F ordered pairs with the
      diagonal (the reference) or ``"upper"`` (i < j, one weight per unordered pair).

    ``sync_batchnorm`` makes every BatchNorm of the dense model normalise over the
    global batch (all ranks) instead of each rank's own rows.
    """

    name: str = field(default="dcnv2", metadata={"doc": "the model: " + ", ".join(MODEL_NAMES)})
    hidden: int = field(default=400, metadata={"doc": "width of every MLP: per-set projection, shared tail, FinalMLP towers"})
    dropout: float = field(default=0.2, metadata={"doc": "dropout probability of every MLP, in [0, 1)"})
    cross_layers: int = field(default=4, metadata={"doc": "dcnv2: depth of the cross net"})
    cin_layers: tuple[int, ...] = field(default=(16, 16), metadata={"doc": "xdeepfm: the CIN layer sizes"})
    tower_layers: int = field(default=2, metadata={"doc": "finalmlp: depth of each tower (of width hidden)"})
    attention_dim: int = field(default=64, metadata={"doc": "autoint: self-attention width (divisible by attention_heads)"})
    attention_heads: int = field(default=2, metadata={"doc": "autoint: attention heads"})
    attention_layers: int = field(default=3, metadata={"doc": "autoint: self-attention layers"})
    nfwfm_pairs: str = field(
        default="all",
        metadata={"doc": 'nfwfm: field pairs, "all" (F x F ordered pairs and the diagonal, the reference) or "upper" (i < j)'},
    )
    sync_batchnorm: bool = field(
        default=False,
        metadata={"doc": "BatchNorm statistics over the global batch (all ranks), not each rank's rows; one all-reduce per BN"},
    )

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise UserError(f"model {self.name!r}: expected one of {sorted(MODEL_NAMES)}")
        if self.nfwfm_pairs not in NFWFM_PAIRS:
            raise UserError(f"model nfwfm_pairs {self.nfwfm_pairs!r}: expected one of {list(NFWFM_PAIRS)}")
        _require_positive_ints(
            self, "model", ("hidden", "cross_layers", "tower_layers", "attention_dim", "attention_heads", "attention_layers")
        )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model dropout {self.dropout!r}: expected a probability in [0, 1)")
        layers = self.cin_layers
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in layers)
        ):
            raise UserError(f"model cin_layers {layers!r}: expected a non-empty list of positive integers, e.g. [16, 16]")
        object.__setattr__(self, "cin_layers", tuple(layers))
        if self.attention_dim % self.attention_heads:
            raise UserError(
                f"model attention_dim {self.attention_dim} is not divisible by attention_heads {self.attention_heads}"
            )


@dataclass(frozen=True)
class ShardingConfig:
    """Constraints on the sharding plan.

    Attributes:
        sharding_types: the types any table may use; empty = every type the device runs.
        per_table: table-name pattern (``fnmatch``, e.g. ``"set*__C1"`` or ``"set0__*"``)
            -> allowed types; the first matching pattern wins over ``per_field`` and the
            global list.
        per_field: field name -> allowed types for all the field's sets; wins over the
            global list.
        storage_cap_bytes: per-rank cap on the memory the tables are placed in (HBM on
            CUDA, DDR on CPU); None = TorchRec's default topology.
        hbm_cap_bytes, ddr_cap_bytes: per-rank caps on HBM (GPU memory) and DDR (host
            memory, where ``fused_uvm_caching`` tables live) for the planner's topology;
            None = TorchRec's default. ``storage_cap_bytes`` is the older spelling of the
            device's own memory: setting both for the same memory is refused.
        compute_kernel: ``auto`` (the planner chooses), ``fused`` (FBGEMM's fused kernel,
            the table in HBM on CUDA) or ``fused_uvm_caching`` (CUDA only: the table in
            UVM, host memory, with an HBM cache of ``uvm_cache_load_factor`` of its rows).
    """

    sharding_types: tuple[str, ...] = field(
        default=(), metadata={"doc": "the types any table may use ([] = every type the device runs): " + ", ".join(SHARDING_TYPES)}
    )
    per_table: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict,
        metadata={"doc": "table-name pattern (fnmatch, e.g. set*__C1) -> allowed types; the first match wins over the rest"},
    )
    per_field: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict, metadata={"doc": "field name -> allowed types for all its sets; wins over sharding_types"}
    )
    storage_cap_bytes: int | None = field(
        default=None, metadata={"doc": "per-rank cap on table memory (HBM on CUDA, DDR on CPU); null = TorchRec's default"}
    )
    hbm_cap_bytes: int | None = field(
        default=None, metadata={"doc": "per-rank HBM (GPU memory) of the planner's topology; null = TorchRec's default"}
    )
    ddr_cap_bytes: int | None = field(
        default=None,
        metadata={"doc": "per-rank DDR (host memory; holds fused_uvm_caching tables) of the planner's topology; null = TorchRec's default"},
    )
    compute_kernel: str = field(
        default="auto",
        metadata={"doc": "embedding kernel: auto (planner's choice), fused (FBGEMM, tables in HBM), "
                         "fused_uvm_caching (CUDA only: tables in host memory with an HBM cache)"},
    )
    uvm_cache_load_factor: float = field(
        default=0.2, metadata={"doc": "fused_uvm_caching: the HBM cache's share of a table's rows, in (0, 1]"}
    )

    def __post_init__(self) -> None:
        for where, types in self._type_lists():
            if isinstance(types, str):
                raise UserError(f"sharding {where}: expected a list of sharding types, got the string {types!r}")
            unknown = [t for t in types if t not in SHARDING_TYPES]
            if unknown:
                raise UserError(f"sharding {where}: unknown sharding types {unknown}; known: {list(SHARDING_TYPES)}")
            if where != "sharding_types" and not types:
                raise UserError(f"sharding {where}: empty list of sharding types")
        for name in ("storage_cap_bytes", "hbm_cap_bytes", "ddr_cap_bytes"):
            cap = getattr(self, name)
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
                raise UserError(f"sharding {name} {cap!r}: expected a positive integer (bytes per rank)")
        if self.compute_kernel not in COMPUTE_KERNELS:
            raise UserError(f"sharding.compute_kernel {self.compute_kernel!r}: expected one of {list(COMPUTE_KERNELS)}")
        factor = self.uvm_cache_load_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise UserError(f"sharding.uvm_cache_load_factor {factor!r}: expected a share of the rows in (0, 1]")

    def _type_lists(self) -> list[tuple[str, Sequence[str]]]:
        return (
            [("sharding_types", self.sharding_types)]
            + [(f"per_table[{p!r}]", t) for p, t in self.per_table.items()]
            + [(f"per_field[{f!r}]", t) for f, t in self.per_field.items()]
        )


@dataclass(frozen=True)
class DataConfig:
    path: str = field(metadata={"doc": "a prepared dataset directory (path or fsspec URL)"})
    shuffle_window_rows: int = field(default=1 << 18, metadata={"doc": "training rows shuffled together (memory vs randomness)"})

    def __post_init__(self) -> None:
        if self.shuffle_window_rows < 1:
            raise UserError(f"data.shuffle_window_rows must be >= 1, got {self.shuffle_window_rows}")


@dataclass(frozen=True)
class RunConfig:
    dir: str = field(default="runs/default", metadata={"doc": "the run directory: config, plan, metrics, checkpoints, summary"})
    device: str = field(default="auto", metadata={"doc": "auto (cuda when available, else cpu), cpu or cuda"})

    def __post_init__(self) -> None:
        if not self.dir.strip():
            raise UserError("run.dir is empty: name the run directory")
        if self.device not in DEVICES:
            raise UserError(f"run.device {self.device!r}: expected one of {list(DEVICES)}")


@dataclass(frozen=True)
class TrainSection:
    epochs: int = field(default=10, metadata={"doc": "passes over the train split"})
    batch_size: int = field(default=2048, metadata={"doc": "rows per step on each rank"})
    seed: int = field(default=0, metadata={"doc": "seed of the model's initialization, the data order and dropout"})
    eval_every_steps: int = field(default=0, metadata={"doc": "also evaluate every N steps (0: at epoch ends only)"})
    checkpoint_every_steps: int = field(default=0, metadata={"doc": "also checkpoint every N steps (0: with evaluations only)"})
    patience: int = field(default=3, metadata={"doc": "evaluations without a better validation AUC before stopping"})
    max_steps: int = field(default=0, metadata={"doc": "stop after this many steps (0: no limit)"})
    log_every_steps: int = field(default=50, metadata={"doc": "log loss, throughput and ETA every N steps"})
    dense_autocast: str = field(
        default="none", metadata={"doc": "none, or bf16: autocast the dense part of the forward to bfloat16 (the lookup stays as stored)"}
    )

    def __post_init__(self) -> None:
        if self.dense_autocast not in DENSE_AUTOCASTS:
            raise UserError(f"train.dense_autocast {self.dense_autocast!r}: expected one of {list(DENSE_AUTOCASTS)}")
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
    embedding: str = field(
        default="rowwise_adagrad",
        metadata={"doc": "embedding optimizer: sgd, adagrad, rowwise_adagrad (fused, lazy: only looked-up rows change); "
                         "adam (fused, lazy, CUDA only); dense_adam (the paper's: torch Adam over whole replicated tables, "
                         "every row moves every step; every table data_parallel)"},
    )
    embedding_lr: float = field(default=0.05, metadata={"doc": "learning rate of the embedding optimizer"})
    dense_lr: float = field(default=1e-3, metadata={"doc": "learning rate of the dense Adam (1e-3 as the paper)"})
    weight_decay: float = field(
        default=1e-6,
        metadata={"doc": "coupled L2 of the dense Adam and the embedding optimizer: fused kernels apply it to the looked-up "
                         "rows on CUDA only (CPU kernels have none), dense_adam to every row on any device"},
    )
    eps: float = field(default=1e-8, metadata={"doc": "epsilon of the embedding optimizer (adagrad, rowwise_adagrad, adam)"})

    def __post_init__(self) -> None:
        # written so that NaN fails too (every comparison with NaN is false)
        for name in ("embedding_lr", "dense_lr", "eps"):
            if not 0 < getattr(self, name) < math.inf:
                raise UserError(f"optim.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.weight_decay < math.inf:
            raise UserError(f"optim.weight_decay must be a finite number >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class MonitoringConfig:
    """Collapse monitoring and metric export (see trainer/telemetry.py for the series)."""

    run_id: str = field(default="", metadata={"doc": 'the run label of every series; "" = $CTR_RUN_ID, else the run directory\'s name'})
    pushgateway: str = field(
        default="", metadata={"doc": 'host:port of a Prometheus Pushgateway; "" = $CTR_PUSHGATEWAY, else no push'}
    )
    metrics_port: int = field(default=0, metadata={"doc": "also serve /metrics from rank 0 on this port (0 = no)"})
    metrics_address: str = field(
        default="127.0.0.1", metadata={"doc": "the IP /metrics binds; 0.0.0.0 = every interface (scraped from outside the pod)"}
    )
    collapse_every_steps: int = field(
        default=0, metadata={"doc": "IA / set diversity every N steps too (0 = at each evaluation only)"}
    )
    tensorboard: bool = field(
        default=False,
        metadata={"doc": "write TensorBoard scalars (loss, validation, IA and diversity per field, test) "
                         "to RUN/tensorboard/ from rank 0 (see trainer/tracking.py)"},
    )

    def __post_init__(self) -> None:
        if self.metrics_port < 0 or self.collapse_every_steps < 0:
            raise UserError("monitoring.metrics_port and monitoring.collapse_every_steps must be >= 0")
        try:
            ipaddress.ip_address(self.metrics_address)
        except ValueError:
            raise UserError(
                f"monitoring.metrics_address {self.metrics_address!r}: expected an IP address "
                "(127.0.0.1: this host only; 0.0.0.0: every interface)"
            ) from None


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(metadata={"doc": "the prepared dataset"})
    recipe: str = field(
        default="industrial",
        metadata={"doc": "industrial (the keys' own defaults) or paper (the authors' training: presets the keys of "
                         "RECIPES['paper'] in trainer/job_config.py that the config does not set itself)"},
    )
    run: RunConfig = field(default_factory=RunConfig, metadata={"doc": "where the run directory goes, which device"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the interaction tower and its MLPs"})
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig, metadata={"doc": "SE/ME, scale, base dim"})
    train: TrainSection = field(
        default_factory=TrainSection,
        metadata={"doc": "epochs, batch size, seed, evaluation / checkpoint cadence, early stopping"},
    )
    optim: OptimConfig = field(
        default_factory=OptimConfig, metadata={"doc": "the embedding optimizer (fused and lazy, or dense_adam) and the dense Adam"}
    )
    sharding: ShardingConfig = field(default_factory=ShardingConfig, metadata={"doc": "constraints on TorchRec's sharding plan"})
    monitoring: MonitoringConfig = field(
        default_factory=MonitoringConfig, metadata={"doc": "collapse monitoring cadence, Prometheus export"}
    )

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise UserError(f"recipe {self.recipe!r}: expected one of {list(RECIPES)}")
        if self.optim.embedding == "dense_adam":
            _check_dense_tables(self)


def _check_dense_tables(config: TrainConfig) -> None:
    """``optim.embedding: dense_adam`` steps whole tables with a torch Adam, which only a
    replicated (``data_parallel``) fp32 table is: refuse a sharding or storage choice that
    rules that out, naming the key."""
    s = config.sharding
    for where, types in s._type_lists():
        if types and "data_parallel" not in types:  # sharding_types [] = every type, data_parallel included
            raise UserError(
                f"optim.embedding 'dense_adam' steps whole tables with a torch Adam, so every table is data_parallel "
                f"(replicated); sharding {where} {list(types)} rules that out: add data_parallel or use a fused optimizer "
                "(sgd, adagrad, rowwise_adagrad, adam)"
            )
    if s.compute_kernel != "auto":
        raise UserError(
            f"optim.embedding 'dense_adam' keeps every table data_parallel, whose kernel is dense: "
            f"sharding.compute_kernel {s.compute_kernel!r} needs a sharded table; use auto"
        )
    if config.embedding.data_type != "fp32":
        raise UserError(
            f"optim.embedding 'dense_adam' steps the tables with a torch Adam, which {config.embedding.data_type} "
            "underflows (eps 1e-8 is 0 in fp16): use embedding.data_type fp32"
        )


# ---- recipes ------------------------------------------------------------------------------
# A recipe presets keys the config does not set itself (in its file or with --set): an explicit
# key wins, and the trainer logs each key that departs from its recipe (``recipe_departures``).
# The run directory's config.yaml records the resolved config, every key, as it ran.
# the paper's batch: the rows of one gradient step and of one BatchNorm normalisation
PAPER_BATCH_ROWS = 2048
RECIPES: dict[str, dict[str, object]] = {
    # the keys' own defaults: lazy fused embedding optimizers, per-table uniform init
    "industrial": {},
    # the authors' (thuml/Multi-Embedding main.py, torchfm/layer.py): one torch Adam, lr 1e-3 and
    # coupled L2 1e-6, over every parameter, whole tables included; Xavier-uniform over each set's
    # concatenated vocabulary; NFwFM over all F x F field pairs; BatchNorm over 2048 rows.
    "paper": {
        "optim.embedding": "dense_adam",
        "optim.embedding_lr": 1e-3,
        "optim.dense_lr": 1e-3,
        "optim.weight_decay": 1e-6,
        "embedding.init": "xavier_concat",
        "model.nfwfm_pairs": "all",
        "model.sync_batchnorm": True,
        "train.batch_size": PAPER_BATCH_ROWS,
        "train.patience": 3,
    },
}
# ``schema.json`` ``recipe.train_order`` of a prepared dataset: global_shuffle (preprocess
# --shuffle-train), iid (synthetic rows), file (the raw file's order; datasets without the key)
SHUFFLED_TRAIN_ORDERS = ("global_shuffle", "iid")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides, then the presets of its ``recipe``
    for the keys it leaves unset; clear errors for unknown keys and bad values."""
    raw = typed_yaml.read(path, list(overrides))
    recipe = raw.get("recipe", "industrial")
    presets = RECIPES.get(recipe, {}) if isinstance(recipe, str) else {}  # a bad recipe: build names it
    return typed_yaml.build(TrainConfig, typed_yaml.with_presets(raw, presets), where=str(path or "config"))


def _value(config: object, dotted: str) -> object:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def recipe_departures(config: TrainConfig) -> list[tuple[str, object, object]]:
    """(key, value, the recipe's value) of every key the config sets against its recipe."""
    return [
        (key, _value(config, key), preset)
        for key, preset in RECIPES[config.recipe].items()
        if _value(config, key) != preset
    ]


def check_recipe_data(config: TrainConfig, train_order: str, dataset: str) -> None:
    """UserError when ``recipe: paper`` meets a training split in the raw file's order
    (``train_order``: the dataset's ``schema.json`` ``recipe.train_order``, "file" without one)."""
    if config.recipe == "paper" and train_order not in SHUFFLED_TRAIN_ORDERS:
        raise UserError(
            f"recipe 'paper' trains on a globally shuffled training split (the authors shuffle the whole data set "
            f"once); {dataset} keeps its raw files' order (schema.json recipe.train_order {train_order!r}, Criteo is "
            "in time order): prepare it again with `python -m trainer.data.preprocess ... --shuffle-train`, "
            "or set recipe: industrial"
        )


def recipe_warnings(config: TrainConfig, world_size: int) -> list[str]:
    """What keeps a ``recipe: paper`` run on ``world_size`` ranks from the paper's batch:
    2048 rows per gradient step, BatchNorm over the same 2048 rows."""
    if config.recipe != "paper":
        return []
    batch = config.train.batch_size
    notes = []
    if batch * world_size != PAPER_BATCH_ROWS:
        notes.append(
            f"recipe paper: a step sees train.batch_size {batch} x {world_size} rank(s) = {batch * world_size} rows, "
            f"the paper's {PAPER_BATCH_ROWS}: set train.batch_size so that it times the ranks is {PAPER_BATCH_ROWS}"
        )
    if world_size > 1 and not config.model.sync_batchnorm:
        notes.append(
            f"recipe paper: model.sync_batchnorm is false, so BatchNorm normalises over each rank's {batch} rows, "
            f"not the step's {batch * world_size}: set model.sync_batchnorm=true"
        )
    return notes
