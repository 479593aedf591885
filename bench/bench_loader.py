"""Throughput of ``CTRDataLoader`` on a Criteo-shaped dataset (a script, not a test).

Builds a random dataset (39 sparse fields with Criteo-like cardinalities and
skewed ids, 13 dense) in a temp dir, then iterates one epoch with batch 2048
for world_size 1 and for each rank of world_size 2, shuffle on and off.

    python -m bench.bench_loader [--rows 2000000] [--no-prefetch]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from typing import TYPE_CHECKING

import numpy as np

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description

if TYPE_CHECKING:
    from trainer.data.loader import LoaderConfig

# I1-I13 as tokens (floor(ln(v)^2) buckets), then C1-C26 (Criteo Kaggle distinct counts)
CARDINALITIES = [50, 100, 120, 60, 200, 90, 80, 60, 110, 8, 40, 40, 60] + [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
NUM_DENSE = 13
CHUNK = 1 << 16


def build_dataset(root: str, rows: int, seed: int = 0) -> None:
    """Random train split of ``rows`` rows; ids skewed toward small values like real frequency-sorted vocabularies."""
    from trainer.data.schema import DatasetSchema, SparseField, write_schema
    from trainer.data.writer import DatasetWriter, make_table

    rng = np.random.default_rng(seed)
    fields = [SparseField(f"f{i:02d}", c) for i, c in enumerate(CARDINALITIES)]
    writer = DatasetWriter(root, files_per_split=8)
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        sparse = {f.name: (rng.random(n) ** 4 * f.cardinality).astype(np.int64) for f in fields}
        dense = rng.standard_normal((n, NUM_DENSE), dtype=np.float32)
        writer.write("train", make_table(rng.integers(0, 2, n), sparse, dense))
    write_schema(root, DatasetSchema("synthetic", fields, [f"I{i}" for i in range(1, NUM_DENSE + 1)], writer.close()))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(root: str, config: LoaderConfig, rank: int, world_size: int) -> None:
    from trainer.data.loader import CTRDataLoader

    loader = CTRDataLoader(root, "train", config, rank=rank, world_size=world_size)
    rows = 0
    t0 = time.perf_counter()
    for batch in loader:
        rows += batch.labels.shape[0]
    seconds = time.perf_counter() - t0
    print(
        f"world_size={world_size} rank={rank} shuffle={config.shuffle!s:5} prefetch={config.prefetch!s:5} "
        f"rows={rows} batches={len(loader)} seconds={seconds:.2f} rows/s={rows / seconds:,.0f} "
        f"batches/s={len(loader) / seconds:.1f} peak_rss={peak_rss_mib():.0f}MiB",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--no-prefetch", action="store_true", help="read windows in the main thread")
    args = parser.parse_args(argv)
    from trainer.data.loader import LoaderConfig

    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as root:
        t0 = time.perf_counter()
        build_dataset(root, args.rows)
        print(f"built {args.rows} rows x {len(CARDINALITIES)} sparse + {NUM_DENSE} dense in {time.perf_counter() - t0:.1f}s, peak_rss={peak_rss_mib():.0f}MiB")
        for shuffle in (True, False):
            config = LoaderConfig(batch_size=args.batch_size, shuffle=shuffle, prefetch=not args.no_prefetch)
            run(root, config, 0, 1)
            for rank in range(2):
                run(root, config, rank, 2)


if __name__ == "__main__":
    main()
