"""Speed of the collapse metrics on a table streamed from disk (a script, not a test).

Writes a float32 table (``--sets`` sets of ``--rows`` x ``--dim``, one raw ``.npy`` each)
into a temp dir, drops it from the page cache, then times:

- reading the files once (sequential, chunked, no mmap): the I/O floor;
- a float64 GEMM ``X^T X`` of one chunk, in memory: the compute floor of the Gram is its
  FLOPs (2 * rows * (M*K)^2) at this speed;
- ``trainer.collapse``: the streaming Gram from the cold files (peak memory counted),
  the metrics from it (IA per set and overall, spectra, diversity), and the random
  baseline of the same shape (computed once per shape, then cached);
- ``torch.linalg.svdvals`` on the whole matrix loaded into memory, side by side.

    python -m bench.bench_collapse                         # 2M x 64, one set
    python -m bench.bench_collapse --rows 10000000         # the 10M x 64 table
    python -m bench.bench_collapse --sets 10 --rows 1000000 --dim 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description


class NpyRows:
    """Rows of a 2-d ``.npy`` file read on demand with plain reads (no mmap, so the process
    memory shows only what is held), sliceable like an array: ``t[a:b, :k]``."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        assert not fortran and len(shape) == 2
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.file = open(path, "rb", buffering=0)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, cols = index
        start, stop, _ = rows.indices(self.shape[0])
        row_bytes = self.shape[1] * self.dtype.itemsize
        self.file.seek(self.offset + start * row_bytes)
        out = np.empty((stop - start, self.shape[1]), self.dtype)
        self.file.readinto(memoryview(out).cast("B"))
        return out[:, cols]


def write_tables(root: str, sets: int, rows: int, dim: int, seed: int = 0) -> list[str]:
    """Random tables with a decaying spectrum (column j scaled by 0.9^j) and a shared part
    across sets, so IA and diversity are neither trivial nor extreme."""
    rng = np.random.default_rng(seed)
    scales = (0.9 ** np.arange(dim)).astype(np.float32)
    paths = []
    for s in range(sets):
        path = os.path.join(root, f"set{s}.npy")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
        for a in range(0, rows, 1 << 20):
            b = min(rows, a + (1 << 20))
            shared = np.random.default_rng(seed + a).standard_normal((b - a, dim), dtype=np.float32)
            own = rng.standard_normal((b - a, dim), dtype=np.float32)
            out[a:b] = (0.5 * shared + own) * scales
        out.flush()
        del out
        paths.append(path)
    return paths


