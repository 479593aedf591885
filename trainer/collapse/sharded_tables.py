"""Collapse metrics of a live, sharded job: every rank's pieces in, every field's Gram out.

Each rank holds rectangular windows of some tables (``TableWindow``: a (set, field)
table's rows ``[r0, r1)`` x columns ``[c0, c1)``): a whole table (table-wise, or a
data-parallel replica on every rank), a row slice (row-wise), a column slice
(column-wise). A field's Gram ``G = E^T E`` of its M sets concatenated is a sum over
rows, so any rank that holds *all* M*K columns of some rows adds their Gram locally, and
only the (M*K)^2 Grams are summed over ranks (one ``all_reduce`` for all fields).

Rows whose columns are spread over ranks — a column-sharded table, or (for the
cross-set blocks that diversity and the overall IA need) sets of one field placed on
different ranks — cannot be summed that way: ``G``'s cross blocks need the same rows'
other columns. For those row bands, one owner rank (the one holding most of the band's
columns) receives the other ranks' column pieces, chunk by chunk (``chunk_rows`` rows at
a time, point-to-point), assembles complete rows and adds their Gram. So memory stays
bounded by a chunk, the Grams are exact, and table data moves only where the sharding
split a row's columns; ``cross_sets=False`` skips the cross-set blocks (no data moves
for table-wise placements; only per-set IA is then reported).

Replicas (identical windows on several ranks) count once (the lowest rank's); windows
must otherwise tile every table exactly (checked, ValueError naming the table). Columns
past ``dim`` (the storage padding) are dropped before anything is sent.

Tested on gloo (CPU). With NCCL the Grams and the pieces travel as CUDA tensors on the
current device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from trainer.collapse.analysis import DEFAULT_RTOL, CollapseReport, analyze_field
from trainer.collapse.gram import (
    DEFAULT_CHUNK_ROWS,
    FieldGram,
    GramAccumulator,
    cached_random_gram,
    random_blocks,
    random_gram_part,
    store_random_gram,
)
from trainer.model.sparse_arch import find_sparse_arch
from trainer.sharding import local_table_windows
from trainer.table_layout import table_name


@dataclass(frozen=True)
class FieldSpec:
    """A field's tables: ``num_sets`` tables of ``rows`` x ``dim`` used columns."""

    name: str
    rows: int
    num_sets: int
    dim: int


@dataclass(frozen=True)
class TableWindow:
    """This rank's piece of table (``set_index``, ``field``): ``tensor`` holds the table's
    rows ``[row_offset, row_offset + n)`` and columns ``[col_offset, col_offset + c)``
    (storage columns: any past the field's ``dim`` are ignored)."""

    set_index: int
    field: str
    row_offset: int
    col_offset: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class _Piece:
    rank: int
    index: int  # position in that rank's window list
    set_index: int
    r0: int
    r1: int
    c0: int
    c1: int


