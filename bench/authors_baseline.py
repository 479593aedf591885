"""A plain-PyTorch DCNv2 / DNN trained the way the paper's authors train it (the baseline of ``bench_train``).

Written from the description of thuml/Multi-Embedding (``torchfm``), not copied from it:

- one ``nn.Embedding(sum(cardinalities), K)`` per embedding set over the concatenated
  vocabulary, fields told apart by per-field row offsets, Xavier-uniform over the whole table;
- per set: the interaction (DCNv2: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``, full-rank
  ``W_l``; DNN: the flattened embeddings), then ``Linear -> BN -> ReLU -> Dropout`` to H;
- mean over the sets, then ``Linear(H, H) -> BN -> ReLU -> Dropout -> Linear(H, 1)``;
- one dense ``torch.optim.Adam`` (lr 1e-3, coupled L2 weight decay 1e-6) over every
  parameter, tables included, so every embedding row moves every step.

The model matches ``trainer``'s (same shapes, same FLOPs); only the embedding storage and
optimizer differ, which is the point of the comparison.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CrossNet(nn.Module):
    """Full-rank cross layers over (B, D): ``x <- x0 * (x @ W_l^T + b_l) + x``."""

    def __init__(self, width: int, num_layers: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(nn.init.xavier_uniform_(torch.empty(width, width))) for _ in range(num_layers))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(width)) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weights, self.biases):
            x = x0 * (x @ w.t() + b) + x
        return x


def _block(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU(), nn.Dropout(dropout))


class AuthorsModel(nn.Module):
    """M embedding sets of dim K over F fields -> per-set interaction and projection -> mean -> tail.

    Args:
        cardinalities (Sequence[int]): the F fields' vocabulary sizes.
        num_sets (int): M.
        dim (int): K.
        model (str): ``dcnv2`` or ``dnn``.
        hidden (int): H.
        dropout (float): dropout of every block.
        cross_layers (int): DCNv2's depth.
    """

    def __init__(self, cardinalities: Sequence[int], num_sets: int, dim: int, model: str = "dcnv2",
                 hidden: int = 400, dropout: float = 0.2, cross_layers: int = 4) -> None:  # fmt: skip
        super().__init__()
        if model not in ("dcnv2", "dnn"):
            raise ValueError(f"model {model!r}: expected dcnv2 or dnn")
        offsets = torch.tensor([0, *cardinalities[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        width = len(cardinalities) * dim
        self.embeddings = nn.ModuleList(nn.Embedding(sum(cardinalities), dim) for _ in range(num_sets))
        for table in self.embeddings:
            nn.init.xavier_uniform_(table.weight)
        self.interactions = nn.ModuleList(
            CrossNet(width, cross_layers) if model == "dcnv2" else nn.Identity() for _ in range(num_sets)
        )
        self.projections = nn.ModuleList(_block(width, hidden, dropout) for _ in range(num_sets))
        self.tail = nn.Sequential(_block(hidden, hidden, dropout), nn.Linear(hidden, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, F) field-local ids -> (B,) logits."""
        rows = ids + self.offsets
        per_set = [
            projection(interaction(table(rows).flatten(1)))
            for table, interaction, projection in zip(self.embeddings, self.interactions, self.projections)
        ]
        return self.tail(torch.stack(per_set).mean(0)).squeeze(-1)


def authors_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Dense Adam over every parameter: lr 1e-3, weight decay 1e-6 (the paper's recipe)."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)


def train_step(model: AuthorsModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One step on (B, F) ids and (B,) 0/1 labels; returns the loss (detached)."""
    optimizer.zero_grad()
    loss = F.binary_cross_entropy_with_logits(model(ids), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()
