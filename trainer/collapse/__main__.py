"""Offline embedding-collapse monitor: ``python -m trainer.collapse --checkpoint PATH --output DIR``.

Reads one or more training checkpoints (a checkpoint directory, or a run directory
meaning its latest checkpoint; local paths or fsspec URLs), one field at a time, and
writes DIR/collapse.json, PNG plots and a self-contained DIR/report.html. Give two
checkpoints (e.g. SE and ME at the same scale) to see them side by side::

    python -m trainer.collapse --checkpoint runs/se4 --checkpoint runs/me4 --output reports/se_vs_me
"""

from __future__ import annotations

import argparse
import logging

from trainer.cli_help import HelpFormatter, description
from trainer.errors import UserError, run_cli
from trainer.run_dir import RunDir
from trainer.storage import join

log = logging.getLogger("trainer.collapse")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (also used by tests/test_deploy.py to check the Kubernetes CronJob's flags)."""
    p = argparse.ArgumentParser(
        prog="python -m trainer.collapse", description=description(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--checkpoint", action="append", required=True, metavar="PATH_OR_URL",
                   help="a checkpoint dir, or a run dir (its latest checkpoint); repeat to compare models")
    p.add_argument("--output", required=True, metavar="PATH_OR_URL", help="the report directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--fields", help="comma-separated fields to analyse (default: all)")
    p.add_argument("--chunk-rows", type=int, help="rows per float64 Gram chunk (default: trainer.collapse.gram.DEFAULT_CHUNK_ROWS, 65536)")
    p.add_argument("--band-rows", type=int,
                   help="rows per checkpoint read, at least one stored chunk (default: stored_tables.DEFAULT_BAND_ROWS, 1048576)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline tables")
    p.add_argument("--no-plots", action="store_true", help="write collapse.json and report.html without PNGs")
    p.add_argument("--pushgateway", metavar="HOST:PORT", help="also push the collapse gauges to this Pushgateway")
    p.add_argument("--run-id", help="the run label of pushed gauges (default: the checkpoint's run directory name)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from trainer.atomic_output import check_output
    from trainer.collapse.report import JSON_NAME, write_report
    from trainer.collapse.stored_tables import analyze_checkpoint
    from trainer.telemetry import MONITOR_JOB, Telemetry

    if (args.chunk_rows is not None and args.chunk_rows < 1) or (args.band_rows is not None and args.band_rows < 1):
        raise UserError("--chunk-rows and --band-rows must be positive")
    check_output(args.output, args.overwrite, marker=JSON_NAME, what="collapse report")  # before minutes of reading
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
    reports = []
    for url in args.checkpoint:
        sizes = {k: v for k, v in (("chunk_rows", args.chunk_rows), ("band_rows", args.band_rows)) if v is not None}
        report = analyze_checkpoint(url, fields=fields, seed=args.seed, **sizes)
        s = report.summary()
        log.info(
            "%s: %d fields in %.1fs; mean IA %.2f (random %.2f, normalised %.3f), mean diversity %s",
            report.label, s["fields"], report.seconds or 0.0, s["mean_overall_ia"], s["mean_overall_random_ia"],
            s["mean_overall_ia_normalized"], "n/a" if s["mean_diversity"] != s["mean_diversity"] else f"{s['mean_diversity']:.3f}",
        )
        reports.append(report)
    names = write_report(reports, args.output, overwrite=args.overwrite, plots=not args.no_plots)
    if args.pushgateway:
        for url, report in zip(args.checkpoint, reports):
            telemetry = Telemetry(args.run_id or _run_name(url), pushgateway=args.pushgateway, job=MONITOR_JOB)
            telemetry.record_collapse(report)
            telemetry.close()  # the push runs on a background thread: wait for it (bounded)
    print(f"wrote {args.output}: {', '.join(names)}")
    print(f"open {join(args.output, 'report.html')}")


def _run_name(checkpoint_url: str) -> str:
    """The run directory's name of ``RUN/checkpoints/step-N`` (or of ``RUN`` itself)."""
    run_dir = RunDir.of_checkpoint(checkpoint_url) or RunDir(checkpoint_url)
    return run_dir.name or "unknown"


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
