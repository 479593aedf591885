"""How fast every CLI answers ``--help`` (best of several runs, a fresh interpreter each):
the trainer's, the pipelines' and every benchmark's.

A CLI parses its arguments before it imports torch, torchrec or fbgemm, so ``--help`` and
a refused argument answer at once (``tests/test_structure.py`` checks that torch is not
imported; this prints the seconds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description

CLIS = (
    "trainer.main",
    "trainer.data.preprocess",
    "trainer.data.synthetic",
    "trainer.collapse",
    "trainer.export",
    "trainer.predict",
    "pipelines.run",
    "pipelines.sweep",
    "bench",
    *sorted(f"bench.{path.stem}" for path in Path(__file__).parent.glob("bench_*.py")),
)


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="runs per CLI; the best is printed (default 5)")
    args = p.parse_args()
    print(f"machine: {describe()}")
    width = max(len(module) for module in CLIS)
    print(f"{'CLI':<{width}} {'--help best s':>13} {'median s':>9}")
    for module in CLIS:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", module, "--help"], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"{module:<{width}} {times[0]:>13.2f} {times[len(times) // 2]:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
