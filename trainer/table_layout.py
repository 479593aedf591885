"""Names and shapes of the embedding tables, and where they sit in a checkpoint.

The one place that spells them out (torch-free, so the offline collapse reader, the
sweep and the export can use it without building a model):

- **Shape.** At scale ``k`` with base dim ``K0`` (the paper's reference code,
  thuml/Multi-Embedding): single-embedding (``se``) has one set of dim ``k * K0``,
  multi-embedding (``me``) ``k`` independent sets of dim ``K0``: the same number of
  embedding parameters. At scale 1 the two are the same model.
- **Storage.** FBGEMM's kernels need table widths divisible by 4: a ``K``-wide table is
  stored ``storage_dim(K)`` wide and only its first ``K`` columns are used.
- **Names.** Table ``set{m}__{field}`` holds set ``m`` of ``field``.
- **State-dict keys.** The trainer checkpoints ``{"model": TrainModule(model).state_dict(),
  "optim": ...}``; a table's weight is ``model.model.sparse_arch.embedding_bag_collection
  .embedding_bags.<table>.weight`` there (``checkpoint_weight_key``).
"""

from __future__ import annotations

EMBEDDING_MODES = ("se", "me")
PAPER_SCALES = (1, 2, 3, 4, 10)
TABLE_NAME_FORMAT = "set<m>__<field>"  # for people: error messages and docs

# module paths, each with its trailing dot
SPARSE_ARCH_PREFIX = "sparse_arch."  # MultiEmbeddingCTR.sparse_arch
TRAIN_MODULE_PREFIX = "model."  # TrainModule.model
CHECKPOINT_MODEL_PREFIX = "model."  # the "model" entry of a checkpoint's state


def embedding_shape(mode: str, scale: int, base_dim: int) -> tuple[int, int]:
    """``(M sets, K dim)`` of an embedding config: ``(scale, base_dim)`` for ME,
    ``(1, scale * base_dim)`` for SE."""
    if mode not in EMBEDDING_MODES:
        raise ValueError(f"embedding mode {mode!r}: expected one of {list(EMBEDDING_MODES)}")
    return (scale, base_dim) if mode == "me" else (1, scale * base_dim)


def storage_dim(dim: int) -> int:
    """The stored width of a ``dim``-wide table: FBGEMM kernels need a multiple of 4."""
    return -(-dim // 4) * 4


def table_name(set_index: int, field: str) -> str:
    """The name of the table that holds embedding set ``set_index`` of ``field``."""
    return f"set{set_index}__{field}"


def table_weight_key(table: str, prefix: str = "") -> str:
    """The state-dict key of ``table``'s weight in a ``MultiEmbeddingSparseArch`` whose path
    in the model is ``prefix`` (with its trailing dot)."""
    return f"{prefix}embedding_bag_collection.embedding_bags.{table}.weight"


def model_weight_key(set_index: int, field: str) -> str:
    """The key of a table's weight in ``MultiEmbeddingCTR.state_dict()``."""
    return table_weight_key(table_name(set_index, field), SPARSE_ARCH_PREFIX)


def checkpoint_weight_key(set_index: int, field: str) -> str:
    """The key of a table's weight in a training checkpoint (DCP)."""
    return CHECKPOINT_MODEL_PREFIX + TRAIN_MODULE_PREFIX + model_weight_key(set_index, field)
