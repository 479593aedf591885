"""Throughput of the synthetic generator per output format: rows/s (wall and CPU) and peak memory.

``python -m bench.bench_synthetic [--rows N]``. Each format runs in its own
process, so peak RSS is that format's alone. CPU rows/s (rows per second of
process CPU time, all threads) is the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.cli_help import HelpFormatter, description

_RUN = """
import json, resource, sys, time
from trainer.data.synthetic import SyntheticConfig, generate
rows, output, fmt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
wall, cpu = time.perf_counter(), time.process_time()
report = generate(SyntheticConfig(rows=rows), output, fmt, progress=False)
print(json.dumps({
    "wall_s": time.perf_counter() - wall,
    "cpu_s": time.process_time() - cpu,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "test_auc": report["oracle"]["test"]["auc"],
    "test_first_order_auc": report["oracle"]["test"]["first_order_auc"],
}))
"""

CASES = [("criteo-tsv", "synth.tsv"), ("criteo-tsv", "synth.tsv.gz"), ("parquet", "synth")]


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    args = p.parse_args()
    print(f"{'output':<14} {'rows/s wall':>12} {'rows/s CPU':>12} {'peak MiB':>9}  oracle test AUC (first-order)")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, name in CASES:
            out = subprocess.run(
                [sys.executable, "-c", _RUN, str(args.rows), str(Path(tmp) / name), fmt],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            r = json.loads(out.stdout)
            print(
                f"{name:<14} {args.rows / r['wall_s']:>12,.0f} {args.rows / r['cpu_s']:>12,.0f} {r['peak_rss_mib']:>9,.0f}"
                f"  {r['test_auc']:.4f} ({r['test_first_order_auc']:.4f})"
            )


if __name__ == "__main__":
    main()
