"""CTR models that scale with multi-embedding: the sparse arch, interactions, heads, the model (configs: ``trainer.job_config``)."""

from trainer.model.ctr_model import MultiEmbeddingCTR, TrainModule
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
    "MultiEmbeddingCTR",
    "TrainModule",
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
