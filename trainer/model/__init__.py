"""CTR models that scale with multi-embedding: configs, the sparse arch, interactions, the model."""

from trainer.model.config import EMBEDDING_MODES, PAPER_SCALES, EmbeddingConfig, ModelConfig
from trainer.model.ctr_model import MultiEmbeddingCTR, ProjectionBlock
from trainer.model.interactions import INTERACTIONS, DCNv2Interaction, DNNInteraction
from trainer.model.sparse_arch import MultiEmbeddingSparseArch, TableInfo, init_table_, table_name, table_seed

__all__ = [
    "EMBEDDING_MODES",
    "PAPER_SCALES",
    "EmbeddingConfig",
    "ModelConfig",
    "MultiEmbeddingCTR",
    "ProjectionBlock",
    "INTERACTIONS",
    "DCNv2Interaction",
    "DNNInteraction",
    "MultiEmbeddingSparseArch",
    "TableInfo",
    "table_name",
    "table_seed",
    "init_table_",
]
