"""What the paper's dense embedding optimizer costs: dense_adam vs rowwise_adagrad per step.

``optim.embedding: dense_adam`` (``recipe: paper``) replicates every table and steps it whole
with a torch Adam: a dense gradient of every table, its all-reduce and an Adam update of
every row, every step, plus two table-sized state tensors. The default ``rowwise_adagrad``
is fused into FBGEMM's backward and touches only the rows a batch looks up. For each
vocabulary and ME scale this builds the trainer's own sharded DCNv2 (one rank, gloo on CPU,
NCCL on CUDA; the same ``trainer.embedding_optim`` / ``trainer.sharding`` path as training),
runs batches of ``--batch`` random ids, and prints, interleaving the two optimizers step by
step (the machine may be shared: compare the ratio):

- ``step``: forward + backward + ``optimizer.step()``, median ms (fused: the table update is
  inside the backward);
- ``opt``: ``optimizer.step()`` alone, median ms: the dense layers' Adam, plus under
  dense_adam the whole-table Adam;
- ``emb MiB``: embedding weights + their gradients at the optimizer step + optimizer state;
- ``peak MiB`` (CUDA only): ``torch.cuda.max_memory_allocated`` over the steps.

Vocabularies: ``demo`` (39 Criteo-shaped fields, 28,699 rows: ``make demo``'s dataset) and
``criteo`` (1,086,810 rows: Criteo Kaggle after the paper's min-count 10), each set of dim 10.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import TYPE_CHECKING

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description

if TYPE_CHECKING:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from trainer.data.schema import SparseField

VOCABULARIES = {"demo": 28_699, "criteo": 1_086_810}
OPTIMIZERS = ("rowwise_adagrad", "dense_adam")
MIB = 2**20


def criteo_shaped(total_rows: int) -> list[SparseField]:
    """39 fields: I1..I13 of the integer tokens, C1..C26 in Criteo's proportions, ``total_rows`` in all."""
    from trainer.data.schema import SparseField
    from trainer.data.synthetic import CRITEO_CARDINALITIES, INTEGER_FIELDS, INTEGER_TOKENS

    integer = INTEGER_TOKENS + 2
    left = total_rows - integer * len(INTEGER_FIELDS)
    scale = left / sum(CRITEO_CARDINALITIES)
    categorical = [max(4, round(c * scale)) for c in CRITEO_CARDINALITIES]
    categorical[CRITEO_CARDINALITIES.index(max(CRITEO_CARDINALITIES))] += left - sum(categorical)  # exact total
    return [SparseField(f, integer) for f in INTEGER_FIELDS] + [
        SparseField(f"C{i + 1}", c) for i, c in enumerate(categorical)
    ]


def _bytes(value: object) -> int:
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


