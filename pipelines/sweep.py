"""The paper's scaling sweep: ``python -m pipelines.sweep --spec FILE [--output DIR]``.

Trains every cell of a grid (dataset x model x SE/ME x scale x seed) through the normal
trainer CLI, one subprocess per cell (``python -m trainer.main``, or ``torchrun
--standalone`` when ``launcher.nproc > 1``), so sharding, checkpoints and collapse
monitoring come along, and writes the paper's Table 1 for it. At scale 1 single- and
multi-embedding are the same model: that cell is trained once and stands for both curves.

A spec (YAML; every key checked, see ``SweepSpec``)::

    output: runs/sweep_small
    config: configs/synthetic_me.yaml         # base trainer config (null: trainer defaults)
    datasets: {synthetic: runs/sweep_small/dataset}   # name -> prepared dataset path/URL
    paper_dataset: null                       # criteo | avazu | {our name: criteo|avazu}
    models: [dnn, dcnv2]
    modes: [se, me]
    scales: [1, 2, 4]
    seeds: [0]
    base_dim: {default: 10, nfwfm: 50}
    launcher: {nproc: 1}                      # >1: torchrun --standalone --nproc-per-node N
    # or one torchx job per cell (train component), launcher.parallel submitted at a time:
    # launcher: {scheduler: kubernetes, scheduler_args: {namespace: ctr, queue: ctr,
    #            service_account: ctr-trainer}, image: REGISTRY/ctr-multiembed:TAG,
    #            nproc: 8, gpu: 8, cpu: 64, memMB: 480000, parallel: 16}
    overrides: [train.epochs=1]               # trainer --set values for every cell
    per_model_overrides: {dcnv2: [model.cross_layers=2]}
    per_dataset_overrides: {}

The output directory::

    OUT/cells/<cell id>/   the cell's trainer run directory (summary.json, collapse.jsonl, ...)
    OUT/logs/<cell id>.log the cell's trainer output, every attempt appended
    OUT/results.jsonl      one line per cell with every number
    OUT/table.md, table.csv   test AUC, logloss and NE, rows model x SE/ME, columns scales
    OUT/auc_vs_scale.png, ia_vs_scale.png

Rerunning is cheap and safe: a cell whose run directory has a complete ``summary.json`` is
not trained again, an interrupted one resumes from its latest checkpoint (``--resume
auto``), and a failed one is tried again. A failed cell is logged with its log file and the
sweep goes on; the exit status is then 1.

With ``launcher.scheduler`` ``local_cwd`` or ``kubernetes`` (``--scheduler`` overrides it)
each cell is its own torchx job instead (``pipelines/components.py:train``, ``-j
1x<nproc>``), submitted through torchx's Runner, ``launcher.parallel`` at a time, and
polled to its end; its job log's tail is appended to ``OUT/logs/<cell id>.log``. The
output may then be an object-store URL (the cells' run directories, logs and report go
there; no lock: run one sweep at a time on it). ``--dry-run`` prints each unfinished
cell's scheduler request (for kubernetes: the Volcano job) and submits nothing. Spec errors (exit 2) are found before anything
runs: unknown keys, unknown model names, an empty grid, an override the trainer would
refuse for some cell, or cells whose run directory holds a run of a different config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shlex
import sys
import time
from typing import Any, Sequence

from pipelines import sweep_report
from pipelines.sweep_launcher import (
    CellJob,
    Outcome,
    TorchxCellJob,
    cell_app,
    output_lock,
    prepare_scheduler,
    raise_on_sigterm,
    scheduler_cfg,
    slot_environments,
)  # fmt: skip
from pipelines.sweep_spec import (
    SCHEDULERS,
    Cell,
    SweepSpec,
    cell_command,
    cell_dir,
    cell_log,
    check_existing,
    check_models,
    check_output,
    is_url,
    load_spec,
    plan_cells,
    resolve_cell_config,
    select_cells,
)
from trainer.cli_help import HelpFormatter, description
from trainer.errors import UserError, run_cli
from trainer.run_dir import RunDir
from trainer.storage import filesystem, join

log = logging.getLogger("sweep")


# ---- results ----------------------------------------------------------------------------


def _slot_description(env: dict[str, str]) -> str:
    """`` on GPU(s) 0,1``, `` with 1 thread(s) a rank`` or nothing: where a parallel slot runs its cell."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return f" on GPU(s) {env['CUDA_VISIBLE_DEVICES']}"
    if "CTR_CPU_THREADS" in env:
        return f" with {env['CTR_CPU_THREADS']} thread(s) a rank"
    return ""


