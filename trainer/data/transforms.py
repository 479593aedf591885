"""Value -> token transforms of the paper's feature recipe, shared by the
preprocessor, the synthetic generator and the serving export."""

from __future__ import annotations

import numpy as np

SMALL_MAX = 2  # v <= SMALL_MAX: token v + SMALL_SHIFT (<= 0); above: floor(ln(v)^2) (>= 1)
SMALL_SHIFT = -2
INTEGER_TOKEN_RULE = "v - 2 if v <= 2 else floor(ln(v)^2)"


def criteo_integer_token(values: np.ndarray) -> np.ndarray:
    """Criteo integer feature -> token: ``v - 2`` if ``v <= 2`` else ``floor(ln(v)^2)``.

    The authors' rule (thuml/Multi-Embedding, ``convert_numeric_feature``): small values
    map to tokens <= 0 and large ones to tokens >= 1 (``floor(ln(3)^2) = 1``), so no two
    ranges share a token.

    values: int64 (N,) without missing values -> int64 (N,) tokens.
    """
    values = np.asarray(values, dtype=np.int64)
    big = values > SMALL_MAX
    out = values + SMALL_SHIFT
    out[big] = np.floor(np.log(values[big].astype(np.float64)) ** 2).astype(np.int64)
    return out


def log_dense(values: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """Dense view of integer features for DLRM-style models: ``log1p(max(v, 0))``, missing -> 0.

    values: (N, D) int64; missing: (N, D) bool or None -> (N, D) float32.
    """
    out = np.log1p(np.maximum(np.asarray(values, dtype=np.float64), 0.0)).astype(np.float32)
    if missing is not None:
        out[missing] = 0.0
    return out
