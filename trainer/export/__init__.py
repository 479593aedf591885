"""Serving export: a checkpoint -> a self-contained, verified ``torch.export`` artifact.

``python -m trainer.export`` writes it (``artifact.py``); ``runtime.py`` (copied into
the artifact as ``predictor.py``) loads and scores it with torch alone. The package
imports nothing, so the CLI's ``--help`` answers before torch is loaded.
"""

QUANTIZE_MODES = ("none", "int8")  # fp32 tables, or FBGEMM-style row-wise int8 tables