def read_collapse(run_dir: str, step: int | None = None) -> dict[str, Any] | None:
    """Means over fields of the run's collapse record at ``step`` (else the last); here, as a
    cell's record is read from its run, so that ``sweep_report`` only renders records."""
    record = RunDir(run_dir).read_collapse_record(step)
    if record is None:
        return None
    fields = record["fields"].values()

    def mean(values: list[Any]) -> float | None:
        vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        return sum(vals) / len(vals) if vals else None

    def overall(f: dict[str, Any], key: str, set_key: str) -> float | None:
        v = f.get(key)
        return v if isinstance(v, (int, float)) else mean(f.get(set_key) or [])

    return {
        "collapse_step": record.get("step"),
        "mean_ia": mean([overall(f, "overall_ia", "set_ia") for f in fields]),
        "mean_ia_ratio": mean([overall(f, "overall_ia_ratio", "set_ia_ratio") for f in fields]),
        "mean_set_ia": mean([mean(f.get("set_ia") or []) for f in fields]),
        "mean_diversity": mean([f.get("diversity") for f in fields]),
    }


def collect_records(spec: SweepSpec, cells: list[Cell], output: str, outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    """One record per cell of the grid: its numbers from its run directory and how it went."""
    records = []
    for cell in cells:
        run_dir = cell_dir(output, cell)
        summary = RunDir(run_dir).read_summary()
        outcome = outcomes.get(cell.id)
        status = "done" if summary is not None else ("failed" if outcome and outcome.status == "failed" else "missing")
        record: dict[str, Any] = {
            "id": cell.id,
            "dataset": cell.dataset,
            "model": cell.model,
            "mode": cell.mode,
            "modes": list(cell.modes),
            "scale": cell.scale,
            "seed": cell.seed,
            "status": status,
            "run_dir": run_dir,
            "log": cell_log(output, cell),
            "seconds": outcome.seconds if outcome else None,
            "error": outcome.error if outcome and status == "failed" else None,
        }
        if summary is not None:
            for key in ("test_auc", "test_logloss", "test_ne", "test_calibration", "val_auc", "val_logloss", "val_ne",
                        "best_step", "steps", "epochs_completed", "stopped_early", "train_examples", "train_seconds",
                        "train_examples_per_sec", "world_size", "device", "oracle_test_auc", "oracle_test_logloss"):  # fmt: skip
                record[key] = summary.get(key)
            record.update(read_collapse(run_dir, summary.get("best_step")) or {})
        records.append(record)
    return records


def write_report(spec: SweepSpec, output: str, records: list[dict[str, Any]], plots: bool = True) -> None:
    """The report files into ``output``: a local directory (sweep_report writes them
    atomically) or an object-store URL (each file one put, which is atomic there)."""
    if not is_url(output):
        if plots:
            sweep_report.write_report(spec, output, records)
        else:
            sweep_report.write_tables(spec, output, records)
        return
    files: dict[str, bytes | str] = {
        "results.jsonl": "".join(json.dumps(sweep_report._json_safe(r), allow_nan=False) + "\n" for r in records),
        "table.md": sweep_report.render_markdown(spec, output, records),
        "table.csv": sweep_report.render_csv(spec, records),
    }
    if plots:
        files.update(sweep_report.render_figures(spec, records))
    for name, data in files.items():
        fs, path = filesystem(join(output, name))
        fs.pipe_file(path, data.encode() if isinstance(data, str) else data)


# ---- running ----------------------------------------------------------------------------


def _num(value: float | None) -> str:
    """A summary metric for the log: ``null`` (undefined, e.g. a single-class split) as n/a."""
    return "n/a" if value is None else f"{value:.5f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_sweep(
    spec: SweepSpec,
    output: str,
    only: dict[str, Sequence[Any] | None] | None = None,
    report: bool = True,
) -> list[dict[str, Any]]:
    """Run the selected cells not yet done, then write the report of the whole grid.
    Returns the records (one per cell of the grid)."""
    cells = plan_cells(spec)
    todo = select_cells(cells, **(only or {}))
    if not todo:
        raise UserError(f"the grid is empty: no cell of the spec's {len(cells)} matches the selection {only}")
    check_output(spec.launcher, output)
    check_models({c.model for c in todo})
    check_existing(spec, todo, output)  # also runs every cell's config through the trainer's checks
    prepare_scheduler(spec)
    outcomes: dict[str, Outcome] = {}

    def write() -> list[dict[str, Any]]:
        records = collect_records(spec, cells, output, outcomes)
        if report:
            write_report(spec, output, records)
        return records

    with output_lock(output), _runner(spec) as runner:
        pending = [c for c in todo if RunDir(cell_dir(output, c)).read_summary() is None]
        for c in todo:
            if c not in pending:
                outcomes[c.id] = Outcome("skipped")
        log.info(
            "sweep: %d cell(s) in the grid, %d selected, %d already done (skipped), %d to train; output %s",
            len(cells), len(todo), len(todo) - len(pending), len(pending), output,
        )  # fmt: skip
        envs = [{} for _ in range(spec.launcher.parallel)] if runner else slot_environments(spec.launcher)
        queue = list(pending)
        running: dict[int, tuple[int, CellJob | TorchxCellJob]] = {}  # slot -> (number, job)
        durations: list[float] = []
        started = 0
        try:
            while queue or running:
                while queue and len(running) < len(envs):
                    slot = min(set(range(len(envs))) - set(running))
                    cell = queue.pop(0)
                    started += 1
                    left = len(queue) + 1 + len(running)
                    eta = (f"ETA {_duration(sum(durations) / len(durations) * left / len(envs))} for {left} cell(s)"
                           if durations else "ETA after the first cell")  # fmt: skip
                    how = "resuming from its latest checkpoint" if RunDir(cell_dir(output, cell)).has_checkpoints() else "new"
                    where = _slot_description(envs[slot])
                    log.info("[%d/%d] start %s (%s)%s; %s", started, len(pending), cell.id, how, where, eta)
                    if runner:
                        job: CellJob | TorchxCellJob = TorchxCellJob(runner, spec, cell, output)
                        log.info("[%d/%d] %s: torchx job %s", started, len(pending), cell.id, job.handle)
                    else:
                        job = CellJob(spec, cell, output, envs[slot])
                    running[slot] = (started, job)
                time.sleep(2.0 if runner else 0.2)  # a scheduler's status is a call to it
                for slot, (number, job) in list(running.items()):
                    outcome = job.poll()
                    if outcome is None:
                        continue
                    del running[slot]
                    cell = job.cell
                    outcomes[cell.id] = outcome
                    durations.append(outcome.seconds or 0.0)
                    if outcome.status == "done":
                        s = RunDir(cell_dir(output, cell)).read_summary() or {}
                        ia = read_collapse(cell_dir(output, cell), s.get("best_step")) or {}
                        log.info(
                            "[%d/%d] done %s in %s: test AUC %s, logloss %s, NE %s%s",
                            number, len(pending), cell.id, _duration(outcome.seconds or 0), _num(s["test_auc"]), _num(s["test_logloss"]),
                            _num(s.get("test_ne")),
                            f", mean IA {ia['mean_ia']:.2f}" if ia.get("mean_ia") is not None else "",
                        )  # fmt: skip
                    else:
                        log.error("[%d/%d] FAILED %s after %s: %s; log: %s", number, len(pending), cell.id,
                                  _duration(outcome.seconds or 0), outcome.error, cell_log(output, cell))  # fmt: skip
                    if report:  # the tables so far (the plots at the end)
                        write_report(spec, output, collect_records(spec, cells, output, outcomes), plots=False)
        except BaseException:  # Ctrl-C, SIGTERM: take the running cells down with us
            for _, job in running.values():
                job.stop()
            raise
        finally:
            records = write()
    failed = [r for r in records if r["status"] == "failed"]
    done = sum(r["status"] == "done" for r in records)
    log.info("sweep: %d of %d cell(s) done, %d failed; report in %s (table.md, table.csv, auc_vs_scale.png, ia_vs_scale.png, results.jsonl)",
             done, len(records), len(failed), output)  # fmt: skip
    for r in failed:
        log.error("failed: %s: %s; log: %s", r["id"], r["error"], r["log"])
    return records


