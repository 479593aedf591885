"""Reproduce the paper's collapse findings and print the numbers.

1. Interaction-collapse toy (Section 4, Evidence II): a field trained against a fixed
   partner of rank r; its information abundance falls with r.
2. SE vs ME at 4x (DCNv2) on the synthetic default (Figures 8b and 10a): per field, the
   IA of its whole embedding (SE: its one 40-wide table; ME: its four 10-wide sets
   concatenated) relative to a random table of the same shape, and the diversity of its
   sets (SE: its 40 columns cut into 4 groups of 10, as the paper compares them), after
   the same training. Fields are grouped by how many distinct ids the training split
   holds: the paper finds ME's gain largest on fields with large cardinality.

    python -m bench.bench_paper_findings [--rows 200000] [--epochs 1] [--latent-dim 16] [--per-field]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description
from trainer.collapse.toy import interaction_collapse_toy
from trainer.data.schema import read_schema
from trainer.data.synthetic import SyntheticConfig, generate
from trainer.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
LARGE_FIELD_IDS = 1000  # a field with at least this many distinct training ids is "large"
SMALL_FIELD_IDS = 50  # below this many it is "small": its table has barely more rows than the SE width


@dataclass(frozen=True)
class FieldComparison:
    """One field after the SE and the ME run. IA ratios: IA / IA of a random table of the
    same shape; diversities: 1 - mean cosine of the principal angles between set pairs."""

    field: str
    train_ids: int  # distinct ids of the field in the training split
    se_ia_ratio: float
    me_ia_ratio: float  # of the four sets concatenated (the paper's "overall" embedding)
    se_diversity: float  # SE's columns in 4 groups
    me_diversity: float

    @property
    def size(self) -> str:
        return "large" if self.train_ids >= LARGE_FIELD_IDS else "small" if self.train_ids < SMALL_FIELD_IDS else "medium"


@dataclass(frozen=True)
class RunOutcome:
    test_auc: float
    oracle_test_auc: float
    examples_per_sec: float
    seconds: float


def distinct_train_ids(data: str | Path) -> dict[str, int]:
    """Field -> distinct ids in the prepared dataset's training split."""
    schema = read_schema(str(data))
    files = [f"{data}/{name}" for name in schema.splits["train"].files]
    table = ds.dataset(files, format="parquet").to_table(columns=schema.field_names)
    return {f: pc.count_distinct(table.column(f)).as_py() for f in schema.field_names}


def train_se_and_me(
    data: str | Path, workdir: str | Path, epochs: int = 1, scale: int = 4, overrides: list[str] = ()
) -> tuple[list[FieldComparison], dict[str, RunOutcome]]:
    """Train DCNv2 SE and ME at ``scale`` on the prepared dataset ``data`` (fixed seed, one
    process each) and compare their final collapse records field by field."""
    finals, outcomes = {}, {}
    for mode in ("se", "me"):
        run = Path(workdir, mode)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.main", "--config", "configs/synthetic_me.yaml", "--set",
             f"data.path={data}", f"run.dir={run}", f"embedding.mode={mode}", f"embedding.scale={scale}",
             f"train.epochs={epochs}", "train.eval_every_steps=0", *overrides],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"the {mode} run failed:\n{proc.stderr[-3000:]}")
        run_dir = RunDir(str(run))
        summary = run_dir.read_summary()
        finals[mode] = run_dir.read_collapse_record(summary["best_step"])["fields"]  # the tested checkpoint's
        outcomes[mode] = RunOutcome(
            summary["test_auc"], summary["oracle_test_auc"], summary["train_examples_per_sec"], time.perf_counter() - start
        )
    ids = distinct_train_ids(data)
    se, me = finals["se"], finals["me"]
    fields = [
        FieldComparison(
            field=f,
            train_ids=ids[f],
            se_ia_ratio=se[f]["set_ia_ratio"][0],  # SE has one set: its whole embedding
            me_ia_ratio=me[f]["overall_ia_ratio"],
            se_diversity=se[f]["diversity"],
            me_diversity=me[f]["diversity"],
        )
        for f in se
    ]
    return fields, outcomes


def toy() -> None:
    print("interaction-collapse toy: field E1 (100 x 10) trained against a fixed partner E2")
    print("  partner rank  partner IA  E1 IA at init  E1 IA trained")
    for rank in (1, 2, 3, 5, None):
        r = interaction_collapse_toy(rank)
        print(f"  {r.fixed_rank:>12}  {r.partner_ia:>10.2f}  {r.initial_ia:>13.2f}  {r.trained_ia:>13.2f}")


def print_comparison(fields: list[FieldComparison], per_field: bool) -> None:
    print("  fields by distinct training ids    IA/random SE   ME   ME higher   diversity SE   ME   ME higher")
    groups = {
        "large": f">= {LARGE_FIELD_IDS}",
        "medium": f"{SMALL_FIELD_IDS}..{LARGE_FIELD_IDS - 1}",
        "small": f"< {SMALL_FIELD_IDS}",
        "all": "all",
    }
    for size, label in groups.items():
        g = [f for f in fields if size in ("all", f.size)]
        if not g:
            continue
        ia_wins = sum(f.me_ia_ratio > f.se_ia_ratio for f in g)
        div_wins = sum(f.me_diversity > f.se_diversity for f in g)
        print(
            f"  {size:>6} ({label:>9} ids, {len(g):>2} fields)   {np.mean([f.se_ia_ratio for f in g]):.3f}  "
            f"{np.mean([f.me_ia_ratio for f in g]):.3f}  {ia_wins:>5}/{len(g):<2}      {np.mean([f.se_diversity for f in g]):.3f}  "
            f"{np.mean([f.me_diversity for f in g]):.3f}  {div_wins:>5}/{len(g)}"
        )
    if per_field:
        print("  field  train ids  IA/random SE     ME   diversity SE     ME")
        for f in sorted(fields, key=lambda f: -f.train_ids):
            print(f"  {f.field:>5}  {f.train_ids:>9,}  {f.se_ia_ratio:>12.3f}  {f.me_ia_ratio:.3f}  {f.se_diversity:>12.3f}  {f.me_diversity:.3f}")


def se_vs_me(rows: int, epochs: int, latent_dim: int, overrides: list[str], per_field: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        generate(SyntheticConfig(rows=rows, cardinality_scale=0.01, latent_dim=latent_dim), data, fmt="parquet", progress=False)
        fields, outcomes = train_se_and_me(data, tmp, epochs=epochs, overrides=overrides)
    extra = f", {' '.join(overrides)}" if overrides else ""
    print(f"\nSE vs ME, DCNv2 4x, {rows:,} synthetic rows (latent dim {latent_dim}), {epochs} epoch(s){extra}")
    print_comparison(fields, per_field)
    for mode, o in outcomes.items():
        print(f"  {mode}: test AUC {o.test_auc:.4f} (oracle {o.oracle_test_auc:.4f}), {o.examples_per_sec:,.0f} examples/s, {o.seconds:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more trainer overrides for both runs, e.g. optim.embedding=adagrad")
    p.add_argument("--latent-dim", type=int, default=16, help="rank of the planted field interactions (the generator's default 16)")
    p.add_argument("--per-field", action="store_true", help="print every field, not only the groups")
    args = p.parse_args()
    print(f"machine: {describe()}")
    toy()
    se_vs_me(args.rows, args.epochs, args.latent_dim, args.set, args.per_field)


if __name__ == "__main__":
    main()
