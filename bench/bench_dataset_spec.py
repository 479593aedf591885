"""Throughput and peak memory of the preprocessor through dataset specs: Criteo TSV, ads-log Parquet.

``python -m bench.bench_dataset_spec [--rows 1000000,2000000] [--cases criteo,parquet,hashed]``.
Each case runs in a fresh process per size; it prints rows/s (wall and CPU) and
that process's peak RSS:

- ``criteo``: Criteo-format TSV (the synthetic generator, Criteo cardinalities)
  through the shipped ``criteo`` spec (``--dataset criteo``);
- ``parquet``: an ads-log-shaped Parquet file (label, user id, item id, a
  multi-hot history list of 0-20 ids, a price -> bucket token + dense value,
  an hour), all fields with vocabularies;
- ``hashed``: the same file with every id field hashed (``hash_buckets``) and
  an item id unique to each row: peak memory should stay flat as rows and
  distinct ids grow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description

_RUN = """
import json, resource, sys, time
from trainer.data.preprocess import PreprocessConfig, preprocess
kind, raw, out = sys.argv[1:4]
config = dict(dataset="criteo") if kind == "criteo" else dict(spec=sys.argv[4])
wall, cpu = time.perf_counter(), time.process_time()
schema = preprocess(PreprocessConfig(output=out, input=raw, progress=False, **config))
print(json.dumps({
    "wall_s": time.perf_counter() - wall,
    "cpu_s": time.process_time() - cpu,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rows": schema.recipe["rows_read"],
    "ids": sum(f.cardinality for f in schema.sparse_fields),
}))
"""

_MAKE_PARQUET = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
rows, path, unique = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
rng = np.random.default_rng(0)
with pq.ParquetWriter(path, pa.schema([("click", pa.int8()), ("user", pa.int64()), ("item", pa.int64()),
        ("history", pa.list_(pa.int32())), ("price", pa.float32()), ("hour", pa.int32())])) as w:
    for start in range(0, rows, 1 << 18):
        n = min(1 << 18, rows - start)
        lengths = rng.integers(0, 21, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        item = np.arange(start, start + n) if unique else rng.zipf(1.3, n) % 1_000_000
        w.write_table(pa.table({
            "click": pa.array(rng.integers(0, 2, n).astype(np.int8)),
            "user": pa.array(rng.zipf(1.2, n) % 2_000_000),
            "item": pa.array(item),
            "history": pa.ListArray.from_arrays(pa.array(offsets), pa.array((rng.zipf(1.3, offsets[-1]) % 50_000).astype(np.int32))),
            "price": pa.array((rng.random(n) * 100).astype(np.float32)),
            "hour": pa.array(rng.integers(0, 96, n).astype(np.int32)),
        }), row_group_size=1 << 17)
"""


def _spec(hashed: bool) -> dict:
    ids = {"hash_buckets": 1 << 20} if hashed else {}
    return {
        "name": "ads_bench",
        "input": {"format": "parquet"},
        "columns": [
            {"name": "click", "type": "label"},
            {"name": "user", "type": "categorical", **(ids or {"min_count": 2})},
            {"name": "item", "type": "categorical", **(ids or {"min_count": 2})},
            {"name": "history", "type": "multi_hot", "max_length": 20, "pooling": "mean", **ids},
            {"name": "price", "type": "numeric", "token": "buckets", "boundaries": [1, 5, 10, 50], "dense": "log1p"},
            {"name": "hour", "type": "ignore"},
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--rows", default="1000000,2000000", help="comma-separated row counts (default 1000000,2000000)")
    p.add_argument("--cases", default="criteo,parquet,hashed", help="comma-separated: criteo, parquet, hashed")
    args = p.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    cases = args.cases.split(",")
    print(f"machine: {describe()}")
    print(f"{'case':>8} {'rows':>10} {'seconds':>8} {'rows/s wall':>12} {'rows/s CPU':>11} {'peak MiB':>9} {'ids':>10}")
    with tempfile.TemporaryDirectory(prefix="bench-dataset-spec-") as tmp:
        for case in cases:
            spec = Path(tmp) / f"{case}.yaml"
            spec.write_text(yaml.safe_dump(_spec(case == "hashed")))
            for rows in sizes:
                raw = Path(tmp) / f"{case}-{rows}.{'tsv' if case == 'criteo' else 'parquet'}"
                if case == "criteo":
                    make = [sys.executable, "-m", "trainer.data.synthetic", "--rows", str(rows), "--output", str(raw),
                            "--format", "criteo-tsv", "--cardinality-scale", "1.0"]  # fmt: skip
                else:
                    make = [sys.executable, "-c", _MAKE_PARQUET, str(rows), str(raw), "1" if case == "hashed" else "0"]
                subprocess.run(make, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                out = Path(tmp) / f"out-{case}-{rows}"
                done = subprocess.run([sys.executable, "-c", _RUN, case, str(raw), str(out), str(spec)],
                                      capture_output=True, text=True)  # fmt: skip
                if done.returncode != 0:
                    sys.exit(f"{case} failed on {rows} rows:\n{done.stderr}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{case:>8} {r['rows']:>10,} {r['wall_s']:>8.1f} {r['rows'] / r['wall_s']:>12,.0f} "
                      f"{r['rows'] / r['cpu_s']:>11,.0f} {r['peak_rss_mib']:>9,.0f} {r['ids']:>10,}", flush=True)  # fmt: skip
                subprocess.run(["rm", "-rf", str(out), str(raw)], check=True)


if __name__ == "__main__":
    main()
