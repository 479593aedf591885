"""NFwFM: NFM with a field-weighted FM (FwFM) as its bi-interaction pooling.

Per set::

    pooled = sum_{(i, j) in P} w_ij * (e_i * e_j)        (B, K), elementwise products
    output = Dropout(BatchNorm1d(pooled))

with a learnable F x F field-pair weight ``W`` (standard-normal init, as the reference).
``model.nfwfm_pairs`` picks the pairs ``P``: ``"all"`` (default) every ordered pair
``(i, j)`` of the F x F grid, the squares ``w_ii e_i * e_i`` included, exactly as the
reference; ``"upper"`` only ``i < j``, one weight per unordered pair and no squares.
The paper's base dim for NFwFM is 50 (``embedding.base_dim: 50``).

Memory. The reference materialised ``B x K x F x F``; here the sum is
``sum_i e_i * (W_P E)_i`` with ``W_P`` the weight masked to ``P``, i.e. one ``(F, F) @ (B, F, K)``
matmul and a reduction over fields, so no intermediate exceeds ``B x F x K`` elements
(the size of the input itself). At SE 10x (K = 10 * 50 = 500) with F = 39 and B = 2048
that is 2048 * 39 * 500 = 39.9M floats = 159.7 MB (152 MiB) per intermediate, against
2048 * 500 * 39 * 39 = 1.56G floats = 6.2 GB for ``B x K x F x F``.
``tests/test_model_zoo.py`` checks that no op of forward or backward produces a tensor
larger than ``B x F x K``.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UserError
from trainer.job_config import ModelConfig
from trainer.model.heads import ProjectedMLP


def peak_intermediate_elements(batch: int, num_fields: int, dim: int) -> int:
    """The largest intermediate of ``NFwFMInteraction`` in elements: ``B * F * K``."""
    return batch * num_fields * dim


class NFwFMInteraction(nn.Module):
    """Field-weighted sum of the pairwise elementwise products, then BN and dropout.

    Args:
        num_fields (int): F, at least 2.
        dim (int): K, also the output width.
        dropout (float): dropout probability after the batch norm.
        pairs (str): ``"all"`` (F x F ordered pairs and the diagonal) or ``"upper"`` (i < j).

    Example::

        NFwFMInteraction(num_fields=3, dim=4, dropout=0.2)(torch.randn(2, 3, 4)).shape  # (2, 4)
    """

    head = ProjectedMLP

    def __init__(self, num_fields: int, dim: int, dropout: float, pairs: str = "all") -> None:
        super().__init__()
        if num_fields < 2:
            raise UserError("nfwfm needs at least 2 sparse fields (it weights field pairs)")
        self.output_dim: int = dim
        self.field_weights: nn.Parameter = nn.Parameter(torch.randn(num_fields, num_fields))
        # which (i, j) pairs count; bool, derived, not state (and not a float buffer that
        # the trainer would average across ranks)
        mask = torch.ones(num_fields, num_fields, dtype=torch.bool)
        self.register_buffer("pair_mask", mask if pairs == "all" else mask.triu(1), persistent=False)
        self.norm: nn.BatchNorm1d = nn.BatchNorm1d(dim)
        self.dropout: nn.Dropout = nn.Dropout(dropout)

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int, num_sets: int = 1) -> "NFwFMInteraction":
        return cls(num_fields, dim, config.dropout, config.nfwfm_pairs)

    def pooled(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``sum_{(i, j) in P} w_ij e_i * e_j``: (B, F, K) -> (B, K), peaking at B x F x K."""
        mixed = torch.matmul(self.field_weights * self.pair_mask, embeddings)  # (B, F, K): row i = sum_j w_ij e_j
        return (embeddings * mixed).sum(dim=1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): (B, F, K).

        Returns:
            torch.Tensor: (B, K).
        """
        return self.dropout(self.norm(self.pooled(embeddings)))