class Case:
    """One sharded model and its optimizers, on random batches of ids."""

    def __init__(self, fields: list[SparseField], scale: int, optimizer: str, batch: int, device: torch.device):
        import torch
        import torch.distributed as dist

        from trainer.embedding_optim import apply_embedding_optimizer, combined_optimizer, embedding_optimizer
        from trainer.job_config import EmbeddingConfig, ModelConfig, ShardingConfig
        from trainer.model import MultiEmbeddingCTR
        from trainer.sharding import plan_sharding, shard_model

        self.fields, self.batch, self.device = fields, batch, device
        emb_opt = embedding_optimizer(optimizer, device, lr=1e-3, weight_decay=1e-6)
        model = MultiEmbeddingCTR.from_config(
            fields, ModelConfig(name="dcnv2"), EmbeddingConfig("me", scale, base_dim=10), seed=0,
            table_device=torch.device("meta"),
        )  # fmt: skip
        apply_embedding_optimizer(model, emb_opt)
        plan = plan_sharding(model, ShardingConfig(), 1, device, batch, dist.group.WORLD, replicate_tables=emb_opt.dense)
        self.model = shard_model(model, plan, device)
        dense_adam = lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-6, fused=True)  # noqa: E731 (as trainer.train)
        self.optimizer = combined_optimizer(self.model, emb_opt, dense_adam)
        self.generator = torch.Generator().manual_seed(0)
        self.steps: list[float] = []
        self.opt_steps: list[float] = []
        self.table_keys = {k for k in self.model.state_dict() if "embedding_bag_collection" in k}
        self.grad_bytes = 0  # the tables' gradients at the optimizer step (dense_adam: whole tables)

    def _features(self) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        ids = [torch.randint(0, f.cardinality, (self.batch,), generator=self.generator) for f in self.fields]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in self.fields],
            values=torch.cat(ids),
            lengths=torch.ones(self.batch * len(self.fields), dtype=torch.int32),
        )
        labels = torch.randint(0, 2, (self.batch,), generator=self.generator).float()
        return kjt.to(self.device), labels.to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def step(self, record: bool = True) -> None:
        import torch

        kjt, labels = self._features()
        self._sync()
        start = time.perf_counter()
        torch.nn.functional.binary_cross_entropy_with_logits(self.model(kjt), labels).backward()
        self._sync()
        before_opt = time.perf_counter()
        self.grad_bytes = sum(_bytes(p.grad) for n, p in self.model.named_parameters() if n in self.table_keys)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self._sync()
        end = time.perf_counter()
        if record:
            self.steps.append(end - start)
            self.opt_steps.append(end - before_opt)

    def embedding_bytes(self) -> int:
        """Table weights, their gradients at the optimizer step and the tables' optimizer state."""
        state = self.model.state_dict()
        weights = sum(_bytes(state[k]) for k in self.table_keys)
        opt_state = self.optimizer.state_dict()["state"]
        held = sum(_bytes(v) for k, s in opt_state.items() if "embedding_bag_collection" in k for v in s.values())
        return weights + self.grad_bytes + held


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--vocab", nargs="+", default=list(VOCABULARIES), choices=list(VOCABULARIES), help="vocabularies")
    p.add_argument("--scales", nargs="+", type=int, default=[1, 4], help="ME scales: sets of dim 10 (default 1 4)")
    p.add_argument("--batch", type=int, default=2048, help="rows per step (default 2048, the paper's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case first (default 2)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args()
    import torch
    import torch.distributed as dist

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if "MASTER_PORT" not in os.environ:  # a port free now, for this one-rank group
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=0, world_size=1)
    if use_cuda:
        torch.cuda.set_device(device)
    print(f"machine: {describe()}" + (f"; {torch.cuda.get_device_name(device)}" if use_cuda else ""))
    print(f"one rank on {device.type}, DCNv2 (hidden 400, 4 cross layers), batch {args.batch}, median of {args.steps} steps")
    header = f"{'vocab':<7} {'rows':>9} {'sets':>4} {'optimizer':<16} {'step ms':>8} {'opt ms':>7} {'emb MiB':>8}"
    print(header + (f" {'peak MiB':>9}" if use_cuda else "") + f" {'vs rowwise':>10}")
    try:
        for vocab in args.vocab:
            fields = criteo_shaped(VOCABULARIES[vocab])
            for scale in args.scales:
                cases = {name: Case(fields, scale, name, args.batch, device) for name in OPTIMIZERS}
                peak = {}
                for case in cases.values():
                    for _ in range(args.warmup):
                        case.step(record=False)
                for _ in range(args.steps):  # interleaved: a busy machine slows both alike
                    for name, case in cases.items():
                        if use_cuda:
                            torch.cuda.reset_peak_memory_stats(device)
                        case.step()
                        if use_cuda:
                            peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
                base = statistics.median(cases["rowwise_adagrad"].steps)
                for name, case in cases.items():
                    step = statistics.median(case.steps)
                    line = (
                        f"{vocab:<7} {sum(f.cardinality for f in fields):>9,} {scale:>4} {name:<16} {step * 1e3:>8.1f} "
                        f"{statistics.median(case.opt_steps) * 1e3:>7.1f} {case.embedding_bytes() / MIB:>8.1f}"
                    )
                    print(line + (f" {peak[name] / MIB:>9.1f}" if use_cuda else "") + f" {step / base:>9.2f}x", flush=True)
                del cases
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
