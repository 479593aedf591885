"""The embedding optimizer: fused into FBGEMM's kernels, and row-sparse where it is not.

``embedding_optimizer(name, device, ...)`` checks the name against what the device runs
(CPU: ``sgd, adagrad, rowwise_adagrad, dense_adam``; CUDA adds ``adam``) and
``apply_embedding_optimizer`` attaches it to the tables TorchRec's way, before planning
and sharding. ``combined_optimizer`` then gives one keyed optimizer over the sharded
model: the fused tables, the replicated (``data_parallel``) tables, the dense layers.

``dense_adam`` is the paper's recipe (thuml/Multi-Embedding ``main.py``): one torch Adam with
coupled L2 weight decay over every parameter, whole tables included, so every row moves
every step (its momentum and its decay act on rows the batch did not look up). FBGEMM has
no such kernel: every table is planned ``data_parallel`` (``trainer.sharding``; DDP
all-reduces the dense table gradients) and stepped here by ``torch.optim.Adam(fused=True)``
(torch's one-kernel-a-tensor Adam: the default update, ~6x faster on CPU). Cost: a dense
gradient, all-reduce and Adam update of every table every step, and 2 table-sized state
tensors per table (``bench/bench_embedding_optim.py``).

Replicated tables are stepped the way FBGEMM's fused kernels step the others: sparsely.
A sharded table is updated inside the FBGEMM backward, which only touches the rows the
batch looked up: their weights, their optimizer state, and their weight decay. A table the
planner places ``data_parallel`` is a plain dense parameter whose gradient is zero on every
other row, and a torch optimizer steps all of it: weight decay pulls every row, and an
adaptive optimizer (Adagrad, row-wise Adagrad, Adam) divides that tiny pull by its own tiny
running scale, so rows the data rarely or never shows shrink at the full learning rate
(row-wise Adagrad, lr 0.05, weight decay 1e-6: a never-seen row is gone in ~150 steps).
The same model would then train differently depending on where the planner put a table.

``row_sparse_optimizer`` gives the torch optimizer the kernels' semantics with two step
hooks: before a step, weight decay is added to the gradient of the rows that have one
(the rows this step looked up: DDP has already summed the gradients of every rank, so all
ranks agree), and the other rows and their state are set aside; after it, they are put
back unchanged. The optimizer itself runs without weight decay. Without weight decay,
Adagrad, row-wise Adagrad and plain SGD already leave a zero-gradient row alone and get
no hooks (CPU, where FBGEMM has no weight decay, never pays for them).

``GroupedRowWiseAdagrad`` steps the replicated tables of row-wise Adagrad (the default) in
blocks: TorchRec keeps the ``data_parallel`` tables of one group in a single flat FBGEMM
weight and hands them out as per-table views, so a block of equally wide tables is one
(rows, cols) matrix. ME has hundreds of small tables (390 at 10x); stepping each alone cost
~10 ops a table a step. The state stays per table (views of the block's state), so
checkpoints keep TorchRec's keys and shapes, and the update is row-wise Adagrad's, row for row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad, adagrad

from trainer.errors import UserError
from trainer.model.sparse_arch import find_sparse_arch


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """A fused embedding optimizer: the torch optimizer class TorchRec maps to an FBGEMM
    ``EmbOptimType`` when it shards the tables, and its keyword arguments (torch names)."""

    name: str
    optimizer_class: type[torch.optim.Optimizer]
    emb_opt_type: EmbOptimType | None  # None: no fused kernel (dense)
    kwargs: Mapping[str, Any]
    dropped_weight_decay: float = 0.0  # asked for, but the device's fused kernels cannot apply it

    @property
    def dense(self) -> bool:
        """Steps whole replicated tables, every row every step (no fused kernel)."""
        return self.emb_opt_type is None


# name -> (torch optimizer class, FBGEMM type (None: dense, no fused kernel), takes eps, devices that run it)
_EMBEDDING_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], EmbOptimType | None, bool, tuple[str, ...]]] = {
    "sgd": (torch.optim.SGD, EmbOptimType.EXACT_SGD, False, ("cpu", "cuda")),
    "adagrad": (torch.optim.Adagrad, EmbOptimType.EXACT_ADAGRAD, True, ("cpu", "cuda")),
    "rowwise_adagrad": (RowWiseAdagrad, EmbOptimType.EXACT_ROWWISE_ADAGRAD, True, ("cpu", "cuda")),
    "adam": (torch.optim.Adam, EmbOptimType.ADAM, True, ("cuda",)),
    "dense_adam": (torch.optim.Adam, None, True, ("cpu", "cuda")),
}


def device_embedding_optimizers(device: torch.device) -> list[str]:
    """The embedding optimizers ``device`` can run."""
    return [name for name, (*_, devices) in _EMBEDDING_OPTIMIZERS.items() if device.type in devices]


def embedding_optimizer(
    name: str,
    device: torch.device,
    lr: float,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> EmbeddingOptimizer:
    """Validate ``name`` against ``device`` and return the fused optimizer to apply.

    ``eps`` is used by adagrad, rowwise_adagrad, adam and dense_adam. ``weight_decay`` is L2
    on the rows a step looks up, as FBGEMM's CUDA kernels apply it (``WeightDecayMode.L2``,
    see ``sharders``). FBGEMM's CPU kernels ignore weight decay (checked: the same update with
    0.05 as with 0, fbgemm-gpu 1.4), so on CPU it is dropped for every table, replicated
    ones included, and reported in ``dropped_weight_decay`` for the caller to say so.
    ``dense_adam`` is torch's Adam: coupled L2 on every row, on any device.
    """
    if name not in _EMBEDDING_OPTIMIZERS:
        raise UserError(f"embedding optimizer {name!r}: expected one of {list(_EMBEDDING_OPTIMIZERS)}")
    optimizer_class, emb_opt_type, takes_eps, devices = _EMBEDDING_OPTIMIZERS[name]
    if device.type not in devices:
        raise UserError(
            f"optim.embedding {name!r} has no fused kernel on {device.type} (it needs {' or '.join(devices)}); "
            f"{device.type} can run: {device_embedding_optimizers(device)}"
        )
    if not lr > 0:
        raise UserError(f"embedding optimizer lr {lr!r}: expected a positive number")
    dropped = weight_decay if device.type == "cpu" and emb_opt_type is not None else 0.0
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay - dropped}
    if takes_eps:
        kwargs["eps"] = eps
    if emb_opt_type is None:  # torch's fused Adam: the same update in one kernel a table (CPU: ~6x the per-tensor loop)
        kwargs["fused"] = True
    return EmbeddingOptimizer(name, optimizer_class, emb_opt_type, kwargs, dropped)


def apply_embedding_optimizer(model: nn.Module, optimizer: EmbeddingOptimizer) -> None:
    """Attach ``optimizer`` to the embedding tables, TorchRec's way: it runs in backward
    (unsharded: a torch optimizer per table; sharded: fused into the FBGEMM kernels, exposed
    as ``DistributedModelParallel.fused_optimizer``). Call before planning and sharding.
    A dense optimizer attaches nothing: ``combined_optimizer`` steps its replicated tables."""
    if optimizer.dense:
        return
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
      (``row_sparse_optimizer`` below), so every table trains the same wherever it lives;
      a dense optimizer (``dense_adam``: every table is replicated) steps them whole;
    - ``dense``: everything else, by ``dense_factory`` (e.g. ``lambda p: Adam(p, lr=1e-3)``).
    """
    prefix, arch = find_sparse_arch(sharded.module)
    table_keys = set(arch.weight_keys(prefix).values())
    unfused = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    replicated = {k: p for k, p in unfused.items() if k in table_keys}
    dense = {k: p for k, p in unfused.items() if k not in table_keys}
    if embedding.dense and len(replicated) != len(table_keys):
        raise ValueError(
            f"embedding optimizer {embedding.name} steps replicated tables only, and the plan shards "
            f"{sorted(table_keys - set(replicated))[:3]}...: plan every table data_parallel (trainer.sharding)"
        )
    optims: list[tuple[str, KeyedOptimizer]] = [
        ("fused", sharded.fused_optimizer),
        ("dense", KeyedOptimizerWrapper(dense, dense_factory)),
    ]
    if replicated:
        optims.append(
            (
                "replicated_tables",
                KeyedOptimizerWrapper(
                    replicated,
                    (lambda params: embedding.optimizer_class(params, **embedding.kwargs))
                    if embedding.dense
                    else (lambda params: row_sparse_optimizer(_grouped(embedding.optimizer_class), params, dict(embedding.kwargs))),
                ),
            )
        )
    return CombinedOptimizer(optims)


