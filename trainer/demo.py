"""``make demo``: the main job end to end on the embedded synthetic default.

1. synthetic Criteo-format TSV with a planted interaction model (its oracle AUC known);
2. preprocess it with the paper's recipe into parquet splits;
3. train DCNv2 with multi-embedding on 2 ranks through torchx (``dist.ddp``, gloo);
4. print the summary (test AUC beside the oracle's) and where everything is.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from trainer.data.preprocess import PreprocessConfig, preprocess
from trainer.data.synthetic import SyntheticConfig, generate
from trainer.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=800_000, help="synthetic rows (default 800,000)")
    p.add_argument("--run-dir", default="runs/demo", help="where everything is written (replaced each run)")
    p.add_argument("--config", default="configs/synthetic_me.yaml", help="training config")
    p.add_argument("--nproc", type=int, default=2, help="training ranks (torchx -j 1xN)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs (1 keeps the demo within minutes on 2 CPU cores)")
    args = p.parse_args(argv)
    run_dir = (ROOT / args.run_dir).resolve()
    raw, dataset, train_dir = run_dir / "synthetic.tsv", run_dir / "dataset", run_dir / "train"

    print(f"[1/3] synthetic data: {args.rows:,} Criteo-format rows with a planted interaction model", flush=True)
    report = generate(SyntheticConfig(rows=args.rows, cardinality_scale=0.01), str(raw), fmt="criteo-tsv", overwrite=True)
    oracle = report["oracle"]["test"]
    print(f"      CTR {report['ctr']:.3f}; oracle on the test split: AUC {oracle['auc']:.4f}, logloss {oracle['logloss']:.4f}")

    print("[2/3] preprocess: integer tokens, min-count 10, 8/1/1 split, vocabularies from train only", flush=True)
    schema = preprocess(PreprocessConfig(dataset="criteo", input=str(raw), output=str(dataset), overwrite=True))
    cards = [f.cardinality for f in schema.sparse_fields]
    print(
        f"      {len(cards)} sparse fields (cardinality {min(cards)}..{max(cards)}); "
        + ", ".join(f"{s} {info.rows:,} rows" for s, info in schema.splits.items())
    )

    command = [
        "torchx", "run", "-s", "local_cwd", "dist.ddp", "-j", f"1x{args.nproc}", "--script", "trainer/main.py", "--",
        "--config", args.config, "--resume", "never",
        "--set", f"data.path={dataset}", f"run.dir={train_dir}", f"train.epochs={args.epochs}",
    ]  # fmt: skip
    print(f"[3/3] train on {args.nproc} ranks through torchx:\n      {shlex.join(command)}", flush=True)
    if train_dir.exists():
        subprocess.run(["rm", "-rf", str(train_dir)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
        raise UserError(f"training failed: see the torchx log above (run directory {train_dir})")

    print("\n" + (train_dir / "summary.txt").read_text())
    print(f"Everything is in {run_dir}:")
    print(f"  synthetic.tsv{{,.truth.parquet,.oracle.json}}  raw rows, true click probabilities, oracle report")
    print(f"  dataset/                                    prepared parquet splits, vocabularies, schema.json")
    print(f"  train/                                      config.yaml, plan.txt, metrics.jsonl, collapse.jsonl, checkpoints/, summary.json")
    print(f"Collapse report of the trained model: .venv/bin/python -m trainer.collapse --checkpoint {train_dir} --output {run_dir / 'collapse'}")


if __name__ == "__main__":
    run_cli(main)
