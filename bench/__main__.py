"""``python -m bench``: run every benchmark in turn and print its figures.

Each benchmark runs in its own interpreter with its defaults; run one alone with
``python -m bench --only NAME`` or ``python -m bench.bench_NAME --help`` for its options.
The studies (many trainings each: the paper's findings, AUC vs scale; up to an hour) run
with ``--studies`` or by name with ``--only``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

from trainer.cli_help import HelpFormatter, description

BENCHMARKS = [
    "bench.bench_cli_help",
    "bench.bench_synthetic",
    "bench.bench_preprocess",
    "bench.bench_dataset_spec",
    "bench.bench_vocabulary",
    "bench.bench_loader",
    "bench.bench_collapse",
    "bench.bench_checkpoint",
    "bench.bench_export",
    "bench.bench_train",
    "bench.bench_multi_hot",
    "bench.bench_embedding_optim",
]
STUDIES = ["bench.bench_paper_findings", "bench.bench_auc_scale"]


def short_name(module: str) -> str:
    """``bench.bench_loader`` -> ``loader``."""
    return module.rpartition(".")[2].removeprefix("bench_")


def summary_line(module: str) -> str:
    """The first line of a benchmark's docstring, read from its source (nothing is imported)."""
    spec = importlib.util.find_spec(module)
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else None
    return description(doc).splitlines()[0] if doc else ""


def _epilog() -> str:
    width = max(len(short_name(m)) for m in BENCHMARKS + STUDIES)
    sections = (("benchmarks (in the order they run)", BENCHMARKS), ("studies (with --studies)", STUDIES))
    return "\n".join(
        line
        for title, modules in sections
        for line in [f"{title}:", *(f"  {short_name(m):<{width}}  {summary_line(m)}" for m in modules)]
    )


def _select(p: argparse.ArgumentParser, names: list[str]) -> list[str]:
    known = {short_name(m): m for m in BENCHMARKS + STUDIES}
    unknown = [n for n in names if short_name(n) not in known]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {', '.join(known)}")
    return [known[short_name(n)] for n in names]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=description(__doc__), epilog=_epilog(),
                                formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--only", nargs="+", metavar="NAME", default=[],
                   help="run only these benchmarks (e.g. loader checkpoint, or bench.bench_loader)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the benchmarks and run nothing")
    p.add_argument("--studies", action="store_true", help="also run the studies (up to an hour each)")
    args = p.parse_args(argv)
    if args.list:
        print(_epilog())
        return
    failed = []
    for module in _select(p, args.only) if args.only else BENCHMARKS + (STUDIES if args.studies else []):
        print(f"\n=== {module} ===", flush=True)
        if subprocess.run([sys.executable, "-m", module]).returncode != 0:
            failed.append(module)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
