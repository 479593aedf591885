"""Where the embedding tables live: the sharding plan and the sharded model.

The dense parts of the model run data-parallel (``DistributedModelParallel`` wraps them in
DDP); the M*F tables of ``MultiEmbeddingSparseArch`` are placed by TorchRec's planner
under the constraints of a ``ShardingConfig``. Typical use, on every rank::

    model = MultiEmbeddingCTR.from_config(fields, model_config, embedding_config, seed)
    emb_opt = embedding_optimizer("rowwise_adagrad", device, lr=0.01)   # trainer.embedding_optim
    apply_embedding_optimizer(model, emb_opt)
    plan = plan_sharding(model, sharding_config, world_size, device, pg=pg)
    print(render_plan(plan, model.sparse_arch.tables, world_size))      # trainer.plan_table

The planner's own estimates (per-rank memory and perf, TorchRec's ``EmbeddingStats`` table)
are logged by TorchRec; ``capture_planner_stats()`` collects them instead, for ``plan.txt``.
    sharded = shard_model(model, plan, device, pg)
    optimizer = combined_optimizer(sharded, emb_opt, lambda params: torch.optim.Adam(params, lr=1e-3))

What the device can run (checked on CPU + gloo, and what TorchRec documents for CUDA):
sharding types on CPU ``data_parallel, table_wise, column_wise, table_column_wise``; CUDA
adds ``row_wise, table_row_wise``. A config asking for more is refused here, where the
device is known (``check_sharding_config``).

Facts about ``DistributedModelParallel`` this module is built around (checked on CPU + gloo,
torchrec 1.9.2): DMP does not copy the unsharded tables into the shards, it re-initialises
them (``shard_model`` therefore redraws every shard from the model's seed); the sharded
collection's output keys come in another order (the sparse arch assembles by key);
``data_parallel`` tables get no fused kernel and no in-backward optimizer, they are dense
DDP parameters (``trainer.embedding_optim.combined_optimizer`` steps them row-sparse).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
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
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan

from trainer.errors import UserError
from trainer.job_config import SHARDING_TYPES, ShardingConfig
from trainer.model.sparse_arch import TableInfo, find_sparse_arch, init_table_
from trainer.table_layout import TABLE_NAME_FORMAT

CUDA_SHARDING_TYPES = SHARDING_TYPES
CPU_SHARDING_TYPES = tuple(t for t in SHARDING_TYPES if t not in ("row_wise", "table_row_wise"))


def device_sharding_types(device: torch.device) -> tuple[str, ...]:
    """The sharding types ``device`` can run."""
    return CUDA_SHARDING_TYPES if device.type == "cuda" else CPU_SHARDING_TYPES


def allowed_sharding_types(config: ShardingConfig, table: TableInfo, device: torch.device) -> list[str]:
    """The sharding types ``table`` may use on ``device``."""
    for pattern, types in config.per_table.items():
        if fnmatch.fnmatchcase(table.table, pattern):
            return list(types)
    if table.field in config.per_field:
        return list(config.per_field[table.field])
    return list(config.sharding_types or device_sharding_types(device))


def check_sharding_config(config: ShardingConfig, tables: Sequence[TableInfo], device: torch.device) -> None:
    """UserError for a type the device can't run, or a pattern/field that names no table."""
    usable = device_sharding_types(device)
    for where, types in config._type_lists():
        unusable = [t for t in types if t not in usable]
        if unusable:
            raise UserError(
                f"sharding {where}: {unusable} cannot run on {device.type}; "
                f"sharding types {device.type} can run: {list(usable)}"
            )
    names = {t.table for t in tables}
    fields = {t.field for t in tables}
    for pattern in config.per_table:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UserError(f"sharding per_table[{pattern!r}] matches no table (tables are named {TABLE_NAME_FORMAT})")
    unknown_fields = sorted(set(config.per_field) - fields)
    if unknown_fields:
        raise UserError(f"sharding per_field: unknown fields {unknown_fields}")


def build_constraints(
    config: ShardingConfig, tables: Sequence[TableInfo], device: torch.device
) -> dict[str, ParameterConstraints]:
    """Table name -> the planner's constraints for it."""
    check_sharding_config(config, tables, device)
    return {t.table: ParameterConstraints(sharding_types=allowed_sharding_types(config, t, device)) for t in tables}


def sharders() -> list[ModuleSharder[nn.Module]]:
    """The sharders of our model: its one ``EmbeddingBagCollection``. The fused optimizer
    comes from the parameters (``apply_embedding_optimizer``); the sharder only sets how
    its weight decay applies: L2 on the looked-up rows (FBGEMM's default, ``NONE``, would
    silently ignore it)."""
    return [EmbeddingBagCollectionSharder(fused_params={"weight_decay_mode": WeightDecayMode.L2})]


# the logger TorchRec's EmbeddingStats writes its table to, one INFO record per line
PLANNER_STATS_LOGGER = "torchrec.distributed.planner.stats"


class _LineCollector(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def capture_planner_stats() -> Iterator[list[str]]:
    """Collect, in the yielded list, the lines of the stats table TorchRec's planner logs while
    the block plans (``EmbeddingStats``: per-rank HBM/DDR and perf estimates, inputs, outputs,
    shards per sharding type, kernels), instead of logging them: whatever level the
    ``torchrec`` loggers are set to, and without reaching the console. Only a rank that plans
    collects anything (with a process group, rank 0)."""
    lines: list[str] = []
    logger = logging.getLogger(PLANNER_STATS_LOGGER)
    handler = _LineCollector(lines)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


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
