"""What checkpoint checksums cost: sha256 of every file at commit, verified at every load.

Saves one large checkpoint (``--gib`` of float32 tables in ``--tables`` tensors) in one
process through ``trainer.dcp_io``, then times, each on a freshly written file set:

- ``save``: DCP's write plus the commit (sha256 of every file into meta.json, rename);
- ``hash``: the sha256 pass alone (``trainer.checkpoint.file_digests``);
- ``load``: ``dcp_io.load`` end to end (safe metadata read, DCP load, checksum verify);
- ``verify``: the checksum pass alone (``trainer.checkpoint.verify_files``).

The page cache is not dropped (no root needed): a read right after a write is a warm read,
as a resume on the same host is. Prints the machine and the checksum share of save and load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB (default 1)")
    p.add_argument("--tables", type=int, default=8, help="tensors it is split into (default 8)")
    args = p.parse_args()
    import torch

    from trainer import checkpoint, dcp_io

    rows = int(args.gib * 2**30 / 4 / 64 / args.tables)
    state = {"model": {f"table{i}": torch.randn(rows, 64) for i in range(args.tables)}}
    size = sum(t.numel() * 4 for t in state["model"].values())
    print(f"machine: {describe()}")
    print(f"checkpoint: {size / 2**30:.2f} GiB in {args.tables} tensors of {rows:,} x 64 float32")
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=os.environ.get("TMPDIR")) as tmp:
        save_s = _timed(lambda: dcp_io.save(tmp, 1, state, {"bench": True}))
        url = os.path.join(tmp, checkpoint.checkpoint_name(1))
        hash_s = _timed(lambda: checkpoint.file_digests(url))
        target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}
        load_s = _timed(lambda: dcp_io.load(url, target))
        verify_s = _timed(lambda: checkpoint.verify_files(url))
        assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    gb = size / 1e9
    print(f"{'step':<8} {'seconds':>8} {'GB/s':>6}")
    for name, seconds in (("save", save_s), ("hash", hash_s), ("load", load_s), ("verify", verify_s)):
        print(f"{name:<8} {seconds:>8.2f} {gb / seconds:>6.2f}")
    print(f"checksums: {hash_s / save_s:.0%} of a save, {verify_s / load_s:.0%} of a load (both include them)")


if __name__ == "__main__":
    main()
