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
device is known (``check_sharding_config``). The other device-bound choices (the compute
kernel, fp16 tables, bf16 autocast, the embedding optimizer, the memory caps) are checked
by ``check_device_support`` when a trainer starts, before anything is planned or written:
``sharding.compute_kernel: fused_uvm_caching`` and ``optim.embedding: adam`` are CUDA
only; fp16 tables train on CPU too (FBGEMM's CPU kernels: checked with sgd, adagrad and
row-wise adagrad, table- and column-wise, fbgemm-gpu-cpu 1.8); bf16 autocast of the dense
part runs on CPU (every model of the zoo, checked) and on CUDA devices with bf16.

Facts about ``DistributedModelParallel`` this module is built around (checked on CPU + gloo,
torchrec 1.9.2): DMP does not copy the unsharded tables into the shards, it re-initialises
them (``shard_model`` therefore redraws every shard from the model's seed); the sharded
collection's output keys come in another order (the sparse arch assembles by key);
``data_parallel`` tables get no fused kernel and no in-backward optimizer, they are dense
DDP parameters (``trainer.embedding_optim.combined_optimizer`` steps them row-sparse, or
whole under ``optim.embedding: dense_adam``, which plans every table ``data_parallel``).
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
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
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
from torchrec.distributed.types import CacheParams, ModuleSharder, ShardingEnv, ShardingPlan

from trainer.embedding_optim import device_embedding_optimizers
from trainer.errors import UserError
from trainer.job_config import SHARDING_TYPES, ShardingConfig, TrainConfig
from trainer.model.sparse_arch import TableInfo, find_sparse_arch, init_table_
from trainer.table_layout import TABLE_NAME_FORMAT

CUDA_SHARDING_TYPES = SHARDING_TYPES
CPU_SHARDING_TYPES = tuple(t for t in SHARDING_TYPES if t not in ("row_wise", "table_row_wise"))


def device_sharding_types(device: torch.device) -> tuple[str, ...]:
    """The sharding types ``device`` can run."""
    return CUDA_SHARDING_TYPES if device.type == "cuda" else CPU_SHARDING_TYPES


# what each device-bound choice needs: key -> value -> the device types that run it
DEVICE_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "sharding.compute_kernel": {"auto": ("cpu", "cuda"), "fused": ("cpu", "cuda"), "fused_uvm_caching": ("cuda",)},
    "embedding.data_type": {"fp32": ("cpu", "cuda"), "fp16": ("cpu", "cuda")},
    "train.dense_autocast": {"none": ("cpu", "cuda"), "bf16": ("cpu", "cuda")},
}


