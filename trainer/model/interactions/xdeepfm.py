"""xDeepFM without the linear term: a compressed interaction network (CIN) beside a DNN.

CIN layer ``l`` (sizes ``cin_layers``, (16, 16) in the paper), per embedding dim k::

    h_l[o, k] = ReLU(b_o + sum_{i, j} W_l[o, i, j] * x0[i, k] * h_{l-1}[j, k])

(the reference's 1x1 Conv1d over the ``F * C_{l-1}`` outer-product maps, with the same
init) and the CIN features are ``sum_k concat_l h_l`` (B, sum C_l) = 32 features, read by a
``Linear(32 -> 1)``. The DNN branch is the DNN model on the flattened embeddings, and the
two logits add (``ExplicitPlusDNN`` head). With several sets the CIN features are averaged
across sets before the shared linear, and the DNN branch is projected per set, averaged
and fed to the shared tail.

Each layer first contracts ``h`` with ``W_l`` (one GEMM over all ``B * K`` rows), then with
``x0``, so the largest intermediate is ``B x K x C_l x F`` elements, never the reference's
``B x F * C_{l-1} x K`` outer product (at SE 10x, K = 100, F = 39, B = 2048: 0.51 GB
instead of 1.25 GB for the first layer), and it runs 2-4x faster on CPU.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trainer.job_config import ModelConfig
from trainer.model.heads import ExplicitPlusDNN


class CINInteraction(nn.Module):
    """CIN features of one set, followed by its flattened embeddings (the DNN branch's input).

    Args:
        num_fields (int): F.
        dim (int): K.
        layer_sizes (Sequence[int]): C_l, the feature maps of every CIN layer.

    Example::

        CINInteraction(num_fields=3, dim=4, layer_sizes=(16, 16))(torch.randn(2, 3, 4)).shape  # (2, 32 + 12)
    """

    head = ExplicitPlusDNN

    def __init__(self, num_fields: int, dim: int, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        previous = [num_fields, *layer_sizes[:-1]]
        # layer l: weight (C_l, F * C_{l-1}), column i * C_{l-1} + j pairs field i of x0 with map j
        # of h (the reference's Conv1d(F * C_{l-1}, C_l, 1) and its init)
        self.layers: nn.ModuleList = nn.ModuleList(
            nn.Linear(num_fields * c_in, c_out) for c_in, c_out in zip(previous, layer_sizes)
        )
        self.num_fields: int = num_fields
        self.explicit_dim: int = sum(layer_sizes)
        self.output_dim: int = self.explicit_dim + num_fields * dim

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int, num_sets: int = 1) -> "CINInteraction":
        return cls(num_fields, dim, config.cin_layers)

    def cin(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, F, K) -> the CIN features (B, sum C_l)."""
        x0 = embeddings.transpose(1, 2)  # (B, K, F)
        h = x0  # (B, K, C)
        maps = []
        for layer in self.layers:
            weight = layer.weight.unflatten(1, (self.num_fields, -1)).flatten(0, 1)  # (C' * F, C), row o * F + i
            mixed = torch.matmul(h, weight.t()).unflatten(-1, (layer.out_features, self.num_fields))  # (B, K, C', F)
            h = torch.relu((mixed * x0.unsqueeze(2)).sum(dim=-1) + layer.bias)  # (B, K, C')
            maps.append(h)
        return torch.cat(maps, dim=-1).sum(dim=1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): (B, F, K).

        Returns:
            torch.Tensor: (B, sum C_l + F * K), ``[CIN features, flattened embeddings]``.
        """
        return torch.cat([self.cin(embeddings), embeddings.flatten(1)], dim=1)
