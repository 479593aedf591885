"""Streaming Gram matrices of embedding tables, in float64.

Every collapse metric of a field comes from one matrix: the Gram ``G = E^T E`` of the
field's M embedding sets concatenated side by side, ``E = [E_0 | E_1 | ... | E_{M-1}]``
(rows = ids, M*K columns). Its diagonal K x K blocks are the per-set Grams, the whole of
it is the Gram of the "overall" embedding, and its off-diagonal blocks give the principal
angles between sets (``trainer.collapse.analysis``).

``G`` is a sum over rows, so it is built in one pass over row chunks: no table has to fit
in memory, only a ``chunk_rows x M*K`` float64 buffer. The chunks can come from tensors,
numpy arrays or ``np.memmap`` files (anything sliceable by rows); the columns past ``dim``
(FBGEMM's padding columns, see ``trainer.model.sparse_arch``) are never read into the sum.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

DEFAULT_CHUNK_ROWS = 1 << 16


@dataclass
class FieldGram:
    """The Gram of one field's M sets concatenated: ``gram`` is (M*K, M*K) float64,
    set ``i`` occupies columns ``[i*K, (i+1)*K)``.

    A block that could not be formed (``cross_sets=False`` in a live job) is NaN; the
    metrics that need it are then reported as missing.
    """

    field: str
    rows: int
    num_sets: int
    dim: int
    gram: np.ndarray

    def block(self, i: int, j: int) -> np.ndarray:
        k = self.dim
        return self.gram[i * k : (i + 1) * k, j * k : (j + 1) * k]

    @property
    def has_cross_blocks(self) -> bool:
        return not bool(np.isnan(self.gram).any())


class GramAccumulator:
    """``G += X^T X`` over row chunks of a matrix given as horizontal pieces.

    Example::

        acc = GramAccumulator(num_cols=2 * 8)
        for start in range(0, rows, 4096):
            acc.add_pieces([set0[start:start + 4096, :8], set1[start:start + 4096, :8]])
        acc.gram  # (16, 16) float64 torch tensor

    Pieces are converted to float64 chunk by chunk (at most ``chunk_rows`` rows at a time),
    into one reused buffer, and the chunk's Gram is added with one GEMM.
    """

    def __init__(self, num_cols: int, chunk_rows: int = DEFAULT_CHUNK_ROWS, device: torch.device | str = "cpu"):
        if num_cols < 1 or chunk_rows < 1:
            raise ValueError(f"num_cols {num_cols} and chunk_rows {chunk_rows} must be positive")
        self.num_cols = num_cols
        self.chunk_rows = chunk_rows
        self.device = torch.device(device)
        self.gram = torch.zeros(num_cols, num_cols, dtype=torch.float64, device=self.device)
        self.rows = 0
        self._buffer: torch.Tensor | None = None

    def _chunk_buffer(self, rows: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(min(self.chunk_rows, max(rows, 1)), self.num_cols, dtype=torch.float64, device=self.device)
        return self._buffer

    def add(self, matrix: Any) -> None:
        """Add the rows of one (n, num_cols) matrix."""
        self.add_pieces([matrix])

    def add_pieces(self, pieces: Sequence[Any]) -> None:
        """Add the rows of ``[p_0 | p_1 | ...]``: pieces with the same number of rows whose
        widths add up to ``num_cols`` (torch tensors, numpy arrays or memmaps)."""
        widths = [int(p.shape[1]) for p in pieces]
        if sum(widths) != self.num_cols:
            raise ValueError(f"pieces {widths} are {sum(widths)} columns wide, expected {self.num_cols}")
        n = int(pieces[0].shape[0])
        if any(int(p.shape[0]) != n for p in pieces):
            raise ValueError(f"pieces of different heights: {[tuple(p.shape) for p in pieces]}")
        for start in range(0, n, self.chunk_rows):
            m = min(self.chunk_rows, n - start)
            buf = self._chunk_buffer(m)[:m]
            col = 0
            for p, w in zip(pieces, widths):
                _copy_into(buf[:, col : col + w], p[start : start + m])
                col += w
            self.gram.addmm_(buf.T, buf)
        self.rows += n

    def add_gram(self, gram: torch.Tensor | np.ndarray, rows: int = 0) -> None:
        """Add a Gram computed elsewhere (e.g. another rank's contribution)."""
        self.gram += torch.as_tensor(gram, dtype=torch.float64, device=self.device)
        self.rows += rows

    def numpy(self) -> np.ndarray:
        return self.gram.detach().cpu().numpy().copy()


def _copy_into(dst: torch.Tensor, src: Any) -> None:
    """Copy ``src`` (tensor, ndarray, memmap) into the float64 view ``dst``, converting."""
    if isinstance(src, torch.Tensor):
        dst.copy_(src.detach())
    elif dst.device.type == "cpu":
        # straight from the (possibly memory-mapped) array into the buffer: one read, one cast
        np.copyto(dst.numpy(), np.asarray(src), casting="unsafe")
    else:
        dst.copy_(torch.from_numpy(np.ascontiguousarray(src)))


def field_gram(
    tables: Sequence[Any],
    dim: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    field: str = "",
    device: torch.device | str = "cpu",
) -> FieldGram:
    """The Gram of one field's sets ``tables`` (each (rows, >= dim), sliceable by rows:
    tensors, arrays, memmaps), only their first ``dim`` columns (default: all), in one pass.

    Example::

        g = field_gram([set0_weight, set1_weight], dim=10)  # padding columns 10..11 excluded
        g.gram.shape  # (20, 20)
    """
    if not tables:
        raise ValueError("field_gram needs at least one table")
    rows = int(tables[0].shape[0])
    k = int(dim if dim is not None else tables[0].shape[1])
    for t in tables:
        if int(t.shape[0]) != rows or int(t.shape[1]) < k:
            raise ValueError(f"tables of shapes {[tuple(t.shape) for t in tables]} do not hold {rows} rows x {k} columns each")
    acc = GramAccumulator(len(tables) * k, chunk_rows, device)
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        acc.add_pieces([t[start:stop, :k] for t in tables])
    return FieldGram(field, rows, len(tables), k, acc.numpy())


def field_gram_from_chunks(
    chunks: Iterable[Sequence[Any]], num_sets: int, dim: int, chunk_rows: int = DEFAULT_CHUNK_ROWS, field: str = ""
) -> FieldGram:
    """The Gram of a field streamed as row bands: each item of ``chunks`` is the list of
    the M sets' pieces ``(n, >= dim)`` of the same rows (e.g. from a checkpoint reader)."""
    acc = GramAccumulator(num_sets * dim, chunk_rows)
    for pieces in chunks:
        if len(pieces) != num_sets:
            raise ValueError(f"a row band with {len(pieces)} pieces, expected {num_sets} sets")
        acc.add_pieces([p[:, :dim] for p in pieces])
    return FieldGram(field, acc.rows, num_sets, dim, acc.numpy())


# ---- the random baseline ----------------------------------------------------------------


BASELINE_BLOCK_ROWS = 1 << 16  # fixed: the baseline never depends on a caller's chunking


def random_block_seed(seed: int, rows: int, column: int, block: int) -> int:
    """The seed of rows ``[block * BASELINE_BLOCK_ROWS, ...)`` of column ``column`` of the
    ``rows``-row baseline table."""
    digest = hashlib.blake2b(f"collapse-baseline/{seed}/{rows}/{column}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_blocks(rows: int) -> int:
    """How many row blocks the ``rows``-row baseline table is drawn in."""
    return -(-rows // BASELINE_BLOCK_ROWS)


def random_table(rows: int, cols: int, seed: int = 0, blocks: Iterable[int] | None = None) -> Iterable[torch.Tensor]:
    """The baseline table's row blocks as (cols, n) float32 tensors (transposed): each
    column of each block drawn from its own seeded generator, ``U(-sqrt(1/rows),
    sqrt(1/rows))`` like the model's tables."""
    bound = math.sqrt(1.0 / rows)
    drawn = torch.empty(cols, min(rows, BASELINE_BLOCK_ROWS), dtype=torch.float32)
    for b in range(random_blocks(rows)) if blocks is None else blocks:
        n = min(BASELINE_BLOCK_ROWS, rows - b * BASELINE_BLOCK_ROWS)
        for j in range(cols):
            g = torch.Generator().manual_seed(random_block_seed(seed, rows, j, b))
            drawn[j, :n].uniform_(-bound, bound, generator=g)
        yield drawn[:, :n]


def random_gram_part(rows: int, cols: int, seed: int = 0, blocks: Iterable[int] | None = None) -> np.ndarray:
    """The Gram of some row blocks (default all) of the baseline table: ranks of a job can
    each draw a share of the blocks and sum the parts."""
    gram = torch.zeros(cols, cols, dtype=torch.float64)
    block = torch.empty(cols, min(rows, BASELINE_BLOCK_ROWS), dtype=torch.float64)
    for drawn in random_table(rows, cols, seed, blocks):
        n = drawn.shape[1]
        block[:, :n].copy_(drawn)  # one conversion per block (many small ones are slow)
        gram.addmm_(block[:, :n], block[:, :n].T)
    return gram.numpy()


_BASELINE_CACHE: "OrderedDict[tuple[int, int], np.ndarray]" = OrderedDict()
_BASELINE_CACHE_SIZE = 512
_BASELINE_LOCK = threading.Lock()


def cached_random_gram(rows: int, cols: int, seed: int = 0) -> np.ndarray | None:
    with _BASELINE_LOCK:
        cached = _BASELINE_CACHE.get((rows, seed))
        if cached is not None and cached.shape[0] >= cols:
            _BASELINE_CACHE.move_to_end((rows, seed))
            return cached[:cols, :cols].copy()
    return None


def store_random_gram(rows: int, seed: int, gram: np.ndarray) -> None:
    """Cache the baseline Gram of the ``rows``-row table (e.g. summed from ranks' parts)."""
    with _BASELINE_LOCK:
        key = (rows, seed)
        old = _BASELINE_CACHE.get(key)
        if old is None or old.shape[0] < gram.shape[0]:
            _BASELINE_CACHE[key] = np.array(gram, dtype=np.float64)
        _BASELINE_CACHE.move_to_end(key)
        while len(_BASELINE_CACHE) > _BASELINE_CACHE_SIZE:
            _BASELINE_CACHE.popitem(last=False)


def random_gram(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """The exact Gram of a seeded random-initialised ``rows x cols`` table, float64.

    The table is drawn as the model draws its embeddings, ``U(-sqrt(1/rows), sqrt(1/rows))``
    in float32, each (column, row block) from its own seed (``random_block_seed``), so a
    narrower table is exactly the leading columns of a wider one (the per-set baseline
    of a field is the leading K x K block of its overall baseline) and blocks can be drawn
    anywhere. Streamed in row blocks through a float64 GEMM, like the tables, and cached
    per ``(rows, seed)``: a later call for as many or fewer columns costs nothing.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"random_gram of a {rows} x {cols} table")
    cached = cached_random_gram(rows, cols, seed)
    if cached is not None:
        return cached
    gram = random_gram_part(rows, cols, seed)
    store_random_gram(rows, seed, gram)
    return gram.copy()


def clear_baseline_cache() -> None:
    with _BASELINE_LOCK:
        _BASELINE_CACHE.clear()
