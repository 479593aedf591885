"""Embedding-collapse monitoring (the seed paper's information abundance and set diversity).

Everything about a field comes from one float64 Gram of its M sets side by side, built in
one streaming pass over row chunks (``gram``); the metrics are read off its blocks
(``analysis``). Three ways in:

- matrices you hold (tensors, arrays, memmaps)::

      from trainer.collapse.analysis import analyze_field, information_abundance
      from trainer.collapse.gram import field_gram
      information_abundance(weight[:, :dim])
      fc = analyze_field(field_gram([set0, set1], dim=10, field="C1"))  # FieldCollapse

- a checkpoint, offline, one field at a time, no process group (``stored_tables``)::

      from trainer.collapse.stored_tables import analyze_checkpoint
      report = analyze_checkpoint("runs/me4")          # CollapseReport
      report.summary()["mean_overall_ia_normalized"]; report.to_json()

- a live sharded job, collective over the ranks (``sharded_tables``)::

      from trainer.collapse.sharded_tables import analyze_sharded_model
      report = analyze_sharded_model(dmp, step=step, embedding={"mode": "me", "scale": 4, "base_dim": 10})
      # rank 0 gets the CollapseReport, the other ranks None

``python -m trainer.collapse --checkpoint RUN --output DIR`` writes collapse.json, PNG plots
and report.html (``report``). The package itself imports nothing, so the CLI's ``--help``
answers before torch is loaded.
"""
