"""FinalMLP: two MLP towers on the flattened embeddings, fused bilinearly.

Each tower is ``tower_layers`` blocks of ``Linear -> BN -> ReLU -> Dropout`` of width H
((400, 400) in the paper; the reference's feature-selection gates are disabled, as
there). Per set both towers run; the two streams are averaged across sets and fused by
one shared ``BilinearFusion`` (``BilinearFusionHead``).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.job_config import ModelConfig
from trainer.model.heads import BilinearFusionHead, ProjectionBlock


class FinalMLPInteraction(nn.Module):
    """The two towers of one set, outputs concatenated.

    Args:
        num_fields (int): F.
        dim (int): K.
        hidden (int): H, the width of every tower layer.
        layers (int): the depth of each tower.
        dropout (float): dropout probability.

    Example::

        FinalMLPInteraction(3, 4, hidden=8, layers=2, dropout=0.0)(torch.randn(2, 3, 4)).shape  # (2, 16)
    """

    head = BilinearFusionHead

    def __init__(self, num_fields: int, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        widths = [num_fields * dim] + [hidden] * layers
        self.towers: nn.ModuleList = nn.ModuleList(
            nn.Sequential(*(ProjectionBlock(a, b, dropout) for a, b in zip(widths, widths[1:]))) for _ in range(2)
        )
        self.stream_dim: int = hidden
        self.output_dim: int = 2 * hidden

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int, num_sets: int = 1) -> "FinalMLPInteraction":
        return cls(num_fields, dim, config.hidden, config.tower_layers, config.dropout)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): (B, F, K).

        Returns:
            torch.Tensor: (B, 2 * H), the two streams.
        """
        flat = embeddings.flatten(1)
        return torch.cat([tower(flat) for tower in self.towers], dim=1)