def drop_cache(paths: list[str]) -> None:
    """Evict these files (only) from the page cache, so reads come from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_read(paths: list[str], chunk_bytes: int = 64 << 20) -> float:
    buf = bytearray(chunk_bytes)
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def gemm_gflops(chunk_rows: int, cols: int, repeats: int = 20) -> float:
    import torch

    x = torch.randn(chunk_rows, cols, dtype=torch.float64)
    g = torch.zeros(cols, cols, dtype=torch.float64)
    g.addmm_(x.T, x)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        g.addmm_(x.T, x)
    return 2 * chunk_rows * cols * cols * repeats / (time.perf_counter() - t) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sets", type=int, default=1)
    p.add_argument("--chunk-rows", type=int, help="rows per float64 Gram chunk (default: trainer.collapse.gram.DEFAULT_CHUNK_ROWS, 65536)")
    p.add_argument("--dir", default=None, help="where to write the tables (default: a temp dir, removed after)")
    p.add_argument("--no-svd", action="store_true", help="skip torch.linalg.svdvals on the loaded matrix")
    args = p.parse_args()
    import torch

    from trainer.collapse.analysis import analyze_field, ia_of_singular_values
    from trainer.collapse.gram import DEFAULT_CHUNK_ROWS, clear_baseline_cache, field_gram, random_gram

    if args.chunk_rows is None:
        args.chunk_rows = DEFAULT_CHUNK_ROWS
    cols = args.sets * args.dim
    size_gb = args.sets * args.rows * args.dim * 4 / 1e9
    print(f"machine: {describe()}, torch threads {torch.get_num_threads()}")
    print(f"table: {args.sets} set(s) x {args.rows:,} rows x {args.dim} dims float32 = {size_gb:.2f} GB on disk; "
          f"chunk {args.chunk_rows:,} rows ({args.chunk_rows * cols * 8 / 2**20:.1f} MiB float64)")
    root = args.dir or tempfile.mkdtemp(prefix="bench_collapse_")
    os.makedirs(root, exist_ok=True)
    try:
        t = time.perf_counter()
        paths = write_tables(root, args.sets, args.rows, args.dim)
        print(f"wrote in {time.perf_counter() - t:.1f}s to {root}")

        drop_cache(paths)
        t_read = time_read(paths)
        speed = gemm_gflops(args.chunk_rows, cols)
        flops = 2 * args.rows * cols * cols
        t_flops = flops / (speed * 1e9)
        floor = t_read + t_flops
        print(f"read (cold, sequential): {t_read:.2f}s = {size_gb / t_read:.2f} GB/s")
        print(f"float64 GEMM X^T X ({args.chunk_rows:,} x {cols}): {speed:.1f} GFLOP/s -> "
              f"Gram FLOPs {flops / 1e9:.1f} GFLOP in {t_flops:.2f}s")
        print(f"floor = read + Gram FLOPs: {floor:.2f}s")

        drop_cache(paths)
        tables = [NpyRows(p) for p in paths]
        base_rss = rss_mb()
        reset_peak_rss()
        t = time.perf_counter()
        fg = field_gram(tables, args.dim, args.chunk_rows, field="bench")
        t_gram = time.perf_counter() - t
        peak = peak_rss_mb() - base_rss
        clear_baseline_cache()
        t = time.perf_counter()
        random_gram(args.rows, cols)
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        fc = analyze_field(fg)  # baseline cached now: eigendecompositions + principal angles
        t_metrics = time.perf_counter() - t
        print(f"trainer.collapse Gram (streamed from cold files): {t_gram:.2f}s = {t_gram / floor:.2f}x the floor; "
              f"peak memory +{peak:.0f} MiB over {base_rss:.0f} MiB (the table is {size_gb * 1e3 / 1.048576:.0f} MiB)")
        print(f"metrics from the Gram (IA per set + overall, spectra, {len(fc.pairs)} set pairs): {t_metrics * 1e3:.1f} ms")
        print(f"random baseline of the same shape (first time; cached after): {t_base:.2f}s")
        div = f", mean diversity {fc.mean_diversity:.4f}" if fc.mean_diversity is not None else ""
        print(f"result: overall IA {fc.overall_ia:.4f} (random {fc.overall_random_ia:.4f}), "
              f"set IA {[round(v, 3) for v in fc.set_ia][:4]}{div}")

        if not args.no_svd:
            t = time.perf_counter()
            full = torch.cat([torch.from_numpy(np.load(p)) for p in paths], dim=1)
            t_load = time.perf_counter() - t
            t = time.perf_counter()
            s32 = torch.linalg.svdvals(full)
            t_svd = time.perf_counter() - t
            ia32 = ia_of_singular_values(s32.double().numpy())
            print(f"torch.linalg.svdvals (float32, whole matrix in memory, +{full.numel() * 4 / 2**20:.0f} MiB): "
                  f"{t_svd:.2f}s after a {t_load:.2f}s load; IA {ia32:.4f} (relative difference from ours "
                  f"{abs(ia32 - fc.overall_ia) / fc.overall_ia:.1e})")
            del full
            if args.rows * cols <= 50_000_000:
                full64 = torch.cat([torch.from_numpy(np.load(p)).double() for p in paths], dim=1)
                t = time.perf_counter()
                s64 = torch.linalg.svdvals(full64)
                t_svd64 = time.perf_counter() - t
                ia64 = ia_of_singular_values(s64.numpy())
                print(f"torch.linalg.svdvals (float64): {t_svd64:.2f}s; IA {ia64:.6f} "
                      f"(relative difference from ours {abs(ia64 - fc.overall_ia) / fc.overall_ia:.1e})")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