def check_device_support(config: TrainConfig, device: torch.device) -> None:
    """UserError, naming the key and the device, for a choice ``device`` cannot run:
    ``sharding.compute_kernel: fused_uvm_caching`` and ``optim.embedding: adam`` off CUDA,
    ``train.dense_autocast: bf16`` on a GPU without bfloat16, a memory cap given twice
    (``sharding.storage_cap_bytes`` is HBM on CUDA, DDR on CPU). Sharding types are
    checked with the tables (``check_sharding_config``, from ``plan_sharding``)."""
    kind = device.type
    chosen = {
        "sharding.compute_kernel": config.sharding.compute_kernel,
        "embedding.data_type": config.embedding.data_type,
        "train.dense_autocast": config.train.dense_autocast,
    }
    for key, value in chosen.items():
        devices = DEVICE_CHOICES[key][value]
        if kind not in devices:
            usable = [v for v, d in DEVICE_CHOICES[key].items() if kind in d]
            raise UserError(f"{key} {value!r} needs {' or '.join(devices)}, this job runs on {kind}; {kind} can run: {usable}")
    if config.optim.embedding not in device_embedding_optimizers(device):
        needs = "cuda" if config.optim.embedding == "adam" else "another device"
        raise UserError(
            f"optim.embedding {config.optim.embedding!r} needs {needs}, this job runs on {kind} (no fused kernel here); "
            f"{kind} can run: {device_embedding_optimizers(device)}"
        )
    if (
        config.train.dense_autocast == "bf16"
        and kind == "cuda"
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        raise UserError(f"train.dense_autocast 'bf16': {torch.cuda.get_device_name()} has no bfloat16; use none")
    s = config.sharding
    own = "hbm_cap_bytes" if kind == "cuda" else "ddr_cap_bytes"
    if s.storage_cap_bytes is not None and getattr(s, own) is not None:
        raise UserError(
            f"sharding.storage_cap_bytes and sharding.{own} both cap the {'HBM' if kind == 'cuda' else 'DDR'} "
            f"of a {kind} rank: set one"
        )


def memory_caps(config: ShardingConfig, device: torch.device) -> tuple[int | None, int | None]:
    """(HBM, DDR) bytes per rank for the planner's topology (None: TorchRec's default);
    ``storage_cap_bytes`` stands for the device's own memory."""
    if device.type == "cuda":
        return config.hbm_cap_bytes or config.storage_cap_bytes, config.ddr_cap_bytes
    return config.hbm_cap_bytes, config.ddr_cap_bytes or config.storage_cap_bytes


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
    config: ShardingConfig,
    tables: Sequence[TableInfo],
    device: torch.device,
    data_type: str = "fp32",
    replicate_tables: bool = False,
) -> dict[str, ParameterConstraints]:
    """Table name -> the planner's constraints for it.

    ``replicate_tables``: every table ``data_parallel`` (a dense embedding optimizer,
    ``dense_adam``, steps whole replicas); constraints that rule it out are refused.
    fp16 tables are never ``data_parallel``: a replicated table is a dense parameter stepped
    by a torch optimizer, which in fp16 underflows (eps 1e-8 is 0 in fp16: the loss turns
    NaN within ten steps, checked on CPU); FBGEMM's fused kernels keep fp16 tables finite."""
    check_sharding_config(config, tables, device)
    constraints = {}
    for t in tables:
        types = allowed_sharding_types(config, t, device)
        if replicate_tables:
            if "data_parallel" not in types:
                raise UserError(
                    f"table {t.table}: optim.embedding dense_adam replicates every table (data_parallel), "
                    f"and the sharding constraints allow it only {types}"
                )
            types = ["data_parallel"]
        if data_type == "fp16":
            if types == ["data_parallel"]:
                raise UserError(
                    f"table {t.table}: embedding.data_type 'fp16' cannot be data_parallel (a replicated table is "
                    "stepped by a torch optimizer, which fp16 underflows); allow another sharding type for it "
                    "or use embedding.data_type fp32"
                )
            types = [st for st in types if st != "data_parallel"]
        kernel: dict[str, object] = {}
        # a table held to data_parallel keeps its only kernel (dense); elsewhere a kernel
        # choice rules data_parallel out (it has no fused kernel)
        if config.compute_kernel != "auto" and types != ["data_parallel"]:
            types = [st for st in types if st != "data_parallel"]
            kernel["compute_kernels"] = [EmbeddingComputeKernel(config.compute_kernel).value]
            if config.compute_kernel == "fused_uvm_caching":
                kernel["cache_params"] = CacheParams(load_factor=float(config.uvm_cache_load_factor))
        constraints[t.table] = ParameterConstraints(sharding_types=types, **kernel)
    return constraints


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
    replicate_tables: bool = False,
) -> ShardingPlan:
    """Plan where every table of ``model`` (a ``MultiEmbeddingCTR`` or a module wrapping
    one) lives on ``world_size`` ranks of ``device``'s type.

    With ``pg`` the plan is made on rank 0 and broadcast (every rank must call this); without
    it the plan is made locally (tests, dry runs). ``local_world_size`` is the ranks per
    host (default: all on one host); ``batch_size`` the per-rank batch, for the planner's
    estimates; ``replicate_tables``: every table ``data_parallel`` (``dense_adam``). Call
    ``apply_embedding_optimizer`` first so the planner counts the optimizer state.
    """
    tables = find_sparse_arch(model)[1].tables
    hbm_cap, ddr_cap = memory_caps(config, device)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=hbm_cap,
            ddr_cap_bytes=ddr_cap,
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=build_constraints(config, tables, device, find_sparse_arch(model)[1].data_type, replicate_tables),
        debug=False,
    )

    def plan_or_error() -> ShardingPlan | str:
        try:
            return planner.plan(model, sharders())
        except PlannerError as e:
            element_size = max(p.element_size() for p in find_sparse_arch(model)[1].parameters())
            return _planner_error_message(e, tables, config, world_size, device, element_size)

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
    element_size: int = 4,
) -> str:
    hbm_cap, ddr_cap = memory_caps(config, device)
    if device.type == "cuda":
        caps = [("HBM", hbm_cap, "hbm_cap_bytes")]
        if ddr_cap or config.compute_kernel == "fused_uvm_caching":
            caps.append(("DDR", ddr_cap, "ddr_cap_bytes"))
    else:
        caps = [("DDR", ddr_cap, "ddr_cap_bytes")]
    cap = " and ".join(f"{f'{c} bytes' if c else 'the default topology cap'} of {m}" for m, c, _ in caps)
    table_bytes = sum(t.cardinality * t.storage_dim * element_size for t in tables)
    precision = {2: "fp16", 4: "fp32"}.get(element_size, f"{element_size}-byte")
    kernel = "" if config.compute_kernel == "auto" else f" with the {config.compute_kernel} kernel"
    what = (
        f"{len(tables)} embedding tables ({table_bytes} bytes of {precision} weights, plus optimizer state "
        f"and lookup buffers) on {world_size} {device.type} ranks{kernel} with {cap} each"
    )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if error.error_type == PlannerErrorType.INSUFFICIENT_STORAGE:
        keys = " / ".join(k for *_, k in caps)
        uvm = (
            "; on CUDA, sharding.compute_kernel: fused_uvm_caching keeps tables in host memory"
            if device.type == "cuda" and config.compute_kernel != "fused_uvm_caching"
            else ""
        )
        return (
            f"sharding plan does not fit: {what}, of which the planner first reserves 15% and "
            f"the dense model per rank; raise {keys} (or storage_cap_bytes), add ranks or shrink the model{uvm} "
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
