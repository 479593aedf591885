"""Where the embedding tables live: the sharding plan, the sharded model, the fused optimizer.

The dense parts of the model run data-parallel (``DistributedModelParallel`` wraps them in
DDP); the M*F tables of ``MultiEmbeddingSparseArch`` are placed by TorchRec's planner
under the constraints of a ``ShardingConfig``. Typical use, on every rank::

    model = MultiEmbeddingCTR.from_config(fields, model_config, embedding_config, seed)
    emb_opt = embedding_optimizer("rowwise_adagrad", device, lr=0.01)
    apply_embedding_optimizer(model, emb_opt)
    plan = plan_sharding(model, sharding_config, world_size, device, pg=pg)
    print(render_plan(plan, model.sparse_arch.tables, world_size))
    sharded = shard_model(model, plan, device, pg)
    optimizer = combined_optimizer(sharded, emb_opt, lambda params: torch.optim.Adam(params, lr=1e-3))

What the device can run (checked on CPU + gloo, and what TorchRec documents for CUDA):

- sharding types: CPU ``data_parallel, table_wise, column_wise, table_column_wise``; CUDA
  adds ``row_wise, table_row_wise``;
- fused embedding optimizers: CPU ``sgd, adagrad, rowwise_adagrad``; CUDA adds ``adam``.

Facts about ``DistributedModelParallel`` this module is built around (checked on CPU + gloo,
torchrec 1.9.2): DMP does not copy the unsharded tables into the shards, it re-initialises
them (``shard_model`` therefore redraws every shard from the model's seed); the sharded
collection's output keys come in another order (the sparse arch assembles by key);
``data_parallel`` tables get no fused kernel and no in-backward optimizer, they are dense
DDP parameters (``combined_optimizer`` steps them with the embedding optimizer, row-sparse
like the fused kernels: see ``trainer.row_sparse_optim``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import (
    KernelConfig,
    PlannerError,
    PlannerErrorType,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import EnumerableShardingSpec, ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.errors import UserError
from trainer.model.sparse_arch import MultiEmbeddingSparseArch, TableInfo, init_table_
from trainer.row_sparse_optim import row_sparse_optimizer

CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
CUDA_SHARDING_TYPES = CPU_SHARDING_TYPES + ("row_wise", "table_row_wise")


def device_sharding_types(device: torch.device) -> tuple[str, ...]:
    """The sharding types ``device`` can run."""
    return CUDA_SHARDING_TYPES if device.type == "cuda" else CPU_SHARDING_TYPES


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
    """

    sharding_types: tuple[str, ...] = ()
    per_table: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    per_field: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    storage_cap_bytes: int | None = None

    def __post_init__(self) -> None:
        for where, types in self._type_lists():
            if isinstance(types, str):
                raise UserError(f"sharding {where}: expected a list of sharding types, got the string {types!r}")
            unknown = [t for t in types if t not in CUDA_SHARDING_TYPES]
            if unknown:
                raise UserError(f"sharding {where}: unknown sharding types {unknown}; known: {list(CUDA_SHARDING_TYPES)}")
            if where != "sharding_types" and not types:
                raise UserError(f"sharding {where}: empty list of sharding types")
        cap = self.storage_cap_bytes
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise UserError(f"sharding storage_cap_bytes {cap!r}: expected a positive integer (bytes per rank)")

    def _type_lists(self) -> list[tuple[str, Sequence[str]]]:
        return (
            [("sharding_types", self.sharding_types)]
            + [(f"per_table[{p!r}]", t) for p, t in self.per_table.items()]
            + [(f"per_field[{f!r}]", t) for f, t in self.per_field.items()]
        )

    def allowed_types(self, table: TableInfo, device: torch.device) -> list[str]:
        """The sharding types ``table`` may use on ``device``."""
        for pattern, types in self.per_table.items():
            if fnmatch.fnmatchcase(table.table, pattern):
                return list(types)
        if table.field in self.per_field:
            return list(self.per_field[table.field])
        return list(self.sharding_types or device_sharding_types(device))

    def check(self, tables: Sequence[TableInfo], device: torch.device) -> None:
        """UserError for a type the device can't run, or a pattern/field that names no table."""
        usable = device_sharding_types(device)
        for where, types in self._type_lists():
            unusable = [t for t in types if t not in usable]
            if unusable:
                raise UserError(
                    f"sharding {where}: {unusable} cannot run on {device.type}; "
                    f"sharding types {device.type} can run: {list(usable)}"
                )
        names = {t.table for t in tables}
        fields = {t.field for t in tables}
        for pattern in self.per_table:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise UserError(f"sharding per_table[{pattern!r}] matches no table (tables are named set<m>__<field>)")
        unknown_fields = sorted(set(self.per_field) - fields)
        if unknown_fields:
            raise UserError(f"sharding per_field: unknown fields {unknown_fields}")


