"""Serving export: a checkpoint -> a self-contained, verified ``torch.export`` artifact.

``python -m trainer.export`` writes it (``artifact.py``); ``runtime.py`` (copied into
the artifact as ``predictor.py``) loads and scores it with torch alone.
"""
