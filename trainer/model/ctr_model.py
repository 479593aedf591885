"""The multi-embedding CTR model (the paper's Figure 7), with single-embedding as M = 1.

    features (KJT) -> MultiEmbeddingSparseArch -> (M, B, F, K)
      per set m: interaction_m -> projection_m (Linear -> BN -> ReLU -> Dropout)  (B, H)
    mean over the M sets                                                        (B, H)
    shared tail: Linear(H -> H) -> BN -> ReLU -> Dropout -> Linear(H -> 1)       (B,)

With one set this is exactly the reference's single-embedding MLP (H-H-1) on the
interaction output.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.schema import SparseField
from trainer.model.config import EmbeddingConfig, ModelConfig
from trainer.model.interactions import INTERACTIONS
from trainer.model.sparse_arch import MultiEmbeddingSparseArch


class ProjectionBlock(nn.Module):
    """``Linear -> BatchNorm1d -> ReLU -> Dropout``.

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
            nn.ReLU(),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): (B, in_features).

        Returns:
            torch.Tensor: (B, out_features).
        """
        return self.layers(x)


class MultiEmbeddingCTR(nn.Module):
    """Per-set interactions and projections, mean fusion, shared post-processing.

    Args:
        sparse_arch (MultiEmbeddingSparseArch): the M embedding sets.
        interactions (Sequence[nn.Module]): one interaction per set, each mapping
            (B, F, K) -> (B, output_dim).
        hidden (int): H, the width of the projections and of the tail.
        dropout (float): dropout probability of every block.

    Call ``from_config`` to build the paper's models.
    """

    def __init__(
        self,
        sparse_arch: MultiEmbeddingSparseArch,
        interactions: Sequence[nn.Module],
        hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if len(interactions) != sparse_arch.num_sets:
            raise ValueError(f"{len(interactions)} interactions for {sparse_arch.num_sets} embedding sets")
        self.sparse_arch: MultiEmbeddingSparseArch = sparse_arch
        self.interactions: nn.ModuleList = nn.ModuleList(interactions)
        self.projections: nn.ModuleList = nn.ModuleList(
            ProjectionBlock(interaction.output_dim, hidden, dropout) for interaction in interactions
        )
        self.tail: nn.Sequential = nn.Sequential(ProjectionBlock(hidden, hidden, dropout), nn.Linear(hidden, 1))

    @classmethod
    def from_config(
        cls,
        fields: Sequence[SparseField],
        config: ModelConfig,
        embedding: EmbeddingConfig,
        seed: int,
        table_device: torch.device | None = None,
    ) -> "MultiEmbeddingCTR":
        """Build the model of ``config`` with the embedding sets of ``embedding`` over ``fields``, every weight drawn from ``seed``:
        tables per (seed, set, field), dense layers on CPU from a forked torch RNG seeded
        with ``seed`` (the caller's RNG is untouched, and the init is the same whatever
        device the model moves to).

        ``table_device`` (default CPU) holds the tables: pass ``torch.device("meta")`` for
        a model that is about to be sharded, so that no rank allocates whole tables
        (``trainer.sharding.shard_model`` draws each shard). ``DistributedModelParallel``
        or ``.to()`` moves the dense layers.
        """
        num_sets, dim = embedding.num_sets, embedding.dim
        interaction_cls = INTERACTIONS[config.name]
        with torch.random.fork_rng(devices=[]):
            sparse_arch = MultiEmbeddingSparseArch(fields, num_sets, dim, seed, device=table_device)
            torch.manual_seed(seed)
            return cls(
                sparse_arch=sparse_arch,
                interactions=[interaction_cls.from_config(config, len(fields), dim) for _ in range(num_sets)],
                hidden=config.hidden,
                dropout=config.dropout,
            )

    def embedding_weight_keys(self) -> dict[tuple[int, str], str]:
        """(set, field) -> the state-dict key of that table's weight (the same key in the
        unsharded model, the ``DistributedModelParallel`` and DCP checkpoints)."""
        return self.sparse_arch.weight_keys(prefix="sparse_arch.")

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            features (KeyedJaggedTensor): keys = the field names, one id per field per row.

        Returns:
            torch.Tensor: logits, (B,).
        """
        return self.forward_embeddings(self.sparse_arch(features))

    def forward_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Everything after the lookup: the dense part that runs data-parallel, and the part
        a serving export traces (``torch.export``, dynamic batch).

        Args:
            embeddings (torch.Tensor): (M, B, F, K), the M sets' field embeddings.

        Returns:
            torch.Tensor: logits, (B,).
        """
        # indexed by set, not iterated, so that torch.fx (TrainPipelineSparseDist) can trace it
        fused = torch.stack(
            [
                projection(interaction(embeddings[m]))
                for m, (interaction, projection) in enumerate(zip(self.interactions, self.projections))
            ]
        ).mean(dim=0)  # (B, H)
        return self.tail(fused).squeeze(-1)
