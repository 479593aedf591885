"""CTR models that scale with multi-embedding: configs, the sparse arch, interactions, the model."""

from trainer.model.config import EMBEDDING_MODES, PAPER_SCALES, EmbeddingConfig, ModelConfig
from trainer.model.ctr_model import MultiEmbeddingCTR
from trainer.model.heads import (
    BilinearFusion,
    BilinearFusionHead,
    ExplicitPlusDNN,
    ExplicitPlusDNNTail,
    ProjectedMLP,
    ProjectionBlock,
    SplitProjection,
    mlp_tail,
)
from trainer.model.interactions import (
    INTERACTIONS,
    AutoIntInteraction,
    CINInteraction,
    DCNv2Interaction,
    DNNInteraction,
    FinalMLPInteraction,
    IPNNInteraction,
    NFwFMInteraction,
)
from trainer.model.sparse_arch import MultiEmbeddingSparseArch, TableInfo, init_table_, table_name, table_seed

__all__ = [
    "EMBEDDING_MODES",
    "PAPER_SCALES",
    "EmbeddingConfig",
    "ModelConfig",
    "MultiEmbeddingCTR",
    "ProjectionBlock",
    "ProjectedMLP",
    "ExplicitPlusDNN",
    "ExplicitPlusDNNTail",
    "SplitProjection",
    "BilinearFusion",
    "BilinearFusionHead",
    "mlp_tail",
    "INTERACTIONS",
    "AutoIntInteraction",
    "CINInteraction",
    "DCNv2Interaction",
    "DNNInteraction",
    "FinalMLPInteraction",
    "IPNNInteraction",
    "NFwFMInteraction",
    "MultiEmbeddingSparseArch",
    "TableInfo",
    "table_name",
    "table_seed",
    "init_table_",
]
