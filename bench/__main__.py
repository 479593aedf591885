"""``python -m bench``: run every benchmark in turn and print its figures."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ["bench.bench_cli_help", "bench.bench_synthetic", "bench.bench_preprocess", "bench.bench_loader", "bench.bench_collapse", "bench.bench_checkpoint", "bench.bench_export", "bench.bench_paper_findings"]


def main() -> None:
    failed = []
    for module in BENCHMARKS:
        print(f"\n=== {module} ===", flush=True)
        if subprocess.run([sys.executable, "-m", module]).returncode != 0:
            failed.append(module)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
