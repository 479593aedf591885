"""The training recipe: build, shard, train with ``TrainPipelineSparseDist``,
evaluate, checkpoint, stop early, test the best checkpoint, summarise.

Every rank runs the same code. Training is cut into segments that end where
something happens (an evaluation, a checkpoint, the end of an epoch): the
pipeline drains at each segment end, so the data position saved in a
checkpoint is exactly the number of batches p.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from trainer import checkpoint, dcp_io
from trainer.collapse.sharded_tables import analyze_sharded_model
from trainer.data.loader import CTRDataLoader, LoaderConfig
from trainer.data.schema import LABEL_COLUMN, DatasetSchema, read_schema
from trainer.dist_context import DistContext
from trainer.embedding_optim import apply_embedding_optimizer, combined_optimizer, embedding_optimizer
from trainer.errors import UserError
from trainer.eval_metrics import binary_metrics, gather, undefined_metrics
from trainer.job_config import TrainConfig, check_recipe_data, recipe_departures, recipe_warnings
from trainer.model.ctr_model import MultiEmbeddingCTR, TrainModule
from trainer.plan_table import render_plan
from trainer.run_dir import RunDir
from trainer.sharding import check_device_support, plan_sharding, shard_model
from trainer.storage import filesystem
from trainer.table_layout import SPARSE_ARCH_PREFIX
from trainer.telemetry import Telemetry
from trainer.tracking import RunTracking

log = logging.getLogger("trainer")


@dataclass
class Progress:
    """Where training is; saved in every checkpoint's meta."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0  # optimizer steps so far
    examples: int = 0  # training rows so far, all ranks
    train_seconds: float = 0.0
    best_val_auc: float = -math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    last_eval_step: int = -1  # the step of the latest validation
    monitor_seconds: float = 0.0  # time spent on collapse monitoring (not in train_seconds)
    batch_size: int = 0  # per-rank batch size the position was counted in (0: written before it was recorded)
    world_size: int = 1


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one step on one rank: dropout draws are a function of (seed, rank,
    step), so a resumed run draws what the uninterrupted run drew, with no RNG state to carry."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def model_identity(config: TrainConfig, schema: DatasetSchema) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this job's model, as plain JSON data
    (tuples as lists), the form it takes in a checkpoint's meta.json."""
    embedding = dataclasses.asdict(config.embedding)
    if embedding.get("data_type") == "fp32":
        del embedding["data_type"]  # the default: identities (checkpoints) written before the key existed still match
    del embedding["init"]  # the initial values: a checkpoint replaces them
    identity = {
        "model": dataclasses.asdict(config.model),
        "embedding": embedding,
        "fields": [[f.name, f.cardinality] for f in schema.sparse_fields],
    }
    pooling = {f.name: f.pooling for f in schema.sparse_fields if f.pooling != "sum"}
    if pooling:  # only then: identities (checkpoints) written before multi-hot fields still match
        identity["pooling"] = pooling
    return json.loads(json.dumps(identity))


def dataset_record(path: str, schema: DatasetSchema) -> dict[str, Any]:
    """What a checkpoint records of its training data (``meta.json`` ``dataset``): where it was,
    and its schema's facts (fields with their max_length and pooling, dense fields, split rows,
    the recipe that made it, e.g. the dataset spec), for an export that no longer finds the data."""
    record = json.loads(schema.to_json())
    record["splits"] = {name: {"rows": s.rows} for name, s in schema.splits.items()}
    return {"path": path, "schema": record}


def autocast_dense(model: MultiEmbeddingCTR, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
    """Run the dense part of ``model``'s forward (``forward_embeddings``: interactions,
    projections, tail) under ``torch.autocast(device.type, dtype)``; the embedding lookup
    before it is left as the tables store it, and the logits come back as float32 for the
    loss. The weights and the optimizers stay float32 (autocast casts per op)."""
    dense = model.forward_embeddings

    def forward_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=dtype):
            logits = dense(embeddings)
        return logits.float()

    model.forward_embeddings = forward_embeddings  # type: ignore[method-assign]


