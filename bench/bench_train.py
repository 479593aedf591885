"""Training examples/s and peak memory: the trainer beside the authors' recipe (DCNv2 / DNN, SE / ME, 1x-10x).

For every row (model, SE or ME, scale) it runs, each in its own process on the same
synthetic data set (39 fields, ``--vocab`` rows per embedding set, Criteo-like shares,
skewed ids):

- ``authors``: ``bench.authors_baseline``, the same model in plain PyTorch trained as the
  paper's authors train it (one ``nn.Embedding`` per set, dense Adam over every parameter);
- ``ours 1 proc``: the trainer's own code path (``trainer.train.Trainer``: the sharded
  ``TrainModule``, fused embedding optimizer, dense Adam, ``TrainPipelineSparseDist``);
- ``ours N ranks``: the same under ``torchrun`` (gloo, or NCCL on CUDA), the cores split
  over the ranks, the global batch unchanged (``--batch`` split over the ranks).

It prints examples/s and the ratio to the baseline, the share of a step spent outside
matrix multiplies (torch.profiler self time of ``aten::mm/addmm/bmm/matmul/linear`` against
all ops: CPU time on CPU, device time on CUDA), the peak memory above the process's
footprint after imports (RSS on CPU, ``max_memory_allocated`` on CUDA) and that peak over
the embedding tables' stored bytes plus the dense model. Other processes share the
machine: compare ratios from one invocation, not absolutes across invocations, and prefer
``--threads 1`` there (a multi-thread process stalls whenever one of its threads waits for a
core; single-thread processes only slow down).

    python -m bench.bench_train --models dcnv2 --modes me --scales 4 --steps 5 --top 15
    python -m bench.bench_train --device cuda        # fused Adam on the tables, bf16 dense part
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description
from trainer.table_layout import embedding_shape

NUM_FIELDS = 39
NUM_INTEGER_FIELDS = 13
INTEGER_TOKENS = 193  # criteo_integer_token's range plus the null and OOV rows
# Criteo Kaggle's C1..C26 distinct counts: their shares of the vocabulary
CRITEO_COUNTS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
BASE_DIM = 10
RESULT = "BENCH_TRAIN_RESULT "


def cardinalities(vocab: int) -> list[int]:
    """39 field sizes summing to about ``vocab``: 13 integer-token fields, 26 Criteo-shaped ones."""
    scale = max(vocab - NUM_INTEGER_FIELDS * INTEGER_TOKENS, 0) / sum(CRITEO_COUNTS)
    return [INTEGER_TOKENS] * NUM_INTEGER_FIELDS + [max(min(c, 4), round(c * scale)) + 2 for c in CRITEO_COUNTS]


def skewed_ids(rng: np.random.Generator, n: int, cards: list[int]) -> np.ndarray:
    """(n, F) ids, field j in ``[0, cards[j])``, skewed toward small ids like frequency-sorted vocabularies."""
    return np.stack([(rng.random(n) ** 4 * c).astype(np.int64) for c in cards], axis=1)


def build_dataset(root: str, cards: list[int], train_rows: int, eval_rows: int) -> None:
    """A prepared data set (``trainer.data.schema``) with random labels and skewed ids."""
    from trainer.data.schema import DatasetSchema, SparseField, write_schema
    from trainer.data.writer import DatasetWriter, make_table

    rng = np.random.default_rng(0)
    fields = [SparseField(f"f{j:02d}", c) for j, c in enumerate(cards)]
    writer = DatasetWriter(root, files_per_split=1)
    for split, rows in (("train", train_rows), ("val", eval_rows), ("test", eval_rows)):
        ids = skewed_ids(rng, rows, cards)
        writer.write(split, make_table(rng.integers(0, 2, rows), {f.name: ids[:, j] for j, f in enumerate(fields)}))
    write_schema(root, DatasetSchema("bench-train", fields, [], writer.close()))


@dataclass(frozen=True)
class Row:
    model: str
    mode: str
    scale: int

    @property
    def num_sets(self) -> int:
        return embedding_shape(self.mode, self.scale, BASE_DIM)[0]

    @property
    def dim(self) -> int:
        return embedding_shape(self.mode, self.scale, BASE_DIM)[1]

    @property
    def label(self) -> str:
        return f"{self.mode.upper()} {self.scale}x"


def grid(models: list[str], modes: list[str], scales: list[int]) -> list[Row]:
    """Every (model, mode, scale); SE 1x and ME 1x are the same model, run once (as SE)."""
    rows = []
    for model in models:
        for scale in scales:
            for mode in modes:
                if scale == 1 and mode == "me" and "se" in modes:
                    continue
                rows.append(Row(model, mode, scale))
    return rows


# ---- workers (each in its own process) -------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes(device, baseline: int) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def _saved_activation_bytes(step, model) -> int:
    """Bytes autograd saves for the backward of one ``step`` (unique storages, parameters
    and their flat FBGEMM weights excluded): the activations a batch holds at its peak."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {p._original_tensor.untyped_storage().data_ptr() for p in model.parameters() if hasattr(p, "_original_tensor")}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(saved.values())