@contextlib.contextmanager
def _runner(spec: SweepSpec) -> Any:
    """torchx's Runner for a scheduler launcher (None for subprocesses)."""
    if not spec.launcher.torchx:
        yield None
        return
    from torchx.runner import get_runner

    with get_runner() as runner:
        yield runner


def dry_run(spec: SweepSpec, cells: list[Cell], output: str) -> None:
    """Print each cell's state and command (subprocess) or scheduler request (torchx jobs:
    for kubernetes the Volcano job); finished cells are listed as skipped. Submits nothing."""
    check_output(spec.launcher, output)
    check_models({c.model for c in cells})
    for c in cells:
        resolve_cell_config(spec, c, output)
    with _runner(spec) as runner:
        for c in cells:
            run = RunDir(cell_dir(output, c))
            state = "done" if run.read_summary() else ("resume" if run.has_checkpoints() else "new")
            if runner is None:
                print(f"{c.id}\t{state}\t{shlex.join(cell_command(spec, c, output))}")
            elif state == "done":
                print(f"--- cell {c.id}: done, skipped")
            else:
                info = runner.dryrun(cell_app(spec, c, output), spec.launcher.scheduler, cfg=scheduler_cfg(spec, output))
                print(f"--- cell {c.id}: {state} -> {cell_dir(output, c)} ({spec.launcher.scheduler} job)\n{info}\n")


