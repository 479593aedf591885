"""What follows an interaction: the per-set projection and the shared tail.

``MultiEmbeddingCTR`` runs, for every embedding set ``m``,
``projection_m(interaction_m(embeddings[m]))``, averages the M results and feeds the
mean to one shared ``tail`` that returns a logit ``(B, 1)``. A *head* decides what the
projection and the tail are for an interaction; every interaction class names its head
(``Interaction.head``). Three heads cover the paper's models:

- ``ProjectedMLP`` (DNN, DCNv2, IPNN, NFwFM): projection ``Linear -> BN -> ReLU ->
  Dropout`` to H; tail ``Linear(H, H) -> BN -> ReLU -> Dropout -> Linear(H, 1)``. With
  one set this is the reference's single-embedding MLP H-H-1.
- ``ExplicitPlusDNN`` (xDeepFM, AutoInt): the interaction outputs ``[explicit features
  (D_x), flattened embeddings (F*K)]``; the projection keeps the explicit features and
  projects the embeddings (the DNN branch's first layer); the tail adds
  ``Linear(D_x, 1)`` of the averaged explicit features to the MLP tail of the averaged
  DNN branch.
- ``BilinearFusionHead`` (FinalMLP): the interaction's two towers are already the
  nonlinear per-set part (no projection); the tail is the bilinear fusion of the two
  averaged streams.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from trainer.job_config import ModelConfig


class ReLUDropout(nn.Module):
    """``Dropout(p)(ReLU(x))`` with one mask: while training, ``x * m`` where
    ``m = 1/(1-p)`` if ``rand >= p`` and ``x > 0``, else 0; the backward is one multiply
    by ``m``. The mask comes from ``rand_like`` (cheaper than the
    ``bernoulli_`` of ``nn.Dropout`` on CPU), so its random stream differs from
    ``nn.Dropout``'s but its distribution is the same. In eval mode it is ``relu``.

    Args:
        p (float): dropout probability, in [0, 1).

    Example::

        ReLUDropout(0.2).eval()(torch.tensor([-1.0, 2.0]))  # tensor([0., 2.])
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p}: expected [0, 1)")
        self.p: float = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(...) -> (...), the same shape and dtype."""
        if not self.training or self.p == 0:
            return torch.relu(x)
        keep = (torch.rand_like(x) >= self.p) & (x > 0)
        return x * (keep * x.new_full((), 1 / (1 - self.p)))  # a 0-dim scale: the mask takes x's dtype

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ProjectionBlock(nn.Module):
    """``Linear -> BatchNorm1d -> ReLU -> Dropout`` (the last two fused: ``ReLUDropout``).

    Args:
        in_features (int): input width.
        out_features (int): output width.
        dropout (float): dropout probability.

    Example::

        ProjectionBlock(12, 400, 0.2)(torch.randn(8, 12)).shape  # (8, 400)
    """

    def __init__(self, in_features: int, out_features: int, dropout: float) -> None:
        super().__init__()
        self.layers: nn.Sequential = nn.Sequential(
            nn.Linear(in_features, out_features),
            nn.BatchNorm1d(out_features),
            ReLUDropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): (B, in_features).

        Returns:
            torch.Tensor: (B, out_features).
        """
        return self.layers(x)


def mlp_tail(hidden: int, dropout: float) -> nn.Sequential:
    """The shared post-processing MLP: ``ProjectionBlock(H, H) -> Linear(H, 1)``, (B, H) -> (B, 1)."""
    return nn.Sequential(ProjectionBlock(hidden, hidden, dropout), nn.Linear(hidden, 1))


class Head(Protocol):
    """Builds the per-set projection and the shared tail that follow ``interaction``."""

    @classmethod
    def projection(cls, interaction: nn.Module, config: "ModelConfig") -> nn.Module: ...

    @classmethod
    def tail(cls, interaction: nn.Module, config: "ModelConfig") -> nn.Module: ...