# ---- row-sparse steps of replicated tables -----------------------------------------

# Optimizers for which a zero gradient (without weight decay) changes neither a row nor its
# state: they need no hooks (about 40 us a table a step saved).
_IDLE_ROWS_STAY = (torch.optim.Adagrad, RowWiseAdagrad)


def looked_up_rows(grad: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: the rows of a (rows, cols) table gradient that are not all zero."""
    return grad.ne(0).any(dim=1)


def row_sparse_optimizer(
    optimizer_class: type[torch.optim.Optimizer], params: Iterable[torch.Tensor], kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """``optimizer_class(params, **kwargs)`` that only changes the rows with a gradient.

    Args:
        optimizer_class: a torch optimizer whose per-parameter state tensors are either
            shaped like the (rows, cols) table or (rows, ...) (row-wise state) or scalars.
        params: 2-D embedding tables.
        kwargs: its keyword arguments; ``weight_decay`` is applied to the looked-up rows
            only (the optimizer gets 0).
    """
    params = list(params)
    if any(p.dim() != 2 for p in params):
        raise ValueError("row_sparse_optimizer steps 2-D embedding tables only")
    weight_decay = float(kwargs.get("weight_decay", 0.0))
    optimizer = optimizer_class(params, **{**kwargs, "weight_decay": 0.0})
    plain_sgd = optimizer_class is torch.optim.SGD and not kwargs.get("momentum")
    if not weight_decay and (issubclass(optimizer_class, _IDLE_ROWS_STAY) or plain_sgd):
        return optimizer
    set_aside: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def before_step(opt: torch.optim.Optimizer, args: Any, kw: Any) -> None:
        set_aside.clear()
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    rows = looked_up_rows(p.grad)
                    if weight_decay:
                        p.grad[rows] += weight_decay * p[rows]
                    idle = (~rows).nonzero().squeeze(1)
                    if idle.numel():
                        state = {
                            k: v[idle].clone()
                            for k, v in opt.state.get(p, {}).items()
                            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0]
                        }
                        set_aside.append((p, idle, p[idle].clone(), state))

    def after_step(opt: torch.optim.Optimizer, args: Any, kw: Any) -> None:
        with torch.no_grad():
            for p, idle, weights, state in set_aside:
                p[idle] = weights
                for k, v in state.items():
                    opt.state[p][k][idle] = v
        set_aside.clear()

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
    return optimizer


# ---- row-wise Adagrad over blocks of replicated tables -----------------------------


def _grouped(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """The block-stepping equivalent of ``optimizer_class`` where there is one."""
    return GroupedRowWiseAdagrad if optimizer_class is RowWiseAdagrad else optimizer_class


def _table_blocks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Runs of tables that are consecutive, equally wide row slices of one flat tensor
    (TorchRec's ``TableBatchedEmbeddingSlice``: ``_original_tensor[_start_offset:_end_offset]``)."""
    by_flat: dict[int, list[torch.Tensor]] = {}
    for p in params:
        if hasattr(p, "_original_tensor") and p.dim() == 2:
            by_flat.setdefault(id(p._original_tensor), []).append(p)
    blocks = []
    for tables in by_flat.values():
        tables.sort(key=lambda p: p._start_offset)
        block = [tables[0]]
        for p in tables[1:]:
            if p._start_offset == block[-1]._end_offset and p.shape[1] == block[-1].shape[1]:
                block.append(p)
            else:
                blocks.append(block)
                block = [p]
        blocks.append(block)
    return [b for b in blocks if len(b) > 1]


class GroupedRowWiseAdagrad(RowWiseAdagrad):
    """TorchRec's ``RowWiseAdagrad`` that steps consecutive replicated tables of one flat
    FBGEMM weight as one (rows, cols) block: ``sum += mean(g^2, 1)``,
    ``w -= lr * g / (sqrt(sum) + eps)``, the same operations row for row (bit-identical).
    Each table keeps its own state tensors (``sum`` (rows, 1) is a view of the block's), so
    ``state_dict`` and in-place checkpoint loading are TorchRec's. Tables outside a block, and
    any setting the block step does not cover (``lr_decay``, ``weight_decay``, ``maximize``),
    are stepped by ``RowWiseAdagrad`` itself."""

    def __init__(self, params: Iterable[torch.Tensor], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._blocks: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (tables, their (rows, 1) state sum)
        self._in_block: set[int] = set()
        group = self.param_groups[0]
        if len(self.param_groups) != 1 or group["lr_decay"] or group["weight_decay"] or group["maximize"]:
            return
        for tables in _table_blocks(list(group["params"])):
            state_sum = torch.cat([self.state[p]["sum"] for p in tables])  # (rows, 1)
            row = 0
            for p in tables:
                self.state[p]["sum"] = state_sum[row : row + p.shape[0]]
                row += p.shape[0]
            self._blocks.append((tables, state_sum))
        self._in_block = {id(p) for tables, _ in self._blocks for p in tables}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if not self._blocks:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        per_table = [p for p in group["params"] if id(p) not in self._in_block]
        for tables, state_sum in self._blocks:
            flat = tables[0]._original_tensor
            if flat.grad is None:  # gradients set per table (KeyedOptimizer.init_state): one by one
                per_table += tables
                continue
            start, end, cols = tables[0]._start_offset, tables[-1]._end_offset, tables[0].shape[1]
            weights, grad = flat[start:end].view(-1, cols), flat.grad[start:end].view(-1, cols)
            torch._foreach_add_([self.state[p]["step"] for p in tables], 1)
            state_sum += grad.pow(2).mean(axis=1).view(-1, 1)
            weights.addcdiv_(grad, state_sum.sqrt().add_(group["eps"]), value=-group["lr"])
        rest = [p for p in per_table if p.grad is not None]
        if rest:
            adagrad(
                rest, [p.grad for p in rest], [self.state[p]["sum"] for p in rest],
                [self.state[p]["step"] for p in rest], lr=group["lr"], weight_decay=group["weight_decay"],
                lr_decay=group["lr_decay"], eps=group["eps"], maximize=group["maximize"],
            )  # fmt: skip
        return loss
