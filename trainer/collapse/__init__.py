"""Embedding-collapse monitoring (the seed paper's information abundance and set diversity).

Everything about a field comes from one float64 Gram of its M sets side by side, built in
one streaming pass over row chunks (``gram``); the metrics are read off its blocks
(``metrics``). Three ways in:

- matrices you hold (tensors, arrays, memmaps)::

      from trainer.collapse import information_abundance, field_gram, analyze_field
      information_abundance(weight[:, :dim])
      fc = analyze_field(field_gram([set0, set1], dim=10, field="C1"))  # FieldCollapse

- a checkpoint, offline, one field at a time, no process group (``checkpoint_reader``)::

      report = analyze_checkpoint("runs/me4")          # CollapseReport
      report.summary()["mean_overall_ia_normalized"]; report.to_json()

- a live sharded job, collective over the ranks (``distributed``)::

      report = analyze_sharded_model(dmp, step=step, embedding={"mode": "me", "scale": 4, "base_dim": 10})
      # rank 0 gets the CollapseReport, the other ranks None

``python -m trainer.collapse --checkpoint RUN --output DIR`` writes collapse.json, PNG plots
and report.html (``report``).
"""

from trainer.collapse.checkpoint_reader import CheckpointTables, analyze_checkpoint, resolve_checkpoint
from trainer.collapse.distributed import (
    FieldSpec,
    TableWindow,
    analyze_sharded_model,
    analyze_windows,
    distributed_baselines,
    distributed_field_grams,
    windows_from_sharded_model,
)
from trainer.collapse.gram import FieldGram, GramAccumulator, field_gram, field_gram_from_chunks, random_gram
from trainer.collapse.metrics import (
    CollapseReport,
    FieldCollapse,
    SetPair,
    analyze_field,
    ia_of_singular_values,
    information_abundance,
    information_abundance_from_gram,
    principal_cosines,
    random_baseline_ia,
    set_diversity,
    set_pairs,
    singular_values,
    singular_values_from_gram,
)

__all__ = [
    "CheckpointTables",
    "CollapseReport",
    "FieldCollapse",
    "FieldGram",
    "FieldSpec",
    "GramAccumulator",
    "SetPair",
    "TableWindow",
    "analyze_checkpoint",
    "analyze_field",
    "analyze_sharded_model",
    "analyze_windows",
    "distributed_baselines",
    "distributed_field_grams",
    "field_gram",
    "field_gram_from_chunks",
    "ia_of_singular_values",
    "information_abundance",
    "information_abundance_from_gram",
    "principal_cosines",
    "random_baseline_ia",
    "random_gram",
    "resolve_checkpoint",
    "set_diversity",
    "set_pairs",
    "singular_values",
    "singular_values_from_gram",
    "windows_from_sharded_model",
]