def build_constraints(
    config: ShardingConfig, tables: Sequence[TableInfo], device: torch.device
) -> dict[str, ParameterConstraints]:
    """Table name -> the planner's constraints for it."""
    config.check(tables, device)
    return {t.table: ParameterConstraints(sharding_types=config.allowed_types(t, device)) for t in tables}


def sharders() -> list[ModuleSharder[nn.Module]]:
    """The sharders of our model: its one ``EmbeddingBagCollection``. The fused optimizer
    comes from the parameters (``apply_embedding_optimizer``); the sharder only sets how
    its weight decay applies: L2 on the looked-up rows (FBGEMM's default, ``NONE``, would
    silently ignore it)."""
    return [EmbeddingBagCollectionSharder(fused_params={"weight_decay_mode": WeightDecayMode.L2})]


def find_sparse_arch(module: nn.Module) -> tuple[str, MultiEmbeddingSparseArch]:
    """The one ``MultiEmbeddingSparseArch`` inside ``module`` (the model, or a training
    wrapper around it) and its path prefix, e.g. ``("model.sparse_arch.", arch)``."""
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, MultiEmbeddingSparseArch)]
    if len(found) != 1:
        raise ValueError(f"expected one MultiEmbeddingSparseArch in {type(module).__name__}, found {len(found)}")
    name, arch = found[0]
    return (f"{name}." if name else ""), arch


def plan_sharding(
    model: nn.Module,
    config: ShardingConfig,
    world_size: int,
    device: torch.device,
    batch_size: int | None = None,
    pg: dist.ProcessGroup | None = None,
    local_world_size: int | None = None,
) -> ShardingPlan:
    """Plan where every table of ``model`` (a ``MultiEmbeddingCTR`` or a module wrapping
    one) lives on ``world_size`` ranks of ``device``'s type.

    With ``pg`` the plan is made on rank 0 and broadcast (every rank must call this); without
    it the plan is made locally (tests, dry runs). ``local_world_size`` is the ranks per
    host (default: all on one host); ``batch_size`` the per-rank batch, for the planner's
    estimates. Call ``apply_embedding_optimizer`` first so the planner counts the
    optimizer state.
    """
    tables = find_sparse_arch(model)[1].tables
    cap = config.storage_cap_bytes
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=cap if device.type == "cuda" else None,
            ddr_cap_bytes=cap if device.type != "cuda" else None,
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=build_constraints(config, tables, device),
        debug=False,
    )

    def plan_or_error() -> ShardingPlan | str:
        try:
            return planner.plan(model, sharders())
        except PlannerError as e:
            return _planner_error_message(e, tables, config, world_size, device)

    # torchrec's collective_plan would leave the other ranks waiting if rank 0's planner
    # failed: broadcast the plan or the error, and let every rank raise the same error.
    outcome: list[ShardingPlan | str | None] = [plan_or_error() if pg is None or pg.rank() == 0 else None]
    if pg is not None and pg.size() > 1:
        dist.broadcast_object_list(outcome, group_src=0, group=pg)
    result = outcome[0]
    if isinstance(result, str):
        raise UserError(result)
    assert result is not None
    return result


def _planner_error_message(
    error: PlannerError,
    tables: Sequence[TableInfo],
    config: ShardingConfig,
    world_size: int,
    device: torch.device,
) -> str:
    memory = "HBM" if device.type == "cuda" else "DDR"
    cap = f"{config.storage_cap_bytes} bytes" if config.storage_cap_bytes else "the default topology cap"
    table_bytes = sum(t.cardinality * t.storage_dim * 4 for t in tables)
    what = (
        f"{len(tables)} embedding tables ({table_bytes} bytes of fp32 weights, plus optimizer state "
        f"and lookup buffers) on {world_size} {device.type} ranks with {cap} of {memory} each"
    )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if error.error_type == PlannerErrorType.INSUFFICIENT_STORAGE:
        return (
            f"sharding plan does not fit: {what}, of which the planner first reserves 15% and "
            f"the dense model per rank; raise storage_cap_bytes, add ranks or shrink the model "
            f"(torchrec: {first_line})"
        )
    return f"no sharding plan for {what} under the sharding constraints (torchrec: {first_line})"


