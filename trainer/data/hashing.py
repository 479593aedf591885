"""Hash buckets: token bytes -> a stable id, vectorised, with no vocabulary in memory.

The hash of a token is a function of its bytes only (not of the chunk, the
file or the process), so every worker and every run agrees: the bytes are cut
into little-endian 8-byte words (the last one zero-padded), folded with
splitmix64 (``h = splitmix64(h ^ word)``, starting from the byte length), and the
bucket is ``h % buckets``; the id is ``MISSING_ID + 1 + bucket``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from trainer.data.schema import MISSING_ID
from trainer.data.splits import splitmix64


def hash_tokens(tokens: pa.Array) -> np.ndarray:
    """64-bit hash of each value of a binary array without nulls: uint64 (N,)."""
    tokens = tokens.cast(pa.binary())
    n = len(tokens)
    offsets = np.frombuffer(tokens.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * tokens.offset)
    lengths = np.diff(offsets).astype(np.int64)
    words = int((lengths.max() + 7) // 8) if n else 0
    data = np.frombuffer(tokens.buffers()[2] or pa.py_buffer(b""), dtype=np.uint8)[offsets[0] : offsets[-1]]
    padded = np.zeros((n, max(words, 1) * 8), dtype=np.uint8)  # row i: token i's bytes, then zeros
    row = np.repeat(np.arange(n), lengths)
    padded[row, np.arange(len(data)) - (offsets[:-1] - offsets[0]).astype(np.int64)[row]] = data
    folded = padded.view("<u8")
    own = (lengths + 7) // 8  # each token's own word count
    h = lengths.astype(np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words):
            h = np.where(j < own, splitmix64(h ^ folded[:, j]), h)
    return h


def bucket_ids(tokens: pa.Array, buckets: int) -> np.ndarray:
    """The id of each token of a binary array without nulls: int32 (N,) in ``[MISSING_ID + 1, MISSING_ID + 1 + buckets)``."""
    return (hash_tokens(tokens) % np.uint64(buckets)).astype(np.int32) + np.int32(MISSING_ID + 1)
