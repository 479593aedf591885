"""DCNv2 (stacked): a full-rank cross net on the flattened field embeddings.

Each layer computes ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` (TorchRec's ``CrossNet``:
Xavier-normal ``W_l``, zero ``b_l``); the paper uses 4 layers.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet

from trainer.job_config import ModelConfig
from trainer.model.heads import ProjectedMLP


class DCNv2Interaction(nn.Module):
    """Full-rank cross layers over one set's ``F * K`` flattened embeddings.

    Args:
        num_fields (int): F.
        dim (int): K.
        num_layers (int): the number of cross layers.

    Example::

        DCNv2Interaction(num_fields=3, dim=4, num_layers=4)(torch.randn(2, 3, 4)).shape  # (2, 12)
    """

    head = ProjectedMLP

    def __init__(self, num_fields: int, dim: int, num_layers: int) -> None:
        super().__init__()
        self.output_dim: int = num_fields * dim
        self.cross_net: CrossNet = CrossNet(in_features=self.output_dim, num_layers=num_layers)

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int, num_sets: int = 1) -> "DCNv2Interaction":
        return cls(num_fields, dim, config.cross_layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): (B, F, K).

        Returns:
            torch.Tensor: (B, F * K).
        """
        return self.cross_net(embeddings.flatten(1))