def shard_model(
    model: nn.Module,
    plan: ShardingPlan,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
) -> DistributedModelParallel:
    """Wrap ``model`` in ``DistributedModelParallel`` with ``plan``: tables sharded as
    planned, dense parts in DDP (rank 0's dense weights are broadcast).

    DMP does not carry the unsharded tables' values over: every shard is re-initialised by
    TorchRec. So the shards are drawn again here from the model's seed (``init_table_`` on
    each shard's window), which makes the sharded model compute the same function as the
    unsharded one built from the same seed, without any rank holding a whole table.
    """
    sharded = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(pg or dist.GroupMember.WORLD),
        device=device,
        plan=plan,
        sharders=sharders(),
    )
    init_sharded_tables(sharded)
    return sharded


def local_table_windows(
    sharded: DistributedModelParallel,
) -> Iterator[tuple[TableInfo, torch.Tensor, int, int]]:
    """This rank's pieces of every table: (table, local tensor, row offset, col offset).

    Data-parallel tables are whole replicas at (0, 0); the others are the local shards of
    their ``ShardedTensor``. The tensors are views of the live (fused) weights.
    """
    prefix, arch = find_sparse_arch(sharded.module)
    keys = arch.weight_keys(prefix)
    state = sharded.state_dict()
    for table in arch.tables:
        value = state[keys[(table.set_index, table.field)]]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                row, col = shard.metadata.shard_offsets
                yield table, shard.tensor, row, col
        else:
            yield table, value, 0, 0


def init_sharded_tables(sharded: DistributedModelParallel) -> None:
    """Draw every local shard of the sharded model's tables from the model's seed."""
    seed = find_sparse_arch(sharded.module)[1].seed
    for table, weight, row, col in local_table_windows(sharded):
        init_table_(weight, table, seed, row, col)


