"""The pipeline: generate -> preprocess -> train -> collapse monitor -> export, through torchx.

    python -m pipelines.run --config configs/pipelines/demo.yaml [--scheduler local_cwd|kubernetes]
                            [--from STAGE] [--dryrun] [--set key=value ...]

Each stage is one torchx job built by a component of ``pipelines/components.py`` and run
by torchx's ``Runner`` on the chosen scheduler; each writes one output under the
pipeline's ``root`` (a path or an fsspec URL, e.g. ``s3://bucket/pipelines/demo``), which
the next stage reads::

    ROOT/raw.tsv        generate      (only when generate.rows > 0; else preprocess.input)
    ROOT/dataset/       preprocess    done when schema.json exists
    ROOT/train/         train         done when summary.json exists (an unfinished run resumes)
    ROOT/collapse/      collapse      done when collapse.json exists
    ROOT/artifact/      export        done when MANIFEST.json exists

A finished stage is skipped, so rerunning after a failure resumes at the first unfinished
stage; ``--from STAGE`` removes that stage's output and the later ones first. The first
failing stage stops the pipeline with the tail of its logs. ``--dryrun`` prints what each
stage would ask the scheduler for (for ``kubernetes``: the Volcano jobs) and runs nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torchx import specs
from torchx.runner import Runner, get_runner

from pipelines import components
from trainer import typed_yaml
from trainer.cli_help import HelpFormatter, description
from trainer.errors import UserError, run_cli
from trainer.run_dir import SUMMARY, SUMMARY_TEXT, RunDir
from trainer.storage import filesystem, join

log = logging.getLogger("pipelines.run")

SCHEDULERS = ("local_cwd", "kubernetes")
STAGES = ("generate", "preprocess", "train", "collapse", "export")
LOG_TAIL_LINES = 40
_ERROR_LINE = re.compile(r"^\[[^\]]*\] (?:\[\d+\]:)?(error: .*)$")  # "error: ..." of run_cli, maybe behind torchrun's "[rank]:"


@dataclass(frozen=True)
class GenerateStage:
    """Synthetic Criteo-format rows (the embedded default data); ``rows: 0`` skips the stage."""

    rows: int = 0
    cardinality_scale: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class PreprocessStage:
    """``input``: the raw file(s), a path or glob (default: the generated ``ROOT/raw.tsv``, or
    the spec's ``input.paths``); ``spec``: a dataset spec file instead of the shipped
    ``dataset``; ``workers``: replicas of the preprocess job, sharing the input files out."""

    input: str = ""
    dataset: str = "criteo"
    spec: str = ""
    min_count: int | None = None
    on_bad_rows: str = "fail"
    workers: int = 1


@dataclass(frozen=True)
class TrainStage:
    """``config``: the trainer config; ``overrides``: ``--set`` values on top (``data.path``
    and ``run.dir`` are the pipeline's); ``j``: torchx's ``[min:]NxP`` hosts x processes."""

    config: str = "configs/synthetic_me.yaml"
    overrides: list[str] = field(default_factory=list)
    j: str = "1x2"
    gpu: int = 0
    cpu: int = 8
    memMB: int = 8192
    max_retries: int = 0


@dataclass(frozen=True)
class CollapseStage:
    enabled: bool = True


@dataclass(frozen=True)
class ExportStage:
    enabled: bool = True
    quantize: str = "none"


@dataclass(frozen=True)
class PipelineConfig:
    """``root``: where every stage writes; ``run_id``: the ``run`` label of pushed metrics
    (default: the root's last path part); ``pushgateway``: HOST:PORT for training and
    collapse metrics (default ``$CTR_PUSHGATEWAY``); ``image``, ``mounts`` and
    ``scheduler_args`` (e.g. ``{namespace: ctr, queue: ctr}``) apply to cluster schedulers."""

    root: str
    run_id: str = ""
    scheduler: str = "local_cwd"
    scheduler_args: dict[str, str] = field(default_factory=dict)
    image: str = components.IMAGE
    mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    pushgateway: str = ""
    generate: GenerateStage = field(default_factory=GenerateStage)
    preprocess: PreprocessStage = field(default_factory=PreprocessStage)
    train: TrainStage = field(default_factory=TrainStage)
    collapse: CollapseStage = field(default_factory=CollapseStage)
    export: ExportStage = field(default_factory=ExportStage)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"scheduler {self.scheduler!r}: expected one of {list(SCHEDULERS)}")
        if not self.root:
            raise UserError("root: the pipeline's output location is required")
        if self.generate.rows < 0:
            raise UserError(f"generate.rows {self.generate.rows}: expected 0 (skip) or a positive count")
        if self.generate.rows == 0 and not self.preprocess.input and not self.preprocess.spec:
            raise UserError("preprocess.input: the raw file to preprocess is required when generate.rows is 0")
        if self.preprocess.workers < 1:
            raise UserError(f"preprocess.workers {self.preprocess.workers}: expected 1 or more")
        if self.export.quantize not in ("none", "int8"):
            raise UserError(f"export.quantize {self.export.quantize!r}: expected none or int8")
        reserved = [o for o in self.train.overrides if o.split("=", 1)[0].strip() in ("data.path", "run.dir")]
        if reserved:
            raise UserError(f"train.overrides {reserved}: data.path and run.dir are set by the pipeline")


@dataclass(frozen=True)
class Stage:
    name: str
    output: str  # what the stage writes
    done_marker: str  # the file whose presence means the stage finished
    app: Callable[[], specs.AppDef]
    sidecars: tuple[str, ...] = ()  # more files it writes beside ``output`` (removed with it)


def outputs(config: PipelineConfig) -> dict[str, str]:
    root = config.root.rstrip("/")
    return {
        "generate": join(root, "raw.tsv"),
        "preprocess": join(root, "dataset"),
        "train": join(root, "train"),
        "collapse": join(root, "collapse"),
        "export": join(root, "artifact"),
    }


def _local(url: str) -> str:
    """Local paths absolute (the jobs run in other working directories); URLs as they are."""
    return url if "://" in url else os.path.abspath(url)


def build_stages(config: PipelineConfig) -> list[Stage]:
    """The stages to run, in order, each with the AppDef that runs it."""
    out = {name: _local(url) for name, url in outputs(config).items()}
    run_id = config.run_id or config.root.rstrip("/").rsplit("/", 1)[-1]
    pushgateway = config.pushgateway or os.environ.get("CTR_PUSHGATEWAY", "")
    common: dict[str, Any] = {"image": config.image, "env": dict(config.env), "mounts": list(config.mounts) or None}
    raw = out["generate"] if config.generate.rows else _local(config.preprocess.input) if config.preprocess.input else None
    g, p, t, e = config.generate, config.preprocess, config.train, config.export
    stages = []
    if g.rows:
        stages.append(Stage("generate", out["generate"], out["generate"] + ".oracle.json", lambda: components.generate(
            rows=g.rows, output=out["generate"], cardinality_scale=g.cardinality_scale, seed=g.seed, **common),
            sidecars=(out["generate"] + ".oracle.json", out["generate"] + ".truth.parquet")))
    stages.append(Stage("preprocess", out["preprocess"], join(out["preprocess"], "schema.json"), lambda: components.preprocess(
        input=raw, output=out["preprocess"], dataset=p.dataset, spec=_local(p.spec) if p.spec else None,
        min_count=p.min_count, on_bad_rows=p.on_bad_rows, workers=p.workers, **common)))
    stages.append(Stage("train", out["train"], join(out["train"], SUMMARY), lambda: components.train(
        *t.overrides, config=t.config, data=out["preprocess"], run_dir=out["train"], j=t.j, gpu=t.gpu, cpu=t.cpu,
        memMB=t.memMB, max_retries=t.max_retries, run_id=run_id, pushgateway=pushgateway or None, **common)))
    if config.collapse.enabled:
        stages.append(Stage("collapse", out["collapse"], join(out["collapse"], "collapse.json"), lambda: components.collapse_monitor(
            checkpoint=out["train"], output=out["collapse"], pushgateway=pushgateway or None, run_id=run_id, **common)))
    if e.enabled:
        stages.append(Stage("export", out["export"], join(out["export"], "MANIFEST.json"), lambda: components.export(
            checkpoint=out["train"], output=out["export"], quantize=e.quantize, **common)))
    return stages


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def remove(stage: Stage) -> None:
    """Delete what ``stage`` wrote."""
    for url in (stage.output, *stage.sidecars):
        fs, path = filesystem(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def run_stage(runner: Runner, stage: Stage, config: PipelineConfig, follow: bool = True) -> None:
    """Run one stage to completion (``follow``: echo its log as it runs, ``[stage]``-prefixed,
    to stderr); UserError with what it said if it does not succeed."""
    app = stage.app()
    started = time.monotonic()
    try:
        handle = runner.run(app, config.scheduler, cfg=_scheduler_cfg(config))
    except Exception as e:  # noqa: BLE001 - the scheduler's client raises anything (no cluster config, RBAC, ...)
        raise UserError(f"stage {stage.name}: cannot submit it to {config.scheduler} ({type(e).__name__}: {e})") from None
    log.info("stage %s: started %s", stage.name, handle)
    if follow:
        threading.Thread(target=_follow, args=(runner, handle, app, stage.name), daemon=True).start()
    status = runner.wait(handle, wait_interval=1)
    seconds = time.monotonic() - started
    if status is None or status.state != specs.AppState.SUCCEEDED:
        state = status.state.name if status else "UNKNOWN"
        said, tail = _log_report(runner, handle, app)
        where = f"full logs in {_scheduler_cfg(config)['log_dir']}" if config.scheduler == "local_cwd" else f"torchx log {handle}"
        raise UserError(
            f"stage {stage.name} {state.lower()} after {seconds:.0f}s ({handle}); the pipeline stops here.\n"
            + (f"it said:\n{said}\n" if said else f"last lines of its log:\n{tail}\n")
            + f"{where}; fix the cause and rerun the same command: finished stages are skipped"
        )
    if not exists(stage.done_marker):
        raise UserError(f"stage {stage.name} succeeded but wrote no {stage.done_marker}")
    log.info("stage %s: done in %.0fs -> %s", stage.name, seconds, stage.output)


def _follow(runner: Runner, handle: str, app: specs.AppDef, name: str) -> None:
    """Echo the first replica's log while the job runs (best effort: a log that cannot be
    tailed only costs the echo)."""
    role = app.roles[0].name
    try:
        for line in runner.log_lines(handle, role, 0, should_tail=True):
            print(f"[{name}] {line.rstrip()}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - the job's outcome is reported by run_stage, not here
        pass


def _scheduler_cfg(config: PipelineConfig) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(config.scheduler_args)
    if config.scheduler == "local_cwd" and "log_dir" not in cfg and "://" not in config.root:
        cfg["log_dir"] = os.path.abspath(join(config.root, "logs"))  # kept (torchx's default is a temp dir)
    return cfg


def _log_report(runner: Runner, handle: str, app: specs.AppDef) -> tuple[str, str]:
    """(the ``error: ...`` lines our CLIs print, the last lines of the log) of a finished job."""
    lines: list[str] = []
    for role in app.roles:
        for replica in range(role.num_replicas):
            try:
                lines += [f"[{role.name}/{replica}] {line.rstrip()}" for line in runner.log_lines(handle, role.name, replica)]
            except Exception as e:  # logs are best effort: the failure itself is what we report
                lines.append(f"[{role.name}/{replica}] (no logs: {type(e).__name__}: {e})")
    said = list(dict.fromkeys(m.group(1) for m in map(_ERROR_LINE.search, lines) if m))
    return "\n".join(f"  {line}" for line in said), "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty)"


def run_pipeline(config: PipelineConfig, start_from: str | None = None, dryrun: bool = False) -> list[str]:
    """Run (or dry-run) the pipeline; returns the names of the stages run."""
    stages = build_stages(config)
    names = [s.name for s in stages]
    if start_from is not None and start_from not in names:
        raise UserError(f"--from {start_from!r}: this pipeline's stages are {names}")
    if config.scheduler == "local_cwd":  # the jobs run the venv's python, torchrun and torchx
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    ran: list[str] = []
    with get_runner() as runner:
        if dryrun:
            for stage in stages:
                info = runner.dryrun(stage.app(), config.scheduler, cfg=_scheduler_cfg(config))
                print(f"--- stage {stage.name} -> {stage.output}\n{info}\n")
            return []
        if start_from is not None:
            for stage in stages[names.index(start_from):]:
                log.info("--from %s: removing %s", start_from, stage.output)
                remove(stage)
        for i, stage in enumerate(stages, 1):
            if exists(stage.done_marker):
                log.info("[%d/%d] %s: already done (%s), skipped", i, len(stages), stage.name, stage.output)
                continue
            log.info("[%d/%d] %s -> %s", i, len(stages), stage.name, stage.output)
            run_stage(runner, stage, config)
            ran.append(stage.name)
    return ran


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.run", description=description(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--config", required=True, help="the pipeline YAML (see configs/pipelines/)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="override the config's scheduler")
    p.add_argument("--from", dest="start_from", choices=STAGES, help="rerun from this stage (its output and later ones are removed)")
    p.add_argument("--dryrun", action="store_true", help="print each stage's scheduler request; run nothing")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config values, e.g. train.j=2x8")
    a = p.parse_args(argv)
    overrides = list(a.set) + ([f"scheduler={a.scheduler}"] if a.scheduler else [])
    config = typed_yaml.load(PipelineConfig, a.config, overrides)
    started = time.monotonic()
    ran = run_pipeline(config, a.start_from, a.dryrun)
    if a.dryrun:
        return
    out = outputs(config)
    summary = RunDir(out["train"]).read_text(SUMMARY_TEXT)
    if summary is not None:
        print("\n" + summary)
    print(f"pipeline done in {time.monotonic() - started:.0f}s (ran: {', '.join(ran) or 'nothing, all stages were done'})")
    for name in STAGES:
        if exists(out[name]):
            print(f"  {name:10} {out[name]}")


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
