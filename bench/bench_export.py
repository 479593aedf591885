"""CPU scoring latency and throughput of exported models (a script, not a test).

Builds DCNv2 multi-embedding 4x (4 sets of dim 10, the paper's base) over Criteo-shaped
fields with cardinalities scaled by ``--cardinality-scale``, exports it fp32 and int8
(``trainer.export.serving_model``), and times, per batch size 1, 64 and 512:

- the eager unsharded model (TorchRec ``EmbeddingBagCollection`` on a KJT built from the ids),
- the exported fp32 program, and the exported int8 program,

with p50/p99 latency over ``--iters`` calls after warm-up, and rows/s. Weights are the
seeded initial ones: latency does not depend on trained values. (Raw-row scoring, which
adds the vocabulary lookups, is timed by ``python -m trainer.predict`` itself.)

    python -m bench.bench_export [--cardinality-scale 0.05] [--iters 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description

if TYPE_CHECKING:
    import torch

    from trainer.model import MultiEmbeddingCTR

BATCHES = (1, 64, 512)


def build_model(scale: float, model: str) -> MultiEmbeddingCTR:
    from trainer.data.schema import SparseField
    from trainer.data.synthetic import CRITEO_CARDINALITIES
    from trainer.job_config import EmbeddingConfig, ModelConfig
    from trainer.model import MultiEmbeddingCTR

    names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    fields = [SparseField(n, max(4, round(c * scale))) for n, c in zip(names, CRITEO_CARDINALITIES)]
    return MultiEmbeddingCTR.from_config(fields, ModelConfig(name=model), EmbeddingConfig("me", 4, 10), seed=0).eval()


def random_ids(model: MultiEmbeddingCTR, batch: int, rng: np.random.Generator) -> torch.Tensor:
    import torch

    cards = [t.cardinality for t in model.sparse_arch.tables[: len(model.sparse_arch.field_names)]]
    return torch.from_numpy(np.stack([(rng.random(batch) ** 3 * c).astype(np.int64) for c in cards], axis=1))


def eager_scorer(model: MultiEmbeddingCTR):
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = model.sparse_arch.field_names

    def score(ids: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
        )
        return torch.sigmoid(model(kjt))

    return score


def time_calls(fn, inputs: list[torch.Tensor], iters: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, rows/s) over ``iters`` calls, after warm-up."""
    import torch

    with torch.no_grad():
        for x in inputs[:10]:
            fn(x)
        times = []
        for i in range(iters):
            x = inputs[i % len(inputs)]
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    rows = inputs[0].shape[0]
    q = statistics.quantiles(times, n=100)
    return q[49] * 1e3, q[98] * 1e3, rows * len(times) / sum(times)


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--cardinality-scale", type=float, default=0.05, help="multiplies the Criteo Kaggle cardinalities")
    p.add_argument("--model", default="dcnv2")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (serving usually pins one per worker)")
    a = p.parse_args()
    import torch

    from trainer.export.serving_model import ServingModel, export_program

    torch.set_num_threads(a.threads)
    print(f"machine: {describe()}; torch {torch.__version__}, {a.threads} thread(s)")
    rng = np.random.default_rng(0)
    eager_model = build_model(a.cardinality_scale, a.model)
    rows = sum(t.cardinality for t in eager_model.sparse_arch.tables) // eager_model.sparse_arch.num_sets
    print(f"model: {a.model} ME 4x (4 sets x dim 10), 39 fields, {rows:,} ids per set")
    eager = eager_scorer(eager_model)
    t0 = time.perf_counter()
    fp32 = ServingModel.from_model(build_model(a.cardinality_scale, a.model))
    int8 = fp32.int8()
    programs = {}
    for name, serving in (("fp32", fp32), ("int8", int8)):
        program = export_program(serving)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        programs[name] = program.module()
        print(f"export {name}: tables {serving.table_bytes() / 2**20:.1f} MiB, program file {len(buffer.getvalue()) / 2**20:.1f} MiB")
    print(f"export of both: {time.perf_counter() - t0:.1f}s")
    scorers = {"eager (TorchRec EBC, KJT)": eager, "exported fp32": programs["fp32"], "exported int8": programs["int8"]}
    print(f"\n{'scorer':28} {'batch':>5} {'p50 ms':>8} {'p99 ms':>8} {'rows/s':>11}")
    for batch in BATCHES:
        inputs = [random_ids(eager_model, batch, rng) for _ in range(16)]
        for name, fn in scorers.items():
            p50, p99, rate = time_calls(fn, inputs, a.iters if batch < 512 else max(20, a.iters // 4))
            print(f"{name:28} {batch:>5} {p50:>8.3f} {p99:>8.3f} {rate:>11,.0f}")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
