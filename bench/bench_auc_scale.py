"""Test AUC against the embedding scale, SE beside ME, over seeds (the paper's Figure 1).

The paper's headline: as the embedding size grows (scale k = 1, 2, 4, 10), a single
embedding (SE, one set of dim k*10) stalls or loses AUC while multi-embedding (ME, k sets
of dim 10) gains. This trains every (model, mode, scale, seed) cell on one synthetic
dataset (the generator's seed 0; ``--seeds`` are the trainer's ``train.seed``: the
initialization, data order and dropout) and prints the mean and std of test AUC per
(model, mode, scale), with ME - SE paired by seed. At 1x SE and ME are the same model: it
is trained once and starts both lines. The figure ``auc_vs_scale.png`` (error bars: std
over seeds) is written into the study directory. Every cell is trained by default;
``--skip`` leaves some out (DCNv2 SE 10x is the slow one: its cross net is 3900 x 3900 per
layer).

Every finished cell is a JSON file in ``OUT/cells/``, so a stopped study resumes where it
left off (the study's settings are in ``OUT/study.json``; a different setting is refused,
a different ``--skip`` is not: run again without it to add the skipped cells),
and ``--results OUT`` re-prints the table and re-draws the figure without training.

    python -m bench.bench_auc_scale --out runs/auc_scale [--rows 200000] [--epochs 1] [--models dcnv2 dnn] [--threads 1]
    python -m bench.bench_auc_scale --results runs/auc_scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description
from trainer.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
FIGURE = "auc_vs_scale.png"
MODES = ("se", "me")


@dataclass(frozen=True)
class Study:
    """What every cell of one study shares (``OUT/study.json``)."""

    rows: int  # generated rows, split 8:1:1
    epochs: int
    models: tuple[str, ...]
    scales: tuple[int, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # more trainer --set overrides, for every cell
    skip: tuple[str, ...] = ()  # (model, mode, scale) not trained, as "dcnv2:se:10"

    def cells(self) -> list[tuple[str, str, int, int]]:
        """(model, mode, scale, seed) in training order: seed by seed, so a study cut short
        has whole seeds; 1x once, as ``se``."""
        return [
            (model, mode, scale, seed)
            for seed in self.seeds
            for model in self.models
            for scale in self.scales
            for mode in (("se",) if scale == 1 else MODES)
            if f"{model}:{mode}:{scale}" not in self.skip
        ]


@dataclass(frozen=True)
class Cell:
    """One finished training run."""

    model: str
    mode: str
    scale: int
    seed: int
    test_auc: float
    oracle_test_auc: float
    train_examples: int
    train_seconds: float
    seconds: float  # wall time of the process


def cell_name(model: str, mode: str, scale: int, seed: int) -> str:
    return f"{model}-{mode}{scale}x-seed{seed}"


def load_study(out: Path) -> Study:
    path = out / "study.json"
    if not path.exists():
        raise UserError(f"{out} holds no study (no study.json): run python -m bench.bench_auc_scale --out {out}")
    raw = json.loads(path.read_text())
    return Study(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def load_cells(out: Path) -> list[Cell]:
    return [Cell(**json.loads(p.read_text())) for p in sorted((out / "cells").glob("*.json"))]


def write_json(path: Path, record: dict) -> None:
    """Written under a temporary name, then renamed: a cell file is whole or absent."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def train_cell(study: Study, data: Path, out: Path, threads: int, model: str, mode: str, scale: int, seed: int) -> Cell:
    """Train one cell in its own process (``threads`` torch threads, 0: torch's default);
    its run directory is removed after (the cell JSON keeps what the table needs)."""
    from trainer.run_dir import RunDir

    run = out / "runs" / cell_name(model, mode, scale, seed)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", "--config", "configs/synthetic_me.yaml", "--set",
         f"data.path={data}", f"run.dir={run}", f"model.name={model}", f"embedding.mode={mode}",
         f"embedding.scale={scale}", f"train.seed={seed}", f"train.epochs={study.epochs}",
         "train.eval_every_steps=0", *study.overrides],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{cell_name(model, mode, scale, seed)} failed:\n{proc.stderr[-3000:]}")
    summary = RunDir(str(run)).read_summary()
    cell = Cell(model, mode, scale, seed, summary["test_auc"], summary["oracle_test_auc"], summary["train_examples"],
                summary["train_seconds"], time.perf_counter() - start)  # fmt: skip
    write_json(out / "cells" / f"{cell_name(model, mode, scale, seed)}.json", asdict(cell))
    shutil.rmtree(run)
    return cell


