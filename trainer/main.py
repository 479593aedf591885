"""Train a multi-embedding CTR model: ``python -m trainer.main --config FILE [--set key=value ...]``.

The same file runs as a script for torchx and torchrun (from the repository root, with
.venv/bin on PATH; ``runs/demo/dataset`` is the dataset ``make demo`` prepared)::

    torchx run -s local_cwd dist.ddp -j 1x2 --script trainer/main.py -- --config configs/synthetic_me.yaml --set data.path=runs/demo/dataset
    torchrun --standalone --nproc-per-node 2 trainer/main.py --config configs/synthetic_me.yaml --set data.path=runs/demo/dataset

``--resume auto`` (the default) continues from the run directory's latest
complete checkpoint, so a job restarted by torchx/torchrun picks up where it
stopped; ``--resume never`` refuses a run directory that already has
checkpoints; ``--resume PATH`` starts from that checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchx --script): import the package, not siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import logging
import os
import warnings
from typing import TYPE_CHECKING

from trainer import checkpoint
from trainer.cli_help import HelpFormatter, description
from trainer.errors import UserError, run_cli
from trainer.job_config import TrainConfig, load_config
from trainer.run_dir import RunDir, format_summary
from trainer.typed_yaml import keys_help

if TYPE_CHECKING:
    from trainer.train import Trainer

log = logging.getLogger("trainer")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="trainer.main",
        description=description(__doc__),
        epilog="config keys (YAML sections; any key can be given with --set section.key=value):\n\n"
        + keys_help(TrainConfig),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", help="YAML config (see configs/); without one, every key but data.path has its default")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys: --set train.epochs=3 embedding.mode=se (torchx forbids repeating a flag)",
    )
    p.add_argument(
        "--resume", default="auto", metavar="auto|never|PATH",
        help="auto: continue from the run directory's latest checkpoint; never: refuse one that has checkpoints; "
        "PATH: start from that checkpoint",
    )  # fmt: skip
    args = p.parse_args(argv)
    _quiet_libraries()
    config = load_config(args.config, args.overrides)
    run_dir = RunDir(config.run.dir)
    run_dir.check_writable()
    # torch, torchrec and fbgemm load only now: --help and a refused config answer at once
    from trainer.dist_context import init_distributed, on_rank0, shutdown
    from trainer.plan_table import with_planner_stats
    from trainer.sharding import capture_planner_stats
    from trainer.train import Trainer

    ctx = init_distributed(config.run.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        existing = checkpoint.list_checkpoints(run_dir.checkpoints)
        if args.resume == "never" and existing:
            raise UserError(f"{run_dir.url} already has checkpoints ({existing[-1].url}); use --resume auto or another run.dir")
        with capture_planner_stats() as planner_stats:  # TorchRec's estimates, for plan.txt (rank 0 plans)
            trainer = Trainer(config, ctx, run_dir)
        if args.resume not in ("auto", "never"):
            trainer.restore(args.resume)
        elif args.resume == "auto" and existing:
            trainer.restore(existing[-1].url)

        def write_run_dir() -> None:  # only now: a refused config or checkpoint leaves the run directory as it was
            try:
                run_dir.create()
                run_dir.drop_records_after(trainer.progress.step)  # a resumed run trains (and logs) the later steps again
                run_dir.write_config(config)
                run_dir.write_plan(with_planner_stats(trainer.plan_text, planner_stats))
            except OSError as e:  # e.g. a denied write on an object store (check_writable covers local paths)
                raise UserError(f"cannot write the run directory {run_dir.url}: {e}") from None

        on_rank0(write_run_dir)
        _fault_injection(trainer)
        trainer.fit()
        summary = trainer.finish()
        if ctx.is_main:
            print(format_summary(summary, run_dir.url))
    finally:
        shutdown()


def _quiet_libraries() -> None:
    """TorchRec and FBGEMM log notes meant for their developers at WARNING on every rank
    (data-parallel caching, sharding-spec lookups): keep our own log readable. Their Python
    warnings (deprecations, FutureWarning, UserWarning) are worth seeing: rank 0 shows each
    distinct one once per run, the other ranks none (the rank is known from torchrun's
    ``RANK`` before the process group exists)."""
    for name in ("torchrec", "fbgemm_gpu", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:  # torchrec also logs through the root logger
        handler.addFilter(lambda r: r.levelno >= logging.ERROR or not any(lib in r.pathname for lib in ("/torchrec/", "/fbgemm_gpu/")))
    rank0 = os.environ.get("RANK", "0") == "0"
    for module in ("torchrec", "fbgemm_gpu", "torch"):  # a prefix: "torch" also matches torch.distributed...
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("once" if rank0 else "ignore", category=category, module=module)
    if rank0:
        _show_each_warning_once()


def _show_each_warning_once() -> None:
    """Show each distinct warning (category and text) once per process. Python's "once" forgets
    what it showed whenever the warning filters change, and torch changes them all the time
    (``warnings.catch_warnings`` around its own calls): the same deprecation would reappear."""
    show, seen = warnings.showwarning, set()

    def show_once(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings' signature)
        key = (category, str(message))
        if key not in seen:
            seen.add(key)
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_once


def _fault_injection(trainer: Trainer) -> None:
    """Test hook: ``CTR_FAIL_AT_STEP=N`` kills rank ``CTR_FAIL_RANK`` (default 1) right after its
    training step N (before a checkpoint due at N) on the first attempt of a job, to exercise
    restart-and-resume (torchrun --max-restarts, torchx --max_retries)."""
    step = os.environ.get("CTR_FAIL_AT_STEP")
    if not step or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if trainer.ctx.rank != int(os.environ.get("CTR_FAIL_RANK", "1")):
        return
    original = trainer.pipeline.progress
    fail_at = int(step)

    def failing_progress(batches):
        # wraps the training step itself, not the batch iterator: the pipeline fetches batches
        # ahead, so counting fetched batches would exit up to a segment (and a checkpoint) late
        out = original(batches)
        if trainer.model.training and trainer.progress.step + 1 >= fail_at:
            log.error("fault injection: rank %d exits at step %d", trainer.ctx.rank, trainer.progress.step + 1)
            os._exit(17)
        return out

    trainer.pipeline.progress = failing_progress


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
