"""Throughput and peak memory of the preprocessor on Criteo-format TSV.

``python -m bench.bench_preprocess [--rows 1000000,5000000]``. For each size it
generates the raw TSV with the synthetic generator (Criteo cardinalities,
``--cardinality-scale 1.0``), then preprocesses it with the defaults
(min-count 10, 8/1/1) in a fresh process, and prints rows/s (wall and CPU),
seconds and that process's peak RSS. CPU rows/s (rows per second of the
process's CPU time, all threads) is the steadier figure on a shared machine;
"others" is how many cores other processes kept busy meanwhile (/proc/stat).

A second table is the cost of ``--shuffle-train`` (``trainer.data.global_shuffle``): the
global shuffle of each dataset's train split, run alone in a fresh process with buckets of
``--bucket-rows`` rows (default 262144,1048576): seconds, rows/s and peak RSS, which
follows the bucket size, not the row count; "x preprocess" is its time over the
preprocessing's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description

_RUN = """
import json, resource, sys, time
from bench.bench_preprocess import busy_seconds
from trainer.data.preprocess import PreprocessConfig, preprocess
wall, cpu, busy = time.perf_counter(), time.process_time(), busy_seconds()
schema = preprocess(PreprocessConfig(dataset="criteo", input=sys.argv[1], output=sys.argv[2], progress=False))
print(json.dumps({
    "wall_s": time.perf_counter() - wall,
    "cpu_s": time.process_time() - cpu,
    "busy_s": busy_seconds() - busy,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rows": schema.recipe["rows_read"],
    "ids": sum(f.cardinality for f in schema.sparse_fields),
}))
"""
_SHUFFLE = """
import json, resource, sys, time
from trainer.data.global_shuffle import shuffle_split
from trainer.data.schema import read_schema
train = read_schema(sys.argv[1]).splits["train"]
wall, cpu = time.perf_counter(), time.process_time()
_, report = shuffle_split(sys.argv[1], train, "train", seed=0, bucket_rows=int(sys.argv[2]))
print(json.dumps({
    "wall_s": time.perf_counter() - wall,
    "cpu_s": time.process_time() - cpu,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rows": report.rows, "buckets": report.buckets, "largest": report.largest_bucket,
}))
"""


def busy_seconds() -> float:
    """CPU seconds all processes have spent (user, nice, system, irq, softirq), from /proc/stat; 0 elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:8]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--rows", default="1000000,5000000", help="comma-separated row counts (default 1000000,5000000)")
    p.add_argument("--bucket-rows", default="262144,1048576", help="global shuffle: comma-separated bucket sizes")
    args = p.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    bucket_rows = [int(b) for b in args.bucket_rows.split(",")]
    shuffles = []
    print(f"machine: {describe()}")
    print(
        f"{'rows':>10} {'input MB':>9} {'seconds':>8} {'rows/s wall':>12} {'rows/s CPU':>11} {'peak MiB':>9} "
        f"{'output MB':>10} {'ids':>9} {'others':>7}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        for rows in sizes:
            raw, out = Path(tmp) / f"criteo-{rows}.tsv", Path(tmp) / f"dataset-{rows}"
            subprocess.run(
                [sys.executable, "-m", "trainer.data.synthetic", "--rows", str(rows), "--output", str(raw),
                 "--format", "criteo-tsv", "--cardinality-scale", "1.0"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            done = subprocess.run([sys.executable, "-c", _RUN, str(raw), str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"preprocess failed on {rows} rows:\n{done.stderr}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{r['rows']:>10,} {_size(raw) / 1e6:>9,.0f} {r['wall_s']:>8.1f} {r['rows'] / r['wall_s']:>12,.0f} "
                f"{r['rows'] / r['cpu_s']:>11,.0f} {r['peak_rss_mib']:>9,.0f} {_size(out) / 1e6:>10,.0f} "
                f"{r['ids']:>9,} {max(r['busy_s'] - r['cpu_s'], 0) / r['wall_s']:>7.2f}",
                flush=True,
            )
            raw.unlink()
            for b in bucket_rows:
                done = subprocess.run([sys.executable, "-c", _SHUFFLE, str(out), str(b)], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"global shuffle failed on {rows} rows:\n{done.stderr}")
                shuffles.append((json.loads(done.stdout.strip().splitlines()[-1]), b, r["wall_s"]))
            shutil.rmtree(out)
    print("\nglobal shuffle of the train split (preprocess --shuffle-train), alone:")
    print(f"{'train rows':>10} {'bucket rows':>11} {'buckets':>7} {'seconds':>8} {'rows/s wall':>12} {'rows/s CPU':>11} "
          f"{'peak MiB':>9} {'x preprocess':>12}")  # fmt: skip
    for s, b, preprocess_s in shuffles:
        print(
            f"{s['rows']:>10,} {b:>11,} {s['buckets']:>7} {s['wall_s']:>8.1f} {s['rows'] / s['wall_s']:>12,.0f} "
            f"{s['rows'] / s['cpu_s']:>11,.0f} {s['peak_rss_mib']:>9,.0f} {s['wall_s'] / preprocess_s:>12.2f}"
        )


if __name__ == "__main__":
    main()
