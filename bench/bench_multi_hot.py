"""Training throughput with a multi-hot field against one id per row and no field (a script, not a test).

Generates the synthetic ads log (``trainer.data.synthetic --schema ads_log``), prepares it
with the shipped spec (``configs/datasets/ads_log.yaml``: ``history`` holds up to 20 ids a
row, mean-pooled), then times training steps of DCNv2 ME 2x (loader -> KJT -> pooled
lookup -> forward, backward; Adam on the dense layers, SGD on the tables) three ways:
``history`` multi-hot as prepared, ``history`` cut to its first id (one id per row, the
OOV id for none: the same model, single-valued lookups) and without ``history``,
alternating rounds of steps so that all see the same machine load. Also the loader
alone (decoding the list column into KJT lengths and values).

    python -m bench.bench_multi_hot [--rows 200000] [--batch 1024] [--rounds 15] [--steps 4]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from trainer.data.loader import CTRDataLoader


def first_id(jt: JaggedTensor) -> JaggedTensor:
    """A multi-hot field's rows cut to their first id (the OOV id for a row without ids)."""
    import torch
    from torchrec.sparse.jagged_tensor import JaggedTensor

    lengths = jt.lengths()
    first = torch.where(lengths > 0, jt.values()[(torch.cumsum(lengths, 0) - lengths).clamp(max=max(len(jt.values()) - 1, 0))], 0)
    return JaggedTensor(values=first, lengths=torch.ones_like(lengths))


class Variant:
    """One model on a subset of the fields (``single``: history as one id), stepping through
    endless training batches."""

    def __init__(self, data: str, fields: list[str], batch: int, single: bool = False):
        import torch

        from trainer.data.loader import CTRDataLoader, LoaderConfig
        from trainer.job_config import EmbeddingConfig, ModelConfig
        from trainer.model import MultiEmbeddingCTR

        loader = CTRDataLoader(data, "train", LoaderConfig(batch_size=batch))
        self.fields, self.single = fields, single
        schema_fields = [f for f in loader.schema.sparse_fields if f.name in fields]
        self.model = MultiEmbeddingCTR.from_config(schema_fields, ModelConfig("dcnv2", hidden=400), EmbeddingConfig("me", 2, 10), seed=0)
        tables = list(self.model.sparse_arch.parameters())
        dense = [p for p in self.model.parameters() if all(p is not t for t in tables)]
        self.optimizers = [torch.optim.Adam(dense, lr=1e-3), torch.optim.SGD(tables, lr=0.01)]
        self.batches = itertools.chain.from_iterable(self._epochs(loader))
        self.rates: list[float] = []  # examples/s of each round

    @staticmethod
    def _epochs(loader: CTRDataLoader):
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield loader

    def steps(self, n: int) -> None:
        from torch import nn
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        start, examples = time.perf_counter(), 0
        for _ in range(n):
            batch = next(self.batches)
            jts = {f: batch.sparse_features[f] for f in self.fields}
            if self.single:
                jts["history"] = first_id(jts["history"])
            loss = nn.functional.binary_cross_entropy_with_logits(self.model(KeyedJaggedTensor.from_jt_dict(jts)), batch.labels)
            for optimizer in self.optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in self.optimizers:
                optimizer.step()
            examples += len(batch.labels)
        self.rates.append(examples / (time.perf_counter() - start))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_multi_hot", description=description(__doc__),
                                formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, default=200_000, help="ads-log rows (7 days; days 1-5 train)")
    p.add_argument("--batch", type=int, default=1024, help="batch size")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds per variant")
    p.add_argument("--steps", type=int, default=4, help="training steps per round")
    args = p.parse_args(argv)
    import torch

    from trainer.data.dataset_spec import SHIPPED_DIR
    from trainer.data.loader import CTRDataLoader, LoaderConfig
    from trainer.data.preprocess import PreprocessConfig, preprocess
    from trainer.data.synthetic_ads_log import AdsLogConfig, generate_ads_log

    torch.set_num_threads(1)  # the cores are shared: one intra-op thread measures the step, not the waiting
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        generate_ads_log(AdsLogConfig(rows=args.rows), str(Path(tmp) / "raw"))
        data = str(Path(tmp) / "data")
        schema = preprocess(PreprocessConfig(spec=str(SHIPPED_DIR / "ads_log.yaml"), input=str(Path(tmp) / "raw" / "*.parquet"),
                                             output=data, progress=False))  # fmt: skip
        loader = CTRDataLoader(data, "train", LoaderConfig(batch_size=args.batch))
        start = time.perf_counter()
        ids = sum(int(b.sparse_features["history"].lengths().sum()) for b in loader)
        seconds = time.perf_counter() - start
        print(f"loader: {loader.num_rows:,} train rows in {seconds:.2f}s ({loader.num_rows / seconds:,.0f} rows/s), "
              f"{ids / loader.num_rows:.1f} history ids a row (max_length 20)")  # fmt: skip
        every = schema.field_names
        variants = {"history multi-hot": Variant(data, every, args.batch),
                    "history one id": Variant(data, every, args.batch, single=True),
                    "without history": Variant(data, [f for f in every if f != "history"], args.batch)}  # fmt: skip
        for v in variants.values():
            v.steps(2)  # warm-up
            v.rates.clear()
        for _ in range(args.rounds):
            for v in variants.values():
                v.steps(args.steps)
        rates = {name: float(np.median(v.rates)) for name, v in variants.items()}  # the median round: load comes and goes
        for name, rate in rates.items():
            print(f"train, {name:17} DCNv2 ME 2x10, batch {args.batch}, 1 thread: {rate:,.0f} examples/s (median of {args.rounds} rounds)")
        multi = rates["history multi-hot"]
        print(f"multi-hot / one id: {multi / rates['history one id']:.2f}; multi-hot / without: {multi / rates['without history']:.2f}")


if __name__ == "__main__":
    main()
