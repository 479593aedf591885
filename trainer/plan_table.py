"""The sharding plan for people (``RUN/plan.txt``): where each set of each field lives
(``render_plan``), followed by TorchRec's planner estimates (``with_planner_stats``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torchrec.distributed.types import EnumerableShardingSpec, ShardingPlan

from trainer.errors import UserError
from trainer.model.sparse_arch import TableInfo


@dataclass(frozen=True)
class TablePlacement:
    """Where one (set, field) table lives: its sharding type and its shards (rank, size)."""

    set_index: int
    field: str
    table: str
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    shard_sizes: list[list[int]]


def plan_placements(plan: ShardingPlan, tables: Sequence[TableInfo], world_size: int) -> list[TablePlacement]:
    """One placement per table of ``tables``, in (set, field) order."""
    by_table = {name: ps for module_plan in plan.plan.values() for name, ps in module_plan.items()}
    placements = []
    for t in tables:
        if t.table not in by_table:
            raise UserError(f"the sharding plan has no entry for table {t.table}")
        ps = by_table[t.table]
        spec = ps.sharding_spec
        if isinstance(spec, EnumerableShardingSpec):
            ranks = [shard.placement.rank() for shard in spec.shards]
            sizes = [list(shard.shard_sizes) for shard in spec.shards]
        else:  # data_parallel: a full replica on every rank
            ranks = list(range(world_size))
            sizes = [[t.cardinality, t.storage_dim]] * world_size
        placements.append(
            TablePlacement(t.set_index, t.field, t.table, ps.sharding_type, ps.compute_kernel, ranks, sizes)
        )
    return placements


def render_plan(plan: ShardingPlan, tables: Sequence[TableInfo], world_size: int) -> str:
    """A text table: set, field, table, sharding type, ranks, shard sizes (rows x cols)."""
    header = ("set", "field", "table", "sharding", "kernel", "ranks", "shards (rows x cols)")
    rows = [header] + [
        (
            str(p.set_index),
            p.field,
            p.table,
            p.sharding_type,
            p.compute_kernel,
            ",".join(map(str, p.ranks)),
            " ".join(f"{r}x{c}" for r, c in p.shard_sizes),
        )
        for p in plan_placements(plan, tables, world_size)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


PLANNER_STATS_HEADING = "TorchRec planner estimates (torchrec.distributed.planner.stats.EmbeddingStats)"


def with_planner_stats(plan_text: str, stats_lines: Sequence[str]) -> str:
    """``plan_text`` (``render_plan``'s table) followed, after a blank line, by the stats table
    the planner logged (``trainer.sharding.capture_planner_stats``); unchanged without one."""
    if not stats_lines:
        return plan_text
    note = "(estimates; on CPU the tables live in DDR: the HBM column stays 0)"
    return f"{plan_text}\n{PLANNER_STATS_HEADING}\n{note}\n" + "\n".join(stats_lines) + "\n"
