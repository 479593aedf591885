"""Step a torch optimizer over embedding tables the way FBGEMM's fused kernels do: sparsely.

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
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

__all__ = ["row_sparse_optimizer", "looked_up_rows"]

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
    if not weight_decay and (optimizer_class in _IDLE_ROWS_STAY or plain_sgd):
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