class ProjectedMLP:
    """Per-set ``ProjectionBlock(output_dim, H)``; shared ``mlp_tail(H)``."""

    @classmethod
    def projection(cls, interaction: nn.Module, config: "ModelConfig") -> nn.Module:
        return ProjectionBlock(interaction.output_dim, config.hidden, config.dropout)

    @classmethod
    def tail(cls, interaction: nn.Module, config: "ModelConfig") -> nn.Module:
        return mlp_tail(config.hidden, config.dropout)


class SplitProjection(nn.Module):
    """Keeps the first ``explicit_dim`` columns, applies ``dnn`` to the rest, concatenates.

    Args:
        explicit_dim (int): D_x, the columns passed through.
        dnn (nn.Module): (B, rest) -> (B, H).

    Example::

        SplitProjection(2, nn.Linear(3, 4))(torch.randn(8, 5)).shape  # (8, 6)
    """

    def __init__(self, explicit_dim: int, dnn: nn.Module) -> None:
        super().__init__()
        self.explicit_dim: int = explicit_dim
        self.dnn: nn.Module = dnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_x + rest) -> (B, D_x + H)."""
        return torch.cat([x[:, : self.explicit_dim], self.dnn(x[:, self.explicit_dim :])], dim=1)


class ExplicitPlusDNNTail(nn.Module):
    """``explicit(x[:, :D_x]) + dnn(x[:, D_x:])``: the two logits of xDeepFM / AutoInt add.

    Args:
        explicit_dim (int): D_x.
        hidden (int): H, the width of the DNN branch.
        dropout (float): dropout probability of the DNN tail.
    """

    def __init__(self, explicit_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.explicit_dim: int = explicit_dim
        self.explicit: nn.Linear = nn.Linear(explicit_dim, 1)
        self.dnn: nn.Sequential = mlp_tail(hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_x + H) -> (B, 1)."""
        return self.explicit(x[:, : self.explicit_dim]) + self.dnn(x[:, self.explicit_dim :])


class ExplicitPlusDNN:
    """For interactions whose output is ``[explicit (explicit_dim), flattened embeddings]``:
    per set ``SplitProjection`` (DNN branch projected to H), shared ``ExplicitPlusDNNTail``."""

    @classmethod
    def projection(cls, interaction: nn.Module, config: "ModelConfig") -> nn.Module:
        flat_dim = interaction.output_dim - interaction.explicit_dim
        return SplitProjection(interaction.explicit_dim, ProjectionBlock(flat_dim, config.hidden, config.dropout))

    @classmethod
    def tail(cls, interaction: nn.Module, config: "ModelConfig") -> nn.Module:
        return ExplicitPlusDNNTail(interaction.explicit_dim, config.hidden, config.dropout)


class BilinearFusion(nn.Module):
    """FinalMLP's fusion of two streams ``x, y`` (the two halves of the input):
    ``w_x . x + w_y . y + x^T W_xy y`` (+ biases), ``W_xy`` zero-initialised as in the reference.

    Args:
        stream_dim (int): the width of each stream.

    Example::

        BilinearFusion(4)(torch.randn(8, 8)).shape  # (8, 1)
    """

    def __init__(self, stream_dim: int) -> None:
        super().__init__()
        self.stream_dim: int = stream_dim
        self.w_x: nn.Linear = nn.Linear(stream_dim, 1)
        self.w_y: nn.Linear = nn.Linear(stream_dim, 1)
        self.w_xy: nn.Parameter = nn.Parameter(torch.zeros(stream_dim, stream_dim))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """(B, 2 * stream_dim) -> (B, 1)."""
        x, y = streams[:, : self.stream_dim], streams[:, self.stream_dim :]
        return self.w_x(x) + self.w_y(y) + ((x @ self.w_xy) * y).sum(dim=1, keepdim=True)


class BilinearFusionHead:
    """For two-stream interactions (``stream_dim`` each): no projection, shared ``BilinearFusion``."""

    @classmethod
    def projection(cls, interaction: nn.Module, config: "ModelConfig") -> nn.Module:
        return nn.Identity()

    @classmethod
    def tail(cls, interaction: nn.Module, config: "ModelConfig") -> nn.Module:
        return BilinearFusion(interaction.stream_dim)