def _comm_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def distributed_field_grams(
    windows: Iterable[TableWindow],
    fields: Sequence[FieldSpec],
    group: Any = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    cross_sets: bool = True,
) -> dict[str, FieldGram]:
    """Every field's Gram from the ranks' windows; every rank of ``group`` must call this
    with its own windows (possibly none) and the same ``fields``. Returns the same Grams on
    every rank. Without ``cross_sets`` the cross-set blocks are NaN."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = _comm_device(group)
    specs = {f.name: f for f in fields}
    local: list[torch.Tensor] = []
    meta: list[tuple[str, int, int, int, int, int, str]] = []
    for w in windows:
        spec = specs.get(w.field)
        if spec is None:
            continue
        n, c = int(w.tensor.shape[0]), int(w.tensor.shape[1])
        c1 = min(w.col_offset + c, spec.dim)
        if n == 0 or c1 <= w.col_offset:
            continue  # a padding-only or empty piece
        local.append(w.tensor[:, : c1 - w.col_offset])
        meta.append((w.field, w.set_index, w.row_offset, w.row_offset + n, w.col_offset, c1, str(w.tensor.dtype)))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, meta, group=group)
    wire_dtype = torch.float64 if any("float64" in m[6] for ms in gathered for m in ms) else torch.float32

    by_table: dict[tuple[str, int], list[_Piece]] = {}
    for r, ms in enumerate(gathered):
        for i, (name, s, r0, r1, c0, c1, _) in enumerate(ms):
            by_table.setdefault((name, s), []).append(_Piece(r, i, s, r0, r1, c0, c1))
    for f in fields:
        for s in range(f.num_sets):
            by_table[(f.name, s)] = _dedupe_and_check(by_table.get((f.name, s), []), f, s)

    results: dict[str, tuple[FieldSpec, list[list[int]], list[GramAccumulator]]] = {}
    for f in fields:
        groups = [list(range(f.num_sets))] if cross_sets else [[s] for s in range(f.num_sets)]
        accs = []
        for sets in groups:
            acc = GramAccumulator(len(sets) * f.dim, chunk_rows, device)
            pieces = [p for s in sets for p in by_table[(f.name, s)]]
            _accumulate_group(acc, pieces, sets, f.dim, rank, local, device, wire_dtype, chunk_rows, group)
            accs.append(acc)
        results[f.name] = (f, groups, accs)

    flat = torch.cat([a.gram.reshape(-1) for _, _, accs in results.values() for a in accs]) if results else None
    if flat is not None and flat.numel():
        dist.all_reduce(flat, group=group)
    grams: dict[str, FieldGram] = {}
    offset = 0
    for name, (f, groups, accs) in results.items():
        k = f.dim
        full = np.full((f.num_sets * k, f.num_sets * k), np.nan)
        for sets, acc in zip(groups, accs):
            w = len(sets) * k
            block = flat[offset : offset + w * w].reshape(w, w).cpu().numpy()
            offset += w * w
            cols = np.concatenate([np.arange(s * k, (s + 1) * k) for s in sets])
            full[np.ix_(cols, cols)] = block
        grams[name] = FieldGram(name, f.rows, f.num_sets, k, full)
    return grams


def _dedupe_and_check(pieces: list[_Piece], f: FieldSpec, s: int) -> list[_Piece]:
    """Drop replicas (keep the lowest rank's), then require an exact tiling of rows x dim."""
    seen: set[tuple[int, int, int, int]] = set()
    kept = []
    for p in sorted(pieces, key=lambda p: (p.rank, p.index)):
        rect = (p.r0, p.r1, p.c0, p.c1)
        if rect in seen:
            continue
        seen.add(rect)
        kept.append(p)
    where = f"table {table_name(s, f.name)} ({f.rows} x {f.dim})"
    for p in kept:
        if p.r0 < 0 or p.r1 > f.rows or p.c0 < 0:
            raise ValueError(f"{where}: a window rows [{p.r0}, {p.r1}) cols [{p.c0}, {p.c1}) lies outside it")
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            p, q = kept[a], kept[b]
            if p.r0 < q.r1 and q.r0 < p.r1 and p.c0 < q.c1 and q.c0 < p.c1:
                raise ValueError(f"{where}: windows of ranks {p.rank} and {q.rank} overlap without being replicas")
    area = sum((p.r1 - p.r0) * (p.c1 - p.c0) for p in kept)
    if area != f.rows * f.dim:
        raise ValueError(f"{where}: the ranks' windows cover {area} of its {f.rows * f.dim} cells")
    return kept


def _accumulate_group(
    acc: GramAccumulator,
    pieces: list[_Piece],
    sets: list[int],
    dim: int,
    rank: int,
    local: list[torch.Tensor],
    device: torch.device,
    wire_dtype: torch.dtype,
    chunk_rows: int,
    group: Any,
) -> None:
    """Add this rank's share of the Gram of one column group (``sets`` side by side).

    Every rank walks the same row bands in the same order, so the point-to-point transfers
    of a band happen while all its holders are at it (no deadlock)."""
    base = {s: i * dim for i, s in enumerate(sets)}
    cuts = sorted({p.r0 for p in pieces} | {p.r1 for p in pieces})
    for a, b in zip(cuts, cuts[1:]):
        band = sorted((p for p in pieces if p.r0 <= a and p.r1 >= b), key=lambda p: (base[p.set_index] + p.c0))
        if not band:
            continue
        cols_of: dict[int, int] = {}
        for p in band:
            cols_of[p.rank] = cols_of.get(p.rank, 0) + p.c1 - p.c0
        owner = min(cols_of, key=lambda r: (-cols_of[r], r))
        if rank not in cols_of:
            continue
        mine = [p for p in band if p.rank == rank]
        if len(cols_of) == 1:  # one rank holds every column of these rows: no transfer
            for s0 in range(a, b, chunk_rows):
                s1 = min(b, s0 + chunk_rows)
                acc.add_pieces([local[p.index][s0 - p.r0 : s1 - p.r0] for p in mine])
            continue
        for s0 in range(a, b, chunk_rows):
            s1 = min(b, s0 + chunk_rows)
            if rank != owner:
                payload = torch.cat([local[p.index][s0 - p.r0 : s1 - p.r0] for p in mine], dim=1)
                dist.isend(payload.to(device=device, dtype=wire_dtype).contiguous(), group_dst=owner, group=group).wait()
                continue
            received: dict[int, torch.Tensor] = {}
            requests = []
            for r in sorted(cols_of):
                if r != rank:
                    received[r] = torch.empty(s1 - s0, cols_of[r], dtype=wire_dtype, device=device)
                    requests.append(dist.irecv(received[r], group_src=r, group=group))
            for req in requests:
                req.wait()
            parts, used = [], {r: 0 for r in received}
            for p in band:  # in column order: local slices and the senders' columns, in their order
                width = p.c1 - p.c0
                if p.rank == rank:
                    parts.append(local[p.index][s0 - p.r0 : s1 - p.r0])
                else:
                    parts.append(received[p.rank][:, used[p.rank] : used[p.rank] + width])
                    used[p.rank] += width
            acc.add_pieces(parts)


def distributed_baselines(fields: Sequence[FieldSpec], seed: int = 0, group: Any = None) -> None:
    """Fill every rank's random-baseline cache for the fields' shapes (collective): the
    ranks draw interleaved row blocks of each missing baseline table and sum their Grams,
    so a first analysis costs each rank 1/world of the baselines (later ones nothing)."""
    shapes = sorted({(f.rows, f.num_sets * f.dim) for f in fields})
    missing = [s for s in shapes if cached_random_gram(s[0], s[1], seed) is None]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, missing, group=group)
    need = sorted({tuple(s) for ms in gathered for s in ms})
    if not need:
        return
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    parts = [
        torch.from_numpy(random_gram_part(rows, cols, seed, range(rank, random_blocks(rows), world))).reshape(-1)
        for rows, cols in need
    ]
    flat = torch.cat(parts).to(_comm_device(group))
    dist.all_reduce(flat, group=group)
    flat = flat.cpu()
    offset = 0
    for rows, cols in need:
        store_random_gram(rows, seed, flat[offset : offset + cols * cols].reshape(cols, cols).numpy())
        offset += cols * cols