def _profile(step, steps: int, device, top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """The share of ``steps`` calls of ``step`` spent outside matrix multiplies (profiler self
    time), and the ``top`` ops by self time: (name, share, calls per step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    matmul = sum(getattr(e, attr) for e in events if e.key in MATMUL_OPS)
    ranked = sorted(events, key=lambda e: -getattr(e, attr))[:top]
    top_ops = [(e.key, getattr(e, attr) / total, e.count // steps) for e in ranked] if total else []
    return (1 - matmul / total if total else float("nan")), top_ops


def _timed(step, warmup: int, steps: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def worker_authors(args: argparse.Namespace) -> dict:
    import torch

    from bench.authors_baseline import AuthorsModel, authors_optimizer, train_step

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = _rss_bytes()
    row, cards = Row(args.model, args.mode, args.scale), cardinalities(args.vocab)
    torch.manual_seed(0)
    model = AuthorsModel(cards, row.num_sets, row.dim, row.model).to(device)
    optimizer = authors_optimizer(model)
    rng = np.random.default_rng(1)
    n = args.warmup + args.steps + args.profile_steps
    ids = torch.from_numpy(skewed_ids(rng, n * args.batch, cards)).view(n, args.batch, -1).to(device)
    labels = torch.from_numpy(rng.integers(0, 2, (n, args.batch)).astype(np.float32)).to(device)
    position = iter(range(n))

    def step() -> None:
        i = next(position)
        float(train_step(model, optimizer, ids[i], labels[i]))

    seconds = _timed(step, args.warmup, args.steps, lambda: None)
    share, top_ops = _profile(step, args.profile_steps, device, args.top)
    return {"examples_per_sec": args.steps * args.batch / seconds, "outside_matmul": share, "top_ops": top_ops,
            "peak_bytes": _peak_bytes(device, baseline)}  # fmt: skip


def worker_ours(args: argparse.Namespace) -> dict | None:
    import logging

    import torch

    from trainer.dist_context import init_distributed, shutdown
    from trainer.job_config import load_config
    from trainer.model.sparse_arch import find_sparse_arch
    from trainer.run_dir import RunDir
    from trainer.table_layout import SPARSE_ARCH_PREFIX
    from trainer.train import Trainer

    logging.basicConfig(level=logging.ERROR)
    baseline = _rss_bytes()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [
        f"data.path={args.data}", f"run.dir={args.data}/run", f"run.device={args.device}",
        f"model.name={args.model}", f"embedding.mode={args.mode}", f"embedding.scale={args.scale}",
        f"train.batch_size={args.batch // world}",
    ]  # fmt: skip
    if args.device == "cuda":
        overrides += ["optim.embedding=adam", "train.dense_autocast=bf16"]
    overrides += args.set
    config = load_config(None, overrides)
    ctx = init_distributed(config.run.device)
    try:
        trainer = Trainer(config, ctx, RunDir(config.run.dir))
        if args.threads:  # after the trainer's own choice (the host's cores over its ranks)
            torch.set_num_threads(args.threads)
        trainer.model.train()
        state = _peak_bytes(ctx.device, baseline) if ctx.device.type == "cuda" else _rss_bytes() - baseline
        batches = trainer.train_loader.iter_from(0)
        sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

        def step() -> None:
            loss, _, _ = trainer.pipeline.progress(batches)
            float(loss)  # as Trainer._train_segment does every step

        def barrier() -> None:
            sync()
            ctx.barrier()

        seconds = _timed(step, args.warmup, args.steps, barrier)
        share, top_ops = _profile(step, args.profile_steps, ctx.device, args.top)
        activations = _saved_activation_bytes(step, trainer.model)
        tables = sum(t.cardinality * t.storage_dim for t in find_sparse_arch(trainer.model)[1].tables) * 4
        dense = sum(p.numel() * p.element_size() for name, p in trainer.model.named_parameters()
                    if SPARSE_ARCH_PREFIX not in name)  # fmt: skip
        # all ranks' memory together
        peak, state, activations = ctx.all_reduce_sum([_peak_bytes(ctx.device, baseline), state, activations])
        result = {"examples_per_sec": args.steps * args.batch / seconds, "outside_matmul": share, "top_ops": top_ops,
                  "peak_bytes": peak, "model_bytes": tables + dense, "state_bytes": state,
                  "activation_bytes": activations}  # fmt: skip
        return result if ctx.is_main else None
    finally:
        shutdown()


# ---- the driver ------------------------------------------------------------------------


def _worker_cmd(kind: str, row: Row, args: argparse.Namespace, data: str, ranks: int) -> list[str]:
    flags = [
        "--worker", kind, "--data", data, "--model", row.model, "--mode", row.mode, "--scale", str(row.scale),
        "--vocab", str(args.vocab), "--batch", str(args.batch), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps), "--device", args.device,
        "--top", str(args.top), "--threads", str(args.threads), *(f"--set={o}" for o in args.set),
    ]  # fmt: skip
    if ranks == 1:
        return [sys.executable, "-m", "bench.bench_train", *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "bench.bench_train", *flags]  # fmt: skip


def _run_worker(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench_train: worker failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1][len(RESULT) :])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=["dcnv2", "dnn"], choices=["dcnv2", "dnn"])
    p.add_argument("--modes", nargs="+", default=["se", "me"], choices=["se", "me"])
    p.add_argument("--scales", nargs="+", type=int, default=[1, 2, 4, 10], help="embedding scales (default 1 2 4 10)")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="process layouts of ours (default 1 2)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--profile-steps", type=int, default=1, help="profiled steps after the timed ones (default 1)")
    p.add_argument("--batch", type=int, default=2048, help="global batch (default 2048)")
    p.add_argument("--vocab", type=int, default=1_090_000, help="rows per embedding set over the 39 fields (default 1,090,000)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of every process (default 0: torch's default for the baseline, the trainer's "
                        "cores / ranks for ours); 1 compares per core, unaffected by other processes' load")  # fmt: skip
    p.add_argument("--top", type=int, default=0, help="also print each run's N ops with the most self time (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for ours (repeatable), e.g. sharding.sharding_types=[table_wise]")
    p.add_argument("--no-baseline", action="store_true", help="skip the authors' baseline")
    # internal: one measurement in this process
    p.add_argument("--worker", choices=["authors", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--scale", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = (worker_authors if args.worker == "authors" else worker_ours)(args)
        if result is not None:
            print(RESULT + json.dumps(result), flush=True)
        return
    if min(args.steps, args.warmup, args.profile_steps, args.batch, min(args.ranks)) < 1 or args.threads < 0:
        p.error("--steps, --warmup, --profile-steps, --batch and --ranks must be >= 1, --threads >= 0")
    if args.device == "cuda":  # one GPU per rank
        import torch

        gpus = torch.cuda.device_count()
        if not gpus:
            p.error("--device cuda: no CUDA device here")
        if max(args.ranks) > gpus:
            print(f"skipping --ranks {[r for r in args.ranks if r > gpus]}: {gpus} GPU(s) here")
            args.ranks = [r for r in args.ranks if r <= gpus] or [1]
    rows = grid(args.models, args.modes, args.scales)
    cards = cardinalities(args.vocab)
    print(f"machine: {describe()}")
    threads = f"{args.threads} thread(s) per process" if args.threads else "default threads"
    print(f"device {args.device}, {threads}; global batch {args.batch}; {sum(cards):,} rows per set over {len(cards)} fields; "
          f"{args.warmup} warm-up + {args.steps} timed + {args.profile_steps} profiled steps per run")  # fmt: skip
    header = (f"{'model':<6} {'emb':<6} {'layout':<12} {'ex/s':>8} {'/authors':>8} {'outside mm':>10} {'peak MiB':>9} "
              f"{'peak/model':>10} {'state/model':>11} {'activ MiB':>9}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=os.environ.get("TMPDIR")) as data:
        steps = args.warmup + args.steps + args.profile_steps + 2  # the pipeline reads two batches ahead
        build_dataset(data, cards, steps * args.batch, max(args.batch // 4, 16))
        print(header)
        for row in rows:
            layouts = ([] if args.no_baseline else [("authors", "authors", 1)]) + [
                ("ours", f"ours {r} " + ("proc" if r == 1 else "ranks"), r) for r in args.ranks
            ]
            base = None
            for kind, name, ranks in layouts:
                r = _run_worker(_worker_cmd(kind, row, args, data, ranks))
                if kind == "authors":
                    base = r["examples_per_sec"]
                model_bytes = r.get("model_bytes")
                ratio = f"{r['examples_per_sec'] / base:.2f}x" if base else "-"
                per_model = f"{r['peak_bytes'] / model_bytes:.2f}" if model_bytes else "-"
                state = f"{r['state_bytes'] / model_bytes:.2f}" if model_bytes else "-"
                activations = _mib(r["activation_bytes"]) if "activation_bytes" in r else "-"
                print(f"{row.model:<6} {row.label:<6} {name:<12} {r['examples_per_sec']:>8,.0f} {ratio:>8} "
                      f"{r['outside_matmul']:>10.0%} {_mib(r['peak_bytes']):>9} {per_model:>10} {state:>11} "
                      f"{activations:>9}", flush=True)  # fmt: skip
                for op, share, calls in r["top_ops"]:
                    print(f"{'':<27} {share:>6.1%}  {op} x{calls}")
    print("peak: above the footprint after imports, all ranks together; model: tables' stored bytes + dense parameters;\n"
          "state: memory after the trainer is built, before the first step (tables, optimizer state, dense model);\n"
          "activ: what autograd saves for one step's backward (activations, proportional to the batch)")


if __name__ == "__main__":
    main()