# ---- embedding optimizer ------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """A fused embedding optimizer: the torch optimizer class TorchRec maps to an FBGEMM
    ``EmbOptimType`` when it shards the tables, and its keyword arguments (torch names)."""

    name: str
    optimizer_class: type[torch.optim.Optimizer]
    emb_opt_type: EmbOptimType
    kwargs: Mapping[str, Any]
    dropped_weight_decay: float = 0.0  # asked for, but the device's fused kernels cannot apply it


# name -> (torch optimizer class, FBGEMM type, takes eps, devices that run it fused)
_EMBEDDING_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], EmbOptimType, bool, tuple[str, ...]]] = {
    "sgd": (torch.optim.SGD, EmbOptimType.EXACT_SGD, False, ("cpu", "cuda")),
    "adagrad": (torch.optim.Adagrad, EmbOptimType.EXACT_ADAGRAD, True, ("cpu", "cuda")),
    "rowwise_adagrad": (RowWiseAdagrad, EmbOptimType.EXACT_ROWWISE_ADAGRAD, True, ("cpu", "cuda")),
    "adam": (torch.optim.Adam, EmbOptimType.ADAM, True, ("cuda",)),
}


def device_embedding_optimizers(device: torch.device) -> list[str]:
    """The fused embedding optimizers ``device`` can run."""
    return [name for name, (*_, devices) in _EMBEDDING_OPTIMIZERS.items() if device.type in devices]


def embedding_optimizer(
    name: str,
    device: torch.device,
    lr: float,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> EmbeddingOptimizer:
    """Validate ``name`` against ``device`` and return the fused optimizer to apply.

    ``eps`` is used by adagrad, rowwise_adagrad and adam. ``weight_decay`` is L2 on the rows
    a step looks up, as FBGEMM's CUDA kernels apply it (``WeightDecayMode.L2``, see
    ``sharders``). FBGEMM's CPU kernels ignore weight decay (checked: the same update with
    0.05 as with 0, fbgemm-gpu 1.4), so on CPU it is dropped for every table, replicated
    ones included, and reported in ``dropped_weight_decay`` for the caller to say so.
    """
    if name not in _EMBEDDING_OPTIMIZERS:
        raise UserError(f"embedding optimizer {name!r}: expected one of {list(_EMBEDDING_OPTIMIZERS)}")
    optimizer_class, emb_opt_type, takes_eps, devices = _EMBEDDING_OPTIMIZERS[name]
    if device.type not in devices:
        raise UserError(
            f"embedding optimizer {name!r} has no fused kernel on {device.type}; "
            f"{device.type} can run: {device_embedding_optimizers(device)}"
        )
    if not lr > 0:
        raise UserError(f"embedding optimizer lr {lr!r}: expected a positive number")
    dropped = weight_decay if device.type == "cpu" else 0.0
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay - dropped}
    if takes_eps:
        kwargs["eps"] = eps
    return EmbeddingOptimizer(name, optimizer_class, emb_opt_type, kwargs, dropped)


def apply_embedding_optimizer(model: nn.Module, optimizer: EmbeddingOptimizer) -> None:
    """Attach ``optimizer`` to the embedding tables, TorchRec's way: it runs in backward
    (unsharded: a torch optimizer per table; sharded: fused into the FBGEMM kernels, exposed
    as ``DistributedModelParallel.fused_optimizer``). Call before planning and sharding."""
    _apply_optimizer_in_backward(
        optimizer.optimizer_class, find_sparse_arch(model)[1].parameters(), dict(optimizer.kwargs)
    )


def combined_optimizer(
    sharded: DistributedModelParallel,
    embedding: EmbeddingOptimizer,
    dense_factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
) -> CombinedOptimizer:
    """One keyed optimizer over every parameter of a sharded model, TorchRec style:

    - ``fused``: the sharded tables, updated inside the FBGEMM backward
      (``sharded.fused_optimizer``; its ``step`` is a no-op);
    - ``replicated_tables``: ``data_parallel`` tables, which TorchRec trains as dense
      parameters (DDP all-reduces their gradients, no fused kernel): stepped by the
      embedding optimizer's torch class with the fused kernels' row-sparse semantics
      (``trainer.row_sparse_optim``), so every table trains the same wherever it lives;
    - ``dense``: everything else, by ``dense_factory`` (e.g. ``lambda p: Adam(p, lr=1e-3)``).
    """
    prefix, arch = find_sparse_arch(sharded.module)
    table_keys = set(arch.weight_keys(prefix).values())
    unfused = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    replicated = {k: p for k, p in unfused.items() if k in table_keys}
    dense = {k: p for k, p in unfused.items() if k not in table_keys}
    optims: list[tuple[str, KeyedOptimizer]] = [
        ("fused", sharded.fused_optimizer),
        ("dense", KeyedOptimizerWrapper(dense, dense_factory)),
    ]
    if replicated:
        optims.append(
            (
                "replicated_tables",
                KeyedOptimizerWrapper(
                    replicated, lambda params: row_sparse_optimizer(embedding.optimizer_class, params, dict(embedding.kwargs))
                ),
            )
        )
    return CombinedOptimizer(optims)


# ---- plan rendering -----------------------------------------------------------------


@dataclass(frozen=True)
class TablePlacement:
    """Where one (set, field) table lives: its sharding type and its shards (rank, size)."""

    set_index: int
    field: str
    table: str
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    shard_sizes: list[list[int]]


def plan_placements(plan: ShardingPlan, tables: Sequence[TableInfo], world_size: int) -> list[TablePlacement]:
    """One placement per table of ``tables``, in (set, field) order."""
    by_table = {name: ps for module_plan in plan.plan.values() for name, ps in module_plan.items()}
    placements = []
    for t in tables:
        if t.table not in by_table:
            raise UserError(f"the sharding plan has no entry for table {t.table}")
        ps = by_table[t.table]
        spec = ps.sharding_spec
        if isinstance(spec, EnumerableShardingSpec):
            ranks = [shard.placement.rank() for shard in spec.shards]
            sizes = [list(shard.shard_sizes) for shard in spec.shards]
        else:  # data_parallel: a full replica on every rank
            ranks = list(range(world_size))
            sizes = [[t.cardinality, t.storage_dim]] * world_size
        placements.append(
            TablePlacement(t.set_index, t.field, t.table, ps.sharding_type, ps.compute_kernel, ranks, sizes)
        )
    return placements


def render_plan(plan: ShardingPlan, tables: Sequence[TableInfo], world_size: int) -> str:
    """A text table: set, field, table, sharding type, ranks, shard sizes (rows x cols)."""
    header = ("set", "field", "table", "sharding", "kernel", "ranks", "shards (rows x cols)")
    rows = [header] + [
        (
            str(p.set_index),
            p.field,
            p.table,
            p.sharding_type,
            p.compute_kernel,
            ",".join(map(str, p.ranks)),
            " ".join(f"{r}x{c}" for r, c in p.shard_sizes),
        )
        for p in plan_placements(plan, tables, world_size)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
