"""Reproduce the paper's collapse findings over seeds and settings; print every cell.

1. Interaction-collapse toy (Section 4, Evidence II, Figure 4): three fields learned
   jointly, the third with 3 ids (fewer than the dim 10) or 100; the IA of field 1 after the
   paper's 5000 full-batch SGD steps, per seed, and on how many seeds the 3-id partner
   left it lower. Beside it, field 1's IA / random (the ratio the collapse alert reads),
   and that of the bounded variant the alert tests push (``fixed_partner_toy``: field 1
   against a fixed partner of rank 1 or full rank, not learned).
2. SE vs ME at 4x (DCNv2; Figures 8b and 10a): per field, the IA of its whole embedding
   (SE: its one 40-wide table; ME: its four 10-wide sets concatenated) relative to a random
   table of the same shape, and the diversity of its sets (SE: its 40 columns cut into 4
   groups of 10, as the paper compares them), after the same training. One setting per
   recipe x planted latent dim x seed (the seed of the data and of the training); "large"
   fields are fixed before any run: at least ``LARGE_IDS_PER_WIDTH`` x the SE width (400)
   distinct training ids. Caveat: SE's column-group diversity depends on the basis: a
   rotation of SE's 40 columns changes it, though it leaves the table's span and IA as
   they are (and a model whose first layer is linear in the embedding, as DNN's, absorbs
   it exactly); ME's is between its separate tables, which a rotation within a set keeps.

    python -m bench.bench_paper_findings [--rows 30000] [--seeds 0 1 2] [--latent-dims 16 64]
                                         [--recipes industrial paper] [--per-field]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description
from trainer.job_config import RECIPES

# torch, pyarrow and the trainer's data and run modules are imported where they are used:
# --help answers without them

ROOT = Path(__file__).resolve().parents[1]
SCALE, BASE_DIM = 4, 10  # DCNv2 4x: SE one 40-wide set, ME four 10-wide sets
LARGE_IDS_PER_WIDTH = 10  # "large": at least 10 x the SE width distinct training ids (fixed up front)
TOY_PARTNER_ROWS = (3, 100)  # field 3's cardinality: below the dim 10, and as many as field 1


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
    def large(self) -> bool:
        return self.train_ids >= LARGE_IDS_PER_WIDTH * SCALE * BASE_DIM


@dataclass(frozen=True)
class RunOutcome:
    test_auc: float
    oracle_test_auc: float
    examples_per_sec: float
    seconds: float


@dataclass(frozen=True)
class Setting:
    """One SE-vs-ME comparison: its recipe, planted latent dim and seed, and the fields."""

    recipe: str
    latent_dim: int
    seed: int
    fields: list[FieldComparison]
    outcomes: dict[str, RunOutcome]

    def group(self, large_only: bool) -> list[FieldComparison]:
        return [f for f in self.fields if f.large or not large_only]

    def me_above(self, metric: str, large_only: bool) -> bool:
        """ME's mean ``metric`` (``ia_ratio`` or ``diversity``) over the group above SE's."""
        g = self.group(large_only)
        return _mean([getattr(f, f"me_{metric}") for f in g]) > _mean([getattr(f, f"se_{metric}") for f in g])


def recipe_overrides(recipe: str) -> list[str]:
    """``--set`` overrides selecting ``recipe`` over configs/synthetic_me.yaml: the recipe's
    presets given explicitly, since an explicit key (the config's optimizer, batch) wins."""

    def scalar(v: object) -> str:
        return f"{v:e}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)

    return [f"recipe={recipe}", *(f"{k}={scalar(v)}" for k, v in RECIPES[recipe].items())]


def distinct_train_ids(data: str | Path) -> dict[str, int]:
    """Field -> distinct ids in the prepared dataset's training split."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from trainer.data.schema import read_schema

    schema = read_schema(str(data))
    files = [f"{data}/{name}" for name in schema.splits["train"].files]
    table = ds.dataset(files, format="parquet").to_table(columns=schema.field_names)
    return {f: pc.count_distinct(table.column(f)).as_py() for f in schema.field_names}


def train_se_and_me(
    data: str | Path, workdir: str | Path, epochs: int = 1, overrides: list[str] = (), threads: int = 0
) -> tuple[list[FieldComparison], dict[str, RunOutcome]]:
    """Train DCNv2 SE and ME at 4x on the prepared dataset ``data`` (one process each, with
    ``threads`` torch threads, 0: torch's default) and compare their final collapse records
    field by field."""
    from trainer.run_dir import RunDir

    finals, outcomes = {}, {}
    for mode in ("se", "me"):
        run = Path(workdir, mode)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.main", "--config", "configs/synthetic_me.yaml", "--set",
             f"data.path={data}", f"run.dir={run}", f"embedding.mode={mode}", f"embedding.scale={SCALE}",
             f"embedding.base_dim={BASE_DIM}", f"train.epochs={epochs}", "train.eval_every_steps=0", *overrides],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None,
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


def run_setting(
    rows: int, epochs: int, recipe: str, latent_dim: int, seed: int, overrides: list[str], threads: int
) -> Setting:
    """Generate the synthetic data of (``latent_dim``, ``seed``) and train SE and ME on it."""
    from trainer.data.synthetic import SyntheticConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        config = SyntheticConfig(rows=rows, seed=seed, cardinality_scale=0.01, latent_dim=latent_dim)
        generate(config, data, fmt="parquet", progress=False)
        fields, outcomes = train_se_and_me(
            data, tmp, epochs, [*recipe_overrides(recipe), f"train.seed={seed}", *overrides], threads
        )
    return Setting(recipe, latent_dim, seed, fields, outcomes)


def toy(seeds: list[int]) -> None:
    from trainer.collapse.analysis import analyze_field
    from trainer.collapse.gram import field_gram
    from trainer.collapse.toy import PAPER_STEPS, fixed_partner_toy, interaction_collapse_toy

    def ratio(table) -> float:  # IA / IA of a random table of the same shape
        return analyze_field(field_gram([table.numpy()], field="1")).set_ia_normalized[0]

    print(f"interaction-collapse toy: fields 1 and 2 (100 ids), field 3 ({' or '.join(map(str, TOY_PARTNER_ROWS))} ids), "
          f"dim 10, learned jointly, {PAPER_STEPS} full-batch SGD steps at lr 1")  # fmt: skip
    print("  seed  field 1 IA: at init  end (lowest on the way) with field 3 of 3 ids  of 100 ids"
          "   field 3 IA: 3 ids  100 ids   field 1 IA / random: 3 ids  100 ids   fixed partner: rank 1  full rank")
    lower = 0
    for seed in seeds:
        small, full = (interaction_collapse_toy(n, seed=seed) for n in TOY_PARTNER_ROWS)
        fixed = [fixed_partner_toy(rank, seed=seed) for rank in (1, 10)]
        lower += small.trained_ia < full.trained_ia
        low = [min(ia for _, ia in r.curve) for r in (small, full)]
        print(f"  {seed:>4}  {small.initial_ia:>18.2f}  {small.trained_ia:>33.2f} ({low[0]:.2f})  "
              f"{full.trained_ia:>5.2f} ({low[1]:.2f})  {small.partner_ia:>17.2f}  {full.partner_ia:>7.2f}  "
              f"{ratio(small.trained):>25.2f}  {ratio(full.trained):>7.2f}  "
              f"{ratio(fixed[0].trained):>21.2f}  {ratio(fixed[1].trained):>9.2f}")  # fmt: skip
    print(f"  field 1's IA lower with the 3-id partner on {lower} of {len(seeds)} seeds")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def print_setting(s: Setting, per_field: bool) -> None:
    """One line: IA / random (mean over large fields, then all), ME > SE counts, diversity, AUC."""
    large, every = s.group(True), s.group(False)
    cells = []
    for g in (large, every):
        cells.append(f"{_mean([f.se_ia_ratio for f in g]):.3f} {_mean([f.me_ia_ratio for f in g]):.3f} "
                     f"{sum(f.me_ia_ratio > f.se_ia_ratio for f in g):>2}/{len(g):<2}")  # fmt: skip
    div = (f"{_mean([f.se_diversity for f in large]):.3f} {_mean([f.me_diversity for f in large]):.3f} "
           f"{sum(f.me_diversity > f.se_diversity for f in large):>2}/{len(large):<2}")  # fmt: skip
    auc = " ".join(f"{s.outcomes[m].test_auc:.4f}" for m in ("se", "me"))
    secs = sum(o.seconds for o in s.outcomes.values())
    print(f"  {s.recipe:>10} {s.latent_dim:>6} {s.seed:>4}   {cells[0]}   {cells[1]}   {div}   {auc}  {secs:>4.0f}s",
          flush=True)  # fmt: skip
    if per_field:
        for f in sorted(s.fields, key=lambda f: -f.train_ids):
            print(f"      {f.field:>5} {f.train_ids:>7,} ids{' (large)' if f.large else '        '}  IA/random "
                  f"SE {f.se_ia_ratio:.3f} ME {f.me_ia_ratio:.3f}  diversity SE {f.se_diversity:.3f} "
                  f"ME {f.me_diversity:.3f}")  # fmt: skip


def print_summary(settings: list[Setting]) -> None:
    def count(test) -> str:
        return f"{sum(map(test, settings))} of {len(settings)} settings"

    every_large = count(lambda s: all(f.me_ia_ratio > f.se_ia_ratio for f in s.group(True)))
    print(f"  ME above SE (mean IA / random over large fields) on {count(lambda s: s.me_above('ia_ratio', True))}")
    print(f"  ME above SE on every large field on {every_large}")
    print(f"  ME above SE (mean IA / random over all fields) on {count(lambda s: s.me_above('ia_ratio', False))}")
    print(f"  ME's sets more diverse than SE's column groups (mean over large fields) on "
          f"{count(lambda s: s.me_above('diversity', True))}")  # fmt: skip
    print(f"  ME's test AUC above SE's on {count(lambda s: s.outcomes['me'].test_auc > s.outcomes['se'].test_auc)}")


def se_vs_me(args: argparse.Namespace) -> list[Setting]:
    width = SCALE * BASE_DIM
    print(f"\nSE vs ME, DCNv2 {SCALE}x, {args.rows:,} synthetic rows per setting, {args.epochs} epoch(s)"
          f"{', ' + ' '.join(args.set) if args.set else ''}; large = >= {LARGE_IDS_PER_WIDTH * width} distinct training ids "
          f"({LARGE_IDS_PER_WIDTH} x the SE width {width})")  # fmt: skip
    print("                               IA/random, large fields  IA/random, all fields  diversity, large   test AUC")
    print("      recipe latent seed        SE    ME ME>SE          SE    ME ME>SE        SE    ME ME>SE      SE     ME")
    settings = []
    for recipe in args.recipes:  # industrial first: the paper recipe's settings come after
        for latent_dim in args.latent_dims:
            for seed in args.seeds:
                settings.append(run_setting(args.rows, args.epochs, recipe, latent_dim, seed, args.set, args.threads))
                print_setting(settings[-1], args.per_field)
    print_summary(settings)
    return settings


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--rows", type=int, default=30_000, help="synthetic rows per setting (split 8:1:1)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the data and the training")
    p.add_argument("--latent-dims", nargs="+", type=int, default=[16, 64], help="ranks of the planted field interactions")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more trainer overrides for every run")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (OMP_NUM_THREADS; 0: torch's default)")
    p.add_argument("--toy-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--only", choices=["toy", "se-me"], help="run one of the two studies")
    p.add_argument("--per-field", action="store_true", help="also print every field of every setting")
    args = p.parse_args()
    print(f"machine: {describe()}")
    if args.only != "se-me":
        toy(args.toy_seeds)
    if args.only != "toy":
        se_vs_me(args)


if __name__ == "__main__":
    main()