def run_study(study: Study, out: Path, threads: int) -> None:
    """Generate the data once, then train every cell not already in ``OUT/cells/``."""
    from trainer.data.synthetic import SyntheticConfig, generate

    out.mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(exist_ok=True)
    if (out / "study.json").exists() and replace(load_study(out), skip=study.skip) != study:
        raise UserError(f"{out}/study.json holds another study ({load_study(out)}); use another --out")
    write_json(out / "study.json", asdict(study))  # a resumed study may skip fewer (or more) cells
    data = out / "data"
    if not data.exists():
        generate(SyntheticConfig(rows=study.rows, cardinality_scale=0.01), str(data), fmt="parquet", progress=False)
    done = {(c.model, c.mode, c.scale, c.seed) for c in load_cells(out)}
    todo = [c for c in study.cells() if c not in done]
    print(f"{len(done)} cell(s) already done, {len(todo)} to train", flush=True)
    for i, key in enumerate(todo, 1):
        cell = train_cell(study, data, out, threads, *key)
        print(f"  [{i}/{len(todo)}] {cell_name(*key)}: test AUC {cell.test_auc:.5f}, "
              f"{cell.train_examples / cell.train_seconds:,.0f} examples/s, {cell.seconds:.0f}s", flush=True)  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def auc_by_seed(cells: list[Cell], model: str, mode: str, scale: int) -> dict[int, float]:
    """Seed -> test AUC of one (model, mode, scale); 1x is the one run for both modes."""
    return {c.seed: c.test_auc for c in cells if (c.model, c.scale) == (model, scale) and (scale == 1 or c.mode == mode)}


@dataclass(frozen=True)
class Line:
    """One (model, scale) of the table: (mean, std) of SE's and ME's test AUC over their
    seeds (None: no cell), and ME - SE paired by seed (None at 1x or with no pair)."""

    model: str
    scale: int
    se: tuple[float, float] | None
    me: tuple[float, float] | None
    diff: tuple[float, float] | None
    me_above: int  # seeds where ME's AUC > SE's
    pairs: int


def summarize(study: Study, cells: list[Cell]) -> list[Line]:
    lines = []
    for model in study.models:
        for scale in study.scales:
            se, me = (auc_by_seed(cells, model, mode, scale) for mode in MODES)
            paired = sorted(set(se) & set(me)) if scale > 1 else []
            lines.append(Line(
                model, scale, mean_std(list(se.values())) if se else None, mean_std(list(me.values())) if me else None,
                mean_std([me[s] - se[s] for s in paired]) if paired else None, sum(me[s] > se[s] for s in paired), len(paired),
            ))  # fmt: skip
    return lines


