"""The multi-embedding CTR model (the paper's Figure 7), with single-embedding as M = 1.

    features (KJT) -> MultiEmbeddingSparseArch -> (M, B, F, K)
      per set m: interaction_m -> projection_m                       (B, P)
    mean over the M sets                                             (B, P)
    shared tail                                                      (B, 1) -> (B,)

Every model of the zoo is this composition; the interaction (``model.name``) decides
the rest through its head (``trainer.model.heads``). For DNN, DCNv2, IPNN and NFwFM the
projection is ``Linear -> BN -> ReLU -> Dropout`` to H and the tail ``Linear(H, H) ->
BN -> ReLU -> Dropout -> Linear(H, 1)``: with one set exactly the reference's
single-embedding MLP (H-H-1) on the interaction output. xDeepFM and AutoInt average
their explicit features and their projected DNN branch and add the two logits; FinalMLP
averages its two towers' streams and fuses them bilinearly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.schema import SparseField
from trainer.job_config import EmbeddingConfig, ModelConfig
from trainer.model.global_batchnorm import use_global_batchnorm
from trainer.model.heads import ProjectionBlock
from trainer.model.interactions import INTERACTIONS
from trainer.model.sparse_arch import MultiEmbeddingSparseArch
from trainer.table_layout import SPARSE_ARCH_PREFIX

__all__ = ["MultiEmbeddingCTR", "ProjectionBlock", "TrainModule"]


class MultiEmbeddingCTR(nn.Module):
    """Per-set interactions and projections, mean fusion, shared post-processing.

    Args:
        sparse_arch (MultiEmbeddingSparseArch): the M embedding sets.
        interactions (Sequence[nn.Module]): one interaction per set, each mapping
            (B, F, K) -> (B, D).
        projections (Sequence[nn.Module]): one per set, (B, D) -> (B, P); the nonlinear
            per-set part that makes the sets differ.
        tail (nn.Module): shared, (B, P) -> (B, 1), applied to the mean over sets.

    Call ``from_config`` to build the paper's models.
    """

    def __init__(
        self,
        sparse_arch: MultiEmbeddingSparseArch,
        interactions: Sequence[nn.Module],
        projections: Sequence[nn.Module],
        tail: nn.Module,
    ) -> None:
        super().__init__()
        if not len(interactions) == len(projections) == sparse_arch.num_sets:
            raise ValueError(
                f"{len(interactions)} interactions and {len(projections)} projections "
                f"for {sparse_arch.num_sets} embedding sets"
            )
        self.sparse_arch: MultiEmbeddingSparseArch = sparse_arch
        self.interactions: nn.ModuleList = nn.ModuleList(interactions)
        self.projections: nn.ModuleList = nn.ModuleList(projections)
        self.tail: nn.Module = tail

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
        or ``.to()`` moves the dense layers. With ``config.sync_batchnorm`` every ``BatchNorm1d``
        is a ``GlobalBatchNorm1d`` (statistics over all ranks' rows; same state dict).
        """
        num_sets, dim = embedding.num_sets, embedding.dim
        interaction_cls = INTERACTIONS[config.name]
        head = interaction_cls.head
        with torch.random.fork_rng(devices=[]):
            sparse_arch = MultiEmbeddingSparseArch(
                fields, num_sets, dim, seed, device=table_device, data_type=embedding.data_type, init=embedding.init
            )
            torch.manual_seed(seed)
            # drawn in this order: every interaction, every projection, then the tail
            interactions = [interaction_cls.from_config(config, len(fields), dim, num_sets) for _ in range(num_sets)]
            projections = [head.projection(interaction, config) for interaction in interactions]
            model = cls(sparse_arch, interactions, projections, head.tail(interactions[0], config))
        return use_global_batchnorm(model) if config.sync_batchnorm else model

    def embedding_weight_keys(self) -> dict[tuple[int, str], str]:
        """(set, field) -> the state-dict key of that table's weight (the same key in the
        unsharded model, the ``DistributedModelParallel`` and DCP checkpoints)."""
        return self.sparse_arch.weight_keys(prefix=SPARSE_ARCH_PREFIX)

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
        # unbind: the backward writes every set's gradient in one stack (a per-set ``embeddings[m]``
        # would zero-fill the whole (M, B, F, K) gradient once per set); indexed by set, not
        # iterated, so that torch.fx (TrainPipelineSparseDist) can trace it
        sets = embeddings.unbind(0)
        fused = torch.stack(
            [
                projection(interaction(sets[m]))
                for m, (interaction, projection) in enumerate(zip(self.interactions, self.projections))
            ]
        ).mean(dim=0)  # (B, P)
        return self.tail(fused).squeeze(-1)


class TrainModule(nn.Module):
    """The CTR model with its loss, in the shape TorchRec's train pipeline wants:
    ``Batch -> (loss (), (loss (), logits (B,), labels (B,)))``. Checkpoints hold its state
    dict (the model under ``model.``: ``trainer.table_layout.TRAIN_MODULE_PREFIX``)."""

    def __init__(self, model: MultiEmbeddingCTR) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.sparse_features)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