# ---- command line -----------------------------------------------------------------------


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None

    return parse


def _quiet_libraries() -> None:
    """FBGEMM logs every library it loads through the root logger at INFO: keep the sweep's log readable."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= logging.ERROR or not any(lib in r.pathname for lib in ("/torchrec/", "/fbgemm_gpu/")))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.sweep", description=description(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--spec", required=True, help="sweep spec YAML (see configs/sweeps/)")
    p.add_argument("--output", help="output directory (default: the spec's output)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override spec keys: --set seeds=[0,1,2] launcher.nproc=2")  # fmt: skip
    for axis, kind in (("datasets", str), ("models", str), ("modes", str), ("scales", int), ("seeds", int)):
        p.add_argument(f"--{axis}", type=_csv(kind), metavar="A,B", help=f"train only these {axis} of the spec (the report still covers the whole grid)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help="override launcher.scheduler: subprocesses here, or one torchx job per cell")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells and their commands (torchx schedulers: each unfinished cell's job); train nothing")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the run directories; train nothing")
    args = p.parse_args(argv)
    _quiet_libraries()
    spec = load_spec(args.spec, args.overrides + ([f"launcher.scheduler={args.scheduler}"] if args.scheduler else []))
    output = args.output or spec.output
    only = {axis: getattr(args, axis) for axis in ("datasets", "models", "modes", "scales", "seeds")}
    for axis, values in only.items():
        extra = sorted(set(values or []) - set(getattr(spec, axis)), key=str)
        if extra:
            raise UserError(f"--{axis}: {extra} not in the spec's {axis} {list(getattr(spec, axis))}")
    if args.report_only:
        records = collect_records(spec, plan_cells(spec), output, {})
        write_report(spec, output, records)
        print(f"report of {sum(r['status'] == 'done' for r in records)}/{len(records)} done cell(s) written to {output}")
        return
    if args.dry_run:
        cells = select_cells(plan_cells(spec), **only)
        if not cells:
            raise UserError("the grid is empty: no cell matches the selection")
        dry_run(spec, cells, output)
        return
    raise_on_sigterm()
    records = run_sweep(spec, output, only)
    if any(r["status"] == "failed" for r in records):
        sys.exit(1)


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