def cpu_threads(local_world_size: int) -> int:
    """Intra-op threads of one CPU rank: ``$CTR_CPU_THREADS`` when set (the sweep gives each of
    its parallel cells its share), else the cores this process may use (its affinity: a cpuset
    or ``taskset`` counts) divided by this host's ranks; at least 1."""
    explicit = os.environ.get("CTR_CPU_THREADS", "").strip()
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise UserError(f"CTR_CPU_THREADS={explicit!r}: expected a positive integer (threads per rank)")
        return int(explicit)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size)


class Trainer:
    def __init__(self, config: TrainConfig, ctx: DistContext, run_dir: RunDir):
        self.config = config
        self.ctx = ctx
        self.run_dir = run_dir
        self.schema = read_schema(config.data.path)
        for split in ("train", "val", "test"):
            if self.schema.splits.get(split, None) is None or self.schema.splits[split].rows == 0:
                raise UserError(f"{config.data.path}: the dataset has no {split!r} rows")
        check_recipe_data(config, str(self.schema.recipe.get("train_order", "file")), config.data.path)
        if ctx.device.type == "cpu":
            torch.set_num_threads(cpu_threads(ctx.local_world_size))
        self.identity = model_identity(config, self.schema)
        self.progress = Progress(world_size=ctx.world_size, batch_size=config.train.batch_size)
        self._last_collapse_step = -1
        self._clock: _TrainClock | None = None  # set by fit(): progress against the run's total steps
        m = config.monitoring
        self.run_id = m.run_id or os.environ.get("CTR_RUN_ID") or run_dir.name
        self.telemetry = (
            Telemetry(self.run_id, m.pushgateway or os.environ.get("CTR_PUSHGATEWAY", ""), m.metrics_port,
                      metrics_address=m.metrics_address)
            if ctx.is_main
            else None
        )
        # TensorBoard and torchx trackers (MLflow): built on every rank, as a tracker's set-up may be collective
        self.tracking = RunTracking(m, run_dir, self.run_id, ctx.is_main)
        self._build()

    # ---- construction -----------------------------------------------------------------

    def _build(self) -> None:
        c, ctx = self.config, self.ctx
        # what the device cannot run is refused before anything is read, planned or written
        check_device_support(c, ctx.device)
        if ctx.is_main:
            for key, value, preset in recipe_departures(c):
                log.info("recipe %s: %s is %r as configured (the recipe's value: %r)", c.recipe, key, value, preset)
            for note in recipe_warnings(c, ctx.world_size):
                log.warning("%s", note)
        # the loaders first: they check the data's ids against the schema before anything is built
        self.train_loader = self._loader("train", shuffle=True)
        self.eval_loaders = {s: self._loader(s, shuffle=False) for s in ("val", "test")}
        if ctx.is_main:
            self._warn_single_class_splits()
        model = MultiEmbeddingCTR.from_config(
            self.schema.sparse_fields, c.model, c.embedding, seed=c.train.seed, table_device=torch.device("meta")
        )
        if c.train.dense_autocast == "bf16":
            autocast_dense(model, ctx.device)
        module = TrainModule(model)
        emb_opt = embedding_optimizer(
            c.optim.embedding, ctx.device, lr=c.optim.embedding_lr, eps=c.optim.eps, weight_decay=c.optim.weight_decay
        )
        if emb_opt.dropped_weight_decay and ctx.is_main:
            log.warning(
                "optim.weight_decay %g applies to the dense layers only: FBGEMM's %s embedding kernels have no weight decay",
                emb_opt.dropped_weight_decay, ctx.device.type,
            )  # fmt: skip
        apply_embedding_optimizer(module, emb_opt)
        pg = torch.distributed.group.WORLD
        plan = plan_sharding(
            module, c.sharding, ctx.world_size, ctx.device, c.train.batch_size, pg, ctx.local_world_size,
            replicate_tables=emb_opt.dense,
        )  # fmt: skip
        # written by main once a resumed checkpoint is known to fit (a refused resume leaves the run dir as it was)
        self.plan_text = render_plan(plan, model.sparse_arch.tables, ctx.world_size)
        self.model = shard_model(module, plan, ctx.device, pg)
        self.optimizer = combined_optimizer(
            self.model,
            emb_opt,
            # fused: one pass per tensor (CPU and CUDA kernels); the for-loop Adam's formula, last-bit rounding aside
            lambda params: torch.optim.Adam(params, lr=c.optim.dense_lr, weight_decay=c.optim.weight_decay, fused=True),
        )
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, ctx.device, execute_all_batches=True)

    def _loader(self, split: str, shuffle: bool) -> CTRDataLoader:
        c = self.config
        return CTRDataLoader(
            c.data.path,
            split,
            LoaderConfig(
                batch_size=c.train.batch_size,
                shuffle=shuffle,
                seed=c.train.seed,
                shuffle_window_rows=c.data.shuffle_window_rows,
            ),
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    def _warn_single_class_splits(self) -> None:
        """Warn when every label of a split is the same (from the parquet statistics)."""
        effects = {
            "train": "training learns nothing useful from it",
            "val": "validation AUC is undefined: the first evaluation stays the best checkpoint and early "
            "stopping comes after train.patience more evaluations",
            "test": "test AUC is undefined",
        }
        for split, loader in (("train", self.train_loader), *self.eval_loaders.items()):
            found = loader.column_range(LABEL_COLUMN)
            if found is not None and found[0] == found[1]:
                log.warning("every label of the %s split is %d: %s", split, found[0], effects[split])

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    # ---- checkpoints --------------------------------------------------------------------

    def save(self) -> None:
        self._sync_buffers()
        self._check_finite_weights()
        meta = {
            "progress": dataclasses.asdict(self.progress),
            "identity": self.identity,
            "embedding_optimizer": self.config.optim.embedding,
            "dataset": dataset_record(self.config.data.path, self.schema),
        }
        url = dcp_io.save(self.run_dir.checkpoints, self.progress.step, self._state(), meta)
        keep = {self.progress.step, self.progress.best_step}
        dcp_io.prune(self.run_dir.checkpoints, keep)
        if self.ctx.is_main:
            log.info("checkpoint %s", url)

    def _sync_buffers(self) -> None:
        """Average the dense buffers (BatchNorm running statistics) over ranks.

        TorchRec's DDP wrapper does not broadcast buffers, so every rank's running statistics
        follow its own batches: without this, a 2-rank evaluation mixes two sets of statistics,
        and a checkpoint (which keeps one rank's copy) resumes the ranks differently from how
        they were. The running-average update is affine with the same weight on every rank,
        so averaging now or at the end gives the same result: evaluations do not depend on
        when checkpoints were taken."""
        if self.ctx.world_size == 1:
            return
        buffers = [  # the dense model's only: the same list, in the same order, on every rank
            b for name, b in self.model.named_buffers()
            if SPARSE_ARCH_PREFIX not in name and type(b) is torch.Tensor and b.is_floating_point() and b.numel()
        ]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
        torch.distributed.all_reduce(flat)
        flat /= self.ctx.world_size
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def _check_finite_weights(self) -> None:
        """Refuse to checkpoint NaN/inf weights: an update can blow the weights up after the
        step's (finite) loss was computed, and such a checkpoint is not a good one to resume."""
        bad = 0
        for value in self.model.state_dict().values():
            if isinstance(value, ShardedTensor):
                parts = [shard.tensor for shard in value.local_shards()]
            elif isinstance(value, DTensor):
                parts = [value.to_local()]
            elif isinstance(value, torch.Tensor):
                parts = [value]
            else:
                continue
            bad += sum(int(not torch.isfinite(t).all()) for t in parts if t.is_floating_point())
        if self.ctx.all_reduce_sum([bad])[0]:
            p = self.progress
            last = checkpoint.list_checkpoints(self.run_dir.checkpoints)
            kept = f"the last good checkpoint is {last[-1].url}" if last else "no checkpoint was written yet"
            raise UserError(
                f"model weights became NaN/inf by step {p.step} (epoch {p.epoch}); stopped without saving: {kept}. "
                "Lower optim.embedding_lr / optim.dense_lr or check the data."
            )

    def restore(self, url: str, restore_progress: bool = True) -> None:
        """Load a checkpoint into the model and optimizers (resharding if it was written by
        another world size) and, for a resume, continue from its position."""
        meta = checkpoint.read_meta(url)
        if meta.get("identity") != self.identity:
            raise UserError(
                f"checkpoint {url} was written for another model or dataset:\n"
                f"  checkpoint: {_describe(meta.get('identity'))}\n  this job:   {_describe(self.identity)}"
            )
        saved_optimizer = meta.get("embedding_optimizer")  # absent from checkpoints written before it was recorded
        if saved_optimizer and saved_optimizer != self.config.optim.embedding:
            raise UserError(
                f"checkpoint {url} was trained with optim.embedding={saved_optimizer} and this job has "
                f"optim.embedding={self.config.optim.embedding}: the embedding optimizer's state cannot carry over. "
                f"Resume with optim.embedding={saved_optimizer}, or train into a new run.dir"
            )
        self.optimizer.init_state()  # optimizer state is lazy: create it so DCP can load into it
        state = self._state()
        dcp_io.load(url, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        if not restore_progress:
            return
        saved = Progress(**meta["progress"])
        batch_size = self.config.train.batch_size
        saved_batch_size = saved.batch_size or batch_size
        if saved.world_size != self.ctx.world_size or saved_batch_size != batch_size:
            # the epoch's data order depends on world size and batch size: continue at the same share of the epoch
            done = saved.step_in_epoch * saved_batch_size * saved.world_size
            saved.step_in_epoch = min(done // (batch_size * self.ctx.world_size), len(self.train_loader))
            log.warning(
                "resuming a %d-rank checkpoint on %d ranks: the tables are resharded; epoch %d continues at step %d "
                "(the same share of the epoch, not the same rows)",
                meta["progress"]["world_size"],
                self.ctx.world_size,
                saved.epoch,
                saved.step_in_epoch,
            )
            saved.world_size, saved.batch_size = self.ctx.world_size, batch_size
        kept = {c.step for c in checkpoint.list_checkpoints(self.run_dir.checkpoints)}
        if not self._in_run_dir(url) or saved.best_step not in kept:
            # its best checkpoint is in another run directory or gone (pruned later): track the best afresh
            saved.best_val_auc, saved.best_step, saved.evals_without_improvement = -math.inf, -1, 0
            saved.last_eval_step = -1
        self.progress = saved
        if self.ctx.is_main:
            log.info("resumed from %s at epoch %d, step %d", url, saved.epoch, saved.step)

    def _in_run_dir(self, url: str) -> bool:
        parent = posixpath.dirname(posixpath.normpath(filesystem(url)[1]))
        return parent == posixpath.normpath(filesystem(self.run_dir.checkpoints)[1])

    # ---- training -----------------------------------------------------------------------

    def _boundaries(self, steps_per_epoch: int) -> Iterator[int]:
        """Steps within the epoch after which training pauses (to evaluate or checkpoint)."""
        t = self.config.train
        every = [n for n in (t.eval_every_steps, t.checkpoint_every_steps) if n]
        epoch_start = self.progress.step - self.progress.step_in_epoch
        stops = {steps_per_epoch}
        for n in every:
            stops |= {s - epoch_start for s in range(n * (epoch_start // n + 1), epoch_start + steps_per_epoch, n)}
        if t.max_steps:
            stops.add(min(steps_per_epoch, max(t.max_steps - epoch_start, 0)))
        return iter(sorted(s for s in stops if s > self.progress.step_in_epoch))

    def fit(self) -> None:
        t, p = self.config.train, self.progress
        self.tracking.start(self.config, p.step)  # rank 0: params; TensorBoard hides a crashed attempt's steps after p.step
        steps_per_epoch = len(self.train_loader)
        total = t.epochs * steps_per_epoch
        self._clock = _TrainClock(start_step=p.step, total_steps=min(total, t.max_steps) if t.max_steps else total)
        if self.ctx.is_main:
            log.info(
                "training: %d epochs x %d steps, batch %d per rank x %d ranks",
                t.epochs,
                steps_per_epoch,
                t.batch_size,
                self.ctx.world_size,
            )
        while p.epoch < t.epochs and not self._should_stop():
            self.train_loader.set_epoch(p.epoch)
            batches = self.train_loader.iter_from(p.step_in_epoch)
            for stop in self._boundaries(steps_per_epoch):
                self._train_segment(itertools.islice(batches, stop - p.step_in_epoch))
                end_of_epoch = p.step_in_epoch == steps_per_epoch
                if end_of_epoch or (t.eval_every_steps and p.step % t.eval_every_steps == 0) or self._at_max_steps():
                    self._evaluate_and_track()
                    self.save()
                elif t.checkpoint_every_steps and p.step % t.checkpoint_every_steps == 0:
                    self.save()
                if self._should_stop():
                    break
            if p.step_in_epoch == steps_per_epoch:
                p.epoch += 1
                p.step_in_epoch = 0

    def _at_max_steps(self) -> bool:
        return bool(self.config.train.max_steps) and self.progress.step >= self.config.train.max_steps

    def _should_stop(self) -> bool:
        return self._at_max_steps() or self.progress.evals_without_improvement >= self.config.train.patience

    def _train_segment(self, batches: Iterator[Batch]) -> None:
        t, p, ctx = self.config.train, self.progress, self.ctx
        self.model.train()
        window_loss, window_steps, window_rows, window_nan, window_start = 0.0, 0, 0, 0, time.perf_counter()
        segment_start, monitor_before = window_start, p.monitor_seconds
        while True:
            torch.manual_seed(step_seed(t.seed, ctx.rank, p.step))
            try:
                loss, _, labels = self.pipeline.progress(batches)
            except StopIteration:
                break
            p.step += 1
            p.step_in_epoch += 1
            value = float(loss)
            window_nan += int(not math.isfinite(value))
            window_loss += value
            window_steps += 1
            window_rows += labels.numel()
            every = self.config.monitoring.collapse_every_steps
            if every and p.step % every == 0:
                self.monitor_collapse()
            if p.step % t.log_every_steps == 0:
                self._log_window(window_loss, window_steps, window_rows, window_nan, time.perf_counter() - window_start)
                window_loss, window_steps, window_rows, window_nan, window_start = 0.0, 0, 0, 0, time.perf_counter()
        if window_steps:
            self._log_window(window_loss, window_steps, window_rows, window_nan, time.perf_counter() - window_start)
        p.train_seconds += time.perf_counter() - segment_start - (p.monitor_seconds - monitor_before)

    def _log_window(self, loss: float, steps: int, rows: int, nan: int, seconds: float) -> None:
        """Combine a window of steps over ranks: log, record, and stop on a NaN loss."""
        p = self.progress
        loss, steps, rows, nan = self.ctx.all_reduce_sum([loss, steps, rows, nan])
        p.examples += int(rows)
        if nan:
            last = checkpoint.list_checkpoints(self.run_dir.checkpoints)
            kept = f"the last good checkpoint is {last[-1].url}" if last else "no checkpoint was written yet"
            raise UserError(
                f"training loss became NaN/inf by step {p.step} (epoch {p.epoch}); stopped without saving: {kept}. "
                "Lower optim.embedding_lr / optim.dense_lr or check the data."
            )
        record = {
            "kind": "train",
            "step": p.step,
            "epoch": p.epoch,
            "loss": loss / steps,
            "examples_per_sec": rows / max(seconds, 1e-9),
            "time": time.time(),
        }
        if self.telemetry:
            self.telemetry.record_train(p.step, record["loss"], int(rows), record["examples_per_sec"])
        if self.ctx.is_main:
            self.run_dir.append_metrics(record)
            self.tracking.record_train(record)
            clock = self._clock or _TrainClock(start_step=p.step, total_steps=p.step)
            log.info(
                "epoch %d step %d/%d (%d%%)  loss %.4f  %s ex/s  %s",
                p.epoch,
                p.step,
                clock.total_steps,
                100 * p.step // max(clock.total_steps, 1),
                record["loss"],
                f"{record['examples_per_sec']:,.0f}",
                clock.describe(p.step),
            )

    # ---- evaluation ---------------------------------------------------------------------

    def evaluate(self, split: str) -> dict[str, float]:
        """Exact metrics of ``split`` over all its rows (every rank scores its part)."""
        start = time.perf_counter()
        logits, labels = self.score(split)
        metrics = binary_metrics(logits, labels)
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    def score(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels, (N,) each, of every row of ``split`` in the split's row order
        (unshuffled loaders: rank r holds the r-th contiguous part, gathered in rank order)."""
        loader = self.eval_loaders[split]
        self._sync_buffers()
        self.model.eval()
        logits, labels = [], []
        batches = iter(loader)
        with torch.no_grad():
            while True:
                try:
                    _, batch_logits, batch_labels = self.pipeline.progress(batches)
                except StopIteration:
                    break
                logits.append(batch_logits)
                labels.append(batch_labels)
        self.model.train()
        all_logits = gather(torch.cat(logits).float())
        all_labels = gather(torch.cat(labels).float())
        if len(all_logits) != loader.num_rows:
            raise RuntimeError(f"evaluated {len(all_logits)} rows of {split}, expected {loader.num_rows}")
        return all_logits, all_labels

    def _evaluate_and_track(self) -> None:
        p = self.progress
        metrics = self.evaluate("val")
        self.monitor_collapse()
        improved = metrics["auc"] > p.best_val_auc or p.best_step < 0  # the first evaluation is the best so far
        p.last_eval_step = p.step
        if improved:
            p.best_val_auc, p.best_step, p.evals_without_improvement = metrics["auc"], p.step, 0
        else:
            p.evals_without_improvement += 1
        if self.telemetry:
            self.telemetry.record_validation(metrics["auc"], metrics["logloss"], metrics["ne"])
        if self.ctx.is_main:
            record = {"kind": "val", "step": p.step, "epoch": p.epoch, **metrics, "time": time.time()}
            self.run_dir.append_metrics(record)
            self.tracking.record_validation(record)
            log.info(
                "validation at step %d: AUC %.5f logloss %.5f NE %.5f (%s)",
                p.step,
                metrics["auc"],
                metrics["logloss"],
                metrics["ne"],
                "best so far" if improved else f"no better for {p.evals_without_improvement} evaluation(s)",
            )

    # ---- collapse monitoring --------------------------------------------------------------

    def monitor_collapse(self) -> None:
        """IA and set diversity of every field, from the live sharded tables (collective: each
        rank reduces its own shards, only Gram matrices cross the wire). Rank 0 records them in
        ``collapse.jsonl`` and exports them."""
        if self._last_collapse_step == self.progress.step:  # an evaluation step that is also a monitoring step
            return
        self._last_collapse_step = self.progress.step
        start = time.perf_counter()
        report = analyze_sharded_model(
            self.model, dst=0, step=self.progress.step, label=self.run_id, embedding=dataclasses.asdict(self.config.embedding)
        )
        seconds = time.perf_counter() - start
        self.progress.monitor_seconds += seconds
        if report is None:  # not rank 0
            return
        record = {
            "step": self.progress.step,
            "seconds": seconds,
            "fields": {
                f.field: {
                    "set_ia": f.set_ia,
                    "set_ia_ratio": f.set_ia_normalized,
                    "overall_ia": f.overall_ia,
                    "overall_ia_ratio": f.overall_ia_normalized,
                    "diversity": f.mean_diversity,
                }
                for f in report.fields
            },
        }
        self.run_dir.append_collapse(record)
        self.tracking.record_collapse(record)
        if self.telemetry:
            self.telemetry.record_collapse(report)
        ratios = {f.field: float(np.mean(f.set_ia_normalized)) for f in report.fields}
        worst = min(ratios, key=ratios.get)
        diversities = [f.mean_diversity for f in report.fields if f.mean_diversity is not None]
        log.info(
            "collapse at step %d: IA / random IA %.3f on average, lowest %.3f (%s)%s  [%.2fs]",
            self.progress.step,
            float(np.mean(list(ratios.values()))),
            ratios[worst],
            worst,
            f", set diversity {np.mean(diversities):.3f}" if diversities else "",
            seconds,
        )

    # ---- the end --------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Test the best checkpoint and write ``summary.json`` (a metric the data leaves undefined,
        such as the AUC of a single-class split, is None there, with ``<key>_reason``)."""
        p = self.progress
        if p.last_eval_step != p.step:  # stopped by max_steps after the last evaluation (or before any)
            self._evaluate_and_track()
            self.save()
        best = checkpoint.join(self.run_dir.checkpoints, checkpoint.checkpoint_name(p.best_step))
        if p.best_step != p.step:
            self.restore(best, restore_progress=False)
        val_logits, val_labels = self.score("val")
        val = binary_metrics(val_logits, val_labels)
        test_logits, test_labels = self.score("test")
        test = binary_metrics(test_logits, test_labels)
        if self.ctx.is_main:
            self.run_dir.write_predictions(test_logits, test_labels)
        oracle = self.schema.recipe.get("oracle", {}).get("test") or {}
        summary = {
            "val_auc": val["auc"],
            "val_logloss": val["logloss"],
            "val_ne": val["ne"],
            "test_auc": test["auc"],
            "test_logloss": test["logloss"],
            "test_ne": test["ne"],
            "test_calibration": test["calibration"],
            "best_step": p.best_step,
            "best_checkpoint": best,
            "steps": p.step,
            "epochs_completed": p.epoch,
            "stopped_early": p.evals_without_improvement >= self.config.train.patience,
            "train_examples": p.examples,
            "train_seconds": p.train_seconds,
            "train_examples_per_sec": p.examples / max(p.train_seconds, 1e-9),
            "collapse_monitor_seconds": p.monitor_seconds,
            "collapse_monitor_overhead": p.monitor_seconds / max(p.train_seconds, 1e-9),
            "world_size": self.ctx.world_size,
            "device": self.ctx.device.type,
            "model": self.config.model.name,
            "embedding": f"{self.config.embedding.mode} {self.config.embedding.scale}x "
            f"({self.config.embedding.num_sets} set(s) of dim {self.config.embedding.dim})",
            "dataset": self.config.data.path,
            "oracle_test_auc": oracle.get("auc"),
            "oracle_test_logloss": oracle.get("logloss"),
        }
        reasons = {
            **{f"val_{k}": why for k, why in undefined_metrics(val_labels, "val").items()},
            **{f"test_{k}": why for k, why in undefined_metrics(test_labels, "test").items()},
        }
        for key, value in list(summary.items()):  # strict JSON has no NaN: null, and why
            if isinstance(value, float) and not math.isfinite(value):
                summary[key] = None
                summary[f"{key}_reason"] = reasons.get(key, f"not a finite number ({value})")
        if self.ctx.is_main:
            self.run_dir.write_summary(summary)
            self.tracking.finish(summary)
        if self.telemetry is not None:
            self.telemetry.record_finished()
        if self.ctx.is_main:
            from trainer.run_report import write_run_report  # matplotlib loads only when it draws

            write_run_report(self.run_dir)  # the curves and report.html, from the files just written
        return summary


@dataclass
class _TrainClock:
    """Wall-clock progress of this process's part of a run (evaluations and checkpoints
    included, as they recur), for the training log's elapsed time and ETA."""

    start_step: int  # the step fit() started at (a resumed run's checkpoint step)
    total_steps: int  # where the run ends at the latest: epochs x steps per epoch, or train.max_steps
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def describe(self, step: int) -> str:
        """``elapsed M:SS  ETA M:SS`` at ``step`` (ETA at this process's pace so far; early stopping can end sooner)."""
        elapsed = time.perf_counter() - self.started
        done, left = step - self.start_step, max(self.total_steps - step, 0)
        eta = _clock_time(elapsed / done * left) if done > 0 else "?"
        return f"elapsed {_clock_time(elapsed)}  ETA {eta}"


def _clock_time(seconds: float) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _describe(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "unknown"
    fields = identity.get("fields", [])
    return (
        f"model {identity.get('model')}, embedding {identity.get('embedding')}, "
        f"{len(fields)} fields (cardinalities {[c for _, c in fields][:6]}{'...' if len(fields) > 6 else ''})"
    )
