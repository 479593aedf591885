"""Reproduce the paper's collapse findings and print the numbers.

1. Interaction-collapse toy (Section 4, Evidence II): a field trained against a fixed
   partner of rank r; its information abundance falls with r.
2. SE vs ME at 4x (DCNv2) on the synthetic default: the IA of a field's whole embedding
   (SE: its one 40-wide table; ME: its four 10-wide sets concatenated) relative to a
   random table of the same shape, per field, after the same training.

    python -m bench.bench_paper_findings [--rows 200000] [--epochs 1] [--latent-dim 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer.collapse.toy import interaction_collapse_toy
from trainer.data.synthetic import SyntheticConfig, generate
from bench.machine import describe

ROOT = Path(__file__).resolve().parents[1]


def toy() -> None:
    print("interaction-collapse toy: field E1 (100 x 10) trained against a fixed partner E2")
    print("  partner rank  partner IA  E1 IA at init  E1 IA trained")
    for rank in (1, 2, 3, 5, None):
        r = interaction_collapse_toy(rank)
        print(f"  {r.fixed_rank:>12}  {r.partner_ia:>10.2f}  {r.initial_ia:>13.2f}  {r.trained_ia:>13.2f}")


def se_vs_me(rows: int, epochs: int, latent_dim: int, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        generate(SyntheticConfig(rows=rows, cardinality_scale=0.01, latent_dim=latent_dim), data, fmt="parquet", progress=False)
        finals = {}
        for mode in ("se", "me"):
            run = f"{tmp}/{mode}"
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "trainer.main", "--config", "configs/synthetic_me.yaml", "--set",
                 f"data.path={data}", f"run.dir={run}", f"embedding.mode={mode}", "embedding.scale=4",
                 f"train.epochs={epochs}", "train.eval_every_steps=0", *overrides],
                cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            last = json.loads(Path(run, "collapse.jsonl").read_text().splitlines()[-1])
            summary = json.loads(Path(run, "summary.json").read_text())
            ratio = {f: (v["overall_ia_ratio"] if v["overall_ia_ratio"] is not None else v["set_ia_ratio"][0]) for f, v in last["fields"].items()}
            finals[mode] = (ratio, summary, time.perf_counter() - start)
        se, me = finals["se"][0], finals["me"][0]
        wins = sum(me[f] > se[f] for f in se)
        print(f"\nSE vs ME, DCNv2 4x, {rows:,} synthetic rows (latent dim {latent_dim}), {epochs} epoch(s){', ' + ' '.join(overrides) if overrides else ''}: IA of each field's whole embedding / random")
        print(f"  mean over fields: SE {np.mean(list(se.values())):.3f}   ME {np.mean(list(me.values())):.3f}   (ME higher on {wins}/{len(se)} fields)")
        print(f"  lowest field:     SE {min(se.values()):.3f}   ME {min(me.values()):.3f}")
        for mode, (_, summary, seconds) in finals.items():
            print(f"  {mode}: test AUC {summary['test_auc']:.4f} (oracle {summary['oracle_test_auc']:.4f}), "
                  f"{summary['train_examples_per_sec']:,.0f} examples/s, {seconds:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more trainer overrides for both runs, e.g. optim.embedding=adagrad")
    p.add_argument("--latent-dim", type=int, default=16, help="rank of the planted field interactions (the generator's default 16)")
    args = p.parse_args()
    print(f"machine: {describe()}")
    toy()
    se_vs_me(args.rows, args.epochs, args.latent_dim, args.set)


if __name__ == "__main__":
    main()
