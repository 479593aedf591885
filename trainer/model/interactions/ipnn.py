"""IPNN: the inner products of every field pair.

As in the paper's reference code, single-embedding IPNN feeds ``[flattened embeddings,
all F(F-1)/2 pairwise inner products]`` to its MLP, while each set of multi-embedding
IPNN feeds only its inner products to its projection. With one set (SE at any scale, and
ME at scale 1, which is the same model) the embeddings are included. Unlike the
reference, SE at scale k uses its ``k * base_dim`` embeddings (the reference's SE-IPNN
configs all silently used dim 10).

The products are read off the Gram matrix ``E E^T`` (B x F x F), never from a
B x pairs x K tensor of elementwise products.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UserError
from trainer.job_config import ModelConfig
from trainer.model.heads import ProjectedMLP


class IPNNInteraction(nn.Module):
    """Pairwise inner products ``<e_i, e_j>`` for ``i < j``, optionally after the flattened embeddings.

    Args:
        num_fields (int): F (at least 2 without ``include_embeddings``).
        dim (int): K.
        include_embeddings (bool): prepend the flattened ``F * K`` embeddings.

    Example::

        IPNNInteraction(num_fields=3, dim=4, include_embeddings=True)(torch.randn(2, 3, 4)).shape  # (2, 15)
    """

    head = ProjectedMLP

    def __init__(self, num_fields: int, dim: int, include_embeddings: bool) -> None:
        super().__init__()
        self.include_embeddings: bool = include_embeddings
        self.num_pairs: int = num_fields * (num_fields - 1) // 2
        self.output_dim: int = self.num_pairs + (num_fields * dim if include_embeddings else 0)
        if self.output_dim == 0:
            raise UserError("ipnn with several embedding sets needs at least 2 sparse fields (it uses field pairs only)")
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        # positions of the (i < j) pairs in the flattened F x F Gram matrix; derived, not state
        self.register_buffer("pair_index", rows * num_fields + cols, persistent=False)

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int, num_sets: int = 1) -> "IPNNInteraction":
        return cls(num_fields, dim, include_embeddings=num_sets == 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): (B, F, K).

        Returns:
            torch.Tensor: (B, [F * K +] F(F-1)/2), pairs in row-major ``i < j`` order.
        """
        gram = torch.bmm(embeddings, embeddings.transpose(1, 2)).flatten(1)  # (B, F * F)
        products = gram.index_select(1, self.pair_index)
        if self.include_embeddings:
            return torch.cat([embeddings.flatten(1), products], dim=1)
        return products