# ---- a TorchRec model -------------------------------------------------------------------


def windows_from_sharded_model(sharded: Any) -> tuple[list[TableWindow], list[FieldSpec]]:
    """This rank's pieces of every table of a ``DistributedModelParallel`` built by
    ``trainer.sharding.shard_model`` (views of the live weights), and the fields."""
    arch = find_sparse_arch(sharded.module)[1]
    windows = [TableWindow(t.set_index, t.field, row, col, w.detach()) for t, w, row, col in local_table_windows(sharded)]
    fields = [FieldSpec(name, _cardinality(arch, name), arch.num_sets, arch.dim) for name in arch.field_names]
    return windows, fields


def _cardinality(arch: Any, field: str) -> int:
    return next(t.cardinality for t in arch.tables if t.field == field)


def analyze_windows(
    windows: Iterable[TableWindow],
    fields: Sequence[FieldSpec],
    group: Any = None,
    dst: int | None = 0,
    label: str = "live",
    step: int | None = None,
    column_groups: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    cross_sets: bool = True,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
) -> CollapseReport | None:
    """The ``CollapseReport`` of a live job: collective (every rank calls it). The metrics
    are computed on rank ``dst`` of ``group`` (None: on every rank); other ranks get None.
    ``column_groups``: split single-set fields into that many column groups for diversity
    (the embedding scale of an SE model)."""
    grams = distributed_field_grams(windows, fields, group, chunk_rows, cross_sets)
    distributed_baselines(fields, seed, group)
    if dst is not None and dist.get_rank(group) != dst:
        return None
    results = [analyze_field(grams[f.name], seed=seed, column_groups=column_groups, rtol=rtol) for f in fields]
    num_sets = fields[0].num_sets if fields else 0
    dim = fields[0].dim if fields else 0
    return CollapseReport(
        source="live", label=label, fields=results, num_sets=num_sets, dim=dim, step=step,
        world_size=dist.get_world_size(group),
    )


def analyze_sharded_model(
    sharded: Any,
    group: Any = None,
    dst: int | None = 0,
    step: int | None = None,
    label: str = "live",
    embedding: dict[str, Any] | None = None,
    **kwargs: Any,
) -> CollapseReport | None:
    """``analyze_windows`` on a ``DistributedModelParallel`` (collective). ``embedding``:
    the ``{"mode", "scale", "base_dim"}`` it was built from, to split an SE model's tables
    into ``scale`` column groups for diversity."""
    windows, fields = windows_from_sharded_model(sharded)
    column_groups = None
    if embedding and embedding.get("mode") == "se" and int(embedding.get("scale", 1)) > 1:
        column_groups = int(embedding["scale"])
    with torch.no_grad():
        report = analyze_windows(windows, fields, group, dst, label, step, column_groups, **kwargs)
    if report is not None and embedding:
        report.embedding = dict(embedding)
    return report


__all__ = [
    "FieldSpec",
    "TableWindow",
    "distributed_baselines",
    "distributed_field_grams",
    "analyze_windows",
    "analyze_sharded_model",
    "windows_from_sharded_model",
]
