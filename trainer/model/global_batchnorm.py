"""BatchNorm over the global batch of a data-parallel run (``model.sync_batchnorm``).

The paper normalises over its 2048-row batch; a run of R ranks x B rows with plain
``BatchNorm1d`` normalises each rank's B rows alone. ``GlobalBatchNorm1d`` is
``BatchNorm1d`` whose training statistics come from every rank: each rank packs its
per-channel sum, sum of squares and row count into one ``(2C + 1,)`` tensor, one
differentiable all-reduce (``_AllReduceSum``) adds them, and the mean and biased
variance of the global batch normalise the rank's rows. Gradients flow through the all-reduce (its backward all-reduces the gradient), so
forward, backward and the running statistics equal ``BatchNorm1d`` over the
concatenated global batch. Unlike ``nn.SyncBatchNorm`` it runs on gloo (CPU) as on
NCCL. In eval mode, or without a process group of more than one rank, it is
``BatchNorm1d``: evaluation and export use the running statistics as before. The
statistics are computed in float32 as ``E[x^2] - E[x]^2`` (one pass, one all-reduce).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the gradients (every rank's
    loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
) -> torch.Tensor:
    """Batch norm of this rank's ``x`` (B, C) with the statistics of every rank's rows; updates
    the running statistics (when given) in place. One all-reduce of a (2C + 1,) tensor."""
    c = x.shape[1]
    xf = x.float()
    local = torch.cat([xf, xf * xf, torch.ones_like(xf[:, :1])], dim=1).sum(0)  # (2C + 1,): sums and rows
    packed = _AllReduceSum.apply(local)
    total = packed[-1]
    mean = packed[:c] / total
    var = (packed[c : 2 * c] / total - mean * mean).clamp_min(0.0)  # biased, as BN normalises
    if running_mean is not None and running_var is not None and num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
            m = 1.0 / num_batches_tracked.float() if momentum is None else momentum
            running_mean.lerp_(mean.detach().to(running_mean.dtype), m)
            unbiased = var.detach() * total / (total - 1).clamp_min(1.0)
            running_var.lerp_(unbiased.to(running_var.dtype), m)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None and bias is not None:
        out = out * weight + bias
    return out.to(x.dtype)


def _local_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    training: bool,
) -> torch.Tensor:
    """``BatchNorm1d.forward`` of this rank's ``x`` (B, C) alone: evaluation, or a run of one rank."""
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    use_batch_stats = training or running_mean is None
    return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor, eps)


# one opaque call each when torch.fx traces the model (TorchRec's train pipeline does; this
# module is not a leaf of its tracer as torch.nn's BatchNorm1d is): the trace neither looks
# inside (BatchNorm's input checks branch on the input's shape) nor runs the in-place updates
# of the running statistics
torch.fx.wrap("_global_batch_norm")
torch.fx.wrap("_local_batch_norm")


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` over the rows of all ranks; input (B, C), B may differ between ranks.

    Example::

        GlobalBatchNorm1d(400)(torch.randn(256, 400)).shape  # (256, 400)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): (B, C), this rank's rows.

        Returns:
            torch.Tensor: (B, C), normalised with the statistics of every rank's rows.
        """
        if not self.training or _world() == 1:
            return _local_batch_norm(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
                self.momentum, self.eps, self.training,
            )
        return _global_batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked, self.momentum, self.eps
        )


def use_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` inside ``module`` by a ``GlobalBatchNorm1d`` with the
    same settings, parameters and running statistics; returns ``module``."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            synced = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            use_global_batchnorm(child)
    return module