def print_table(study: Study, cells: list[Cell]) -> None:
    """Mean and std of test AUC per (model, mode, scale), ME - SE paired by seed."""
    print(f"test AUC (mean +- std over seeds), {study.rows:,} synthetic rows (8:1:1), {study.epochs} epoch(s), "
          f"seeds {list(study.seeds)}{', ' + ' '.join(study.overrides) if study.overrides else ''}")  # fmt: skip
    print(f"  {'model':<7} {'scale':>5}  {'SE':>17}  {'ME':>17}  {'ME - SE (paired)':>20}  ME above SE")

    def cell(v: tuple[float, float] | None, skipped: bool) -> str:
        return f"{v[0]:.5f} +- {v[1]:.5f}" if v else "(skipped)" if skipped else "-"

    for line in summarize(study, cells):
        skipped = [f"{line.model}:{mode}:{line.scale}" in study.skip for mode in MODES]
        diff = "(same model)" if line.scale == 1 else f"{line.diff[0]:+.5f} +- {line.diff[1]:.5f}" if line.diff else "-"
        wins = f"{line.me_above}/{line.pairs}" if line.pairs else ""
        print(f"  {line.model:<7} {line.scale:>4}x  {cell(line.se, skipped[0]):>17}  {cell(line.me, skipped[1]):>17}  "
              f"{diff:>20}  {wins}")  # fmt: skip
    oracle = {c.oracle_test_auc for c in cells}
    if oracle:
        print(f"  oracle test AUC (the planted model): {max(oracle):.5f}")
    missing = len(study.cells()) - len(cells)
    if missing:
        print(f"  {missing} of {len(study.cells())} cell(s) not run yet")
    seconds = sum(c.seconds for c in cells)
    print(f"  {len(cells)} cell(s), {seconds / 60:.0f} min of training processes in all")


def plot(study: Study, cells: list[Cell], path: Path) -> None:
    """``auc_vs_scale.png``: one panel per model, SE and ME lines with std error bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(study.models), 4), layout="constrained")
    for ax, model in zip(fig.subplots(1, len(study.models), squeeze=False)[0], study.models):
        for mode, color in zip(MODES, ("tab:orange", "tab:blue")):
            points = [(k, *mean_std(list(v.values()))) for k in study.scales if (v := auc_by_seed(cells, model, mode, k))]
            if points:
                k, m, s = zip(*points)
                ax.errorbar(k, m, yerr=s, label=mode.upper(), color=color, marker="o", capsize=4)
        ax.set_xscale("log")
        ax.set_xticks(study.scales, [f"{k}x" for k in study.scales])
        ax.minorticks_off()
        ax.set_xlabel("embedding scale")
        ax.set_ylabel(f"test AUC (mean +- std, {len(study.seeds)} seeds)")
        ax.set_title(f"{model}, {study.rows:,} synthetic rows, {study.epochs} epoch(s)")
        ax.legend()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/auc_scale", help="the study directory: data, cells/, study.json, the figure")
    p.add_argument("--results", metavar="OUT", help="only re-print the table and re-draw the figure of the study in OUT")
    p.add_argument("--rows", type=int, default=200_000, help="synthetic rows (split 8:1:1)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["dcnv2"])
    p.add_argument("--scales", nargs="+", type=int, default=[1, 2, 4, 10])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more trainer overrides for every cell")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per cell (OMP_NUM_THREADS; 0: torch's default); 1 is faster on a crowded machine")
    p.add_argument("--skip", nargs="*", default=[], metavar="MODEL:MODE:SCALE",
                   help="cells not to train (none by default); DCNv2 SE 10x is the slow one: its cross net is "
                        "3900 x 3900 per layer, 530-570 examples/s on one thread (ME 10x: 2k)")
    args = p.parse_args(argv)
    if args.results:
        out = Path(args.results)
        study = load_study(out)
    else:
        out = Path(args.out)
        if args.rows < 1000 or args.epochs < 1 or min(args.scales) < 1:
            raise UserError("--rows must be >= 1000, --epochs and --scales >= 1")
        study = Study(args.rows, args.epochs, tuple(args.models), tuple(sorted(set(args.scales))),
                      tuple(args.seeds), tuple(args.set), tuple(args.skip))  # fmt: skip
        print(f"machine: {describe()}")
        t = time.perf_counter()
        run_study(study, out, args.threads)
        print(f"trained in {time.perf_counter() - t:.0f}s")
    cells = load_cells(out)
    print_table(study, cells)
    plot(study, cells, out / FIGURE)
    print(f"figure: {out / FIGURE}")


if __name__ == "__main__":
    run_cli(main)
