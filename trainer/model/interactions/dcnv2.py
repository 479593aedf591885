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


class RowCrossNet(CrossNet):
    """TorchRec's ``CrossNet`` (same parameters, state-dict keys and initial values) on
    (B, N) rows: ``x_l W_l^T`` is one ``mm`` where ``CrossNet`` multiplies ``W_l`` into
    (B, N, 1) columns (a broadcast matmul folded with transposes, and a (N, 1) bias
    broadcast over them). The same operations in the same order, so the forward is bit for
    bit ``CrossNet``'s; fusing the bias into ``addmm`` or the update into ``addcmul`` was
    measured no faster here and rounds differently."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, N)."""
        x = input
        for kernel, bias in zip(self.kernels, self.bias):
            x = input * (torch.mm(x, kernel.t()) + bias.view(-1)) + x
        return x


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
        self.cross_net: CrossNet = RowCrossNet(in_features=self.output_dim, num_layers=num_layers)

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
