"""DNN: the interaction is the concatenation of the field embeddings; the per-set
projection that follows does the (nonlinear) work."""

from __future__ import annotations

import torch
from torch import nn

from trainer.job_config import ModelConfig
from trainer.model.heads import ProjectedMLP


class DNNInteraction(nn.Module):
    """Flattens one set's field embeddings.

    Args:
        num_fields (int): F.
        dim (int): K.

    Example::

        DNNInteraction(num_fields=3, dim=4)(torch.randn(2, 3, 4)).shape  # (2, 12)
    """

    head = ProjectedMLP

    def __init__(self, num_fields: int, dim: int) -> None:
        super().__init__()
        self.output_dim: int = num_fields * dim

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int, num_sets: int = 1) -> "DNNInteraction":
        return cls(num_fields, dim)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): (B, F, K).

        Returns:
            torch.Tensor: (B, F * K).
        """
        return embeddings.flatten(1)
