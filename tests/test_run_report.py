"""See your training: the run report, the planner's estimates in plan.txt, library warnings once.

- a tiny one-process run and a tiny 2-rank torchrun run (trained once per module, side by
  side) leave the training curves as PNGs and one self-contained report.html in their run
  directories; plan.txt holds our placement table and TorchRec's stats table (a memory line
  per rank); a library FutureWarning is shown once per run (rank 0), not once per call site
  or rank;
- a run directory without collapse.jsonl still gets the other curves, and records with
  undefined metrics (NaN, null) draw;
- ``capture_planner_stats`` collects the table without logging it and restores the logger;
- ``--help`` does not load matplotlib.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, Launcher, cli_env, ok, torchrun, train
from trainer.run_dir import RunDir
from trainer.run_report import CURVES, IA_PNG, LOSS_PNG, THROUGHPUT_PNG, VALIDATION_PNG, write_run_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a FutureWarning TorchRec raises on CPU, on every rank, from two call sites (embeddingbag.py and
# model_parallel.py), with torch's catch_warnings (which resets Python's "once" memory) in between
BROADCAST_BUFFERS = "`broadcast_buffers` is deprecated"
# TorchRec's EmbeddingStats: "#   <rank>   <HBM GB> (<pct>%)   <DDR GB> (<pct>%)   <perf> ..."
RANK_MEMORY_LINE = re.compile(r"^#\s+(\d+)\s+[\d.]+ \(\d+%\)\s+[\d.]+ \(\d+%\)\s")


def _run_args(data: Path, run_dir: Path) -> list[str]:
    return [f"data.path={data}", f"run.dir={run_dir}", "train.max_steps=20", "train.eval_every_steps=10"]


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """``one``: a one-process run; ``two``: a 2-rank torchrun run (each (run_dir, proc))."""
    root = tmp_path_factory.mktemp("run_report")
    launcher = Launcher()
    launcher.submit("one", lambda: (root / "one", ok(train(*_run_args(tiny_dataset, root / "one")))))
    launcher.submit("two", lambda: (root / "two", ok(torchrun(*_run_args(tiny_dataset, root / "two")))))
    yield launcher
    launcher.close()


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000, f"{path.name} is not a PNG"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, f"{path.name}: {image.shape}"


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(chunk.split("'")[0]) for chunk in page.split("data:image/png;base64,")[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["one", "two"])
def test_run_directory_has_the_curves_and_a_self_contained_report(runs, which):
    run_dir, proc = runs.result(which)
    for name in CURVES:
        _check_png(run_dir / name)
    assert not list(run_dir.glob("*.tmp")), "temporary files left behind"
    page = (run_dir / "report.html").read_text()
    for name in CURVES:
        assert f"href='{name}'" in page, f"report.html does not reference {name}"
    embedded = _embedded_pngs(page)
    assert sorted(embedded) == sorted((run_dir / name).read_bytes() for name in CURVES), "each PNG embedded as is"
    assert "src='http" not in page and "<link" not in page and "<script" not in page  # self-contained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"<th>best_step</th><td class=n>{summary['best_step']}</td>" in page
    assert "config.yaml</summary>" in page and "plan.txt</summary>" in page and "Planner Statistics" in page
    assert "report.html" in (run_dir / "summary.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("which, ranks", [("one", 1), ("two", 2)])
def test_plan_txt_holds_our_table_and_the_planner_stats(runs, which, ranks, tiny_dataset):
    run_dir, proc = runs.result(which)
    plan = (run_dir / "plan.txt").read_text()
    table, _, stats = plan.partition("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["set", "field", "table", "sharding"]
    fields = [f["name"] for f in json.loads((tiny_dataset / "schema.json").read_text())["sparse_fields"]]
    assert len(lines) == 2 + 2 * len(fields), "the placement table, then a blank line, then the planner's"
    assert {line.split()[2] for line in lines[2:]} == {f"set{m}__{f}" for m in range(2) for f in fields}
    assert "Planner Statistics" in stats and "DDR (GB)" in stats and "Perf (ms)" in stats
    memory_ranks = sorted(int(m.group(1)) for line in stats.splitlines() if (m := RANK_MEMORY_LINE.match(line)))
    assert memory_ranks == list(range(ranks)), f"expected a memory line per rank:\n{stats}"
    assert "Planner Statistics" not in proc.stderr, "the stats table is in plan.txt, not the log"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["one", "two"])
def test_a_library_warning_is_shown_once_per_run(runs, which):
    _, proc = runs.result(which)
    count = proc.stderr.count(BROADCAST_BUFFERS)
    assert count == 1, f"{BROADCAST_BUFFERS!r} shown {count} times:\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_a_run_without_collapse_records_gets_the_other_curves(runs, tmp_path):
    src, _ = runs.result("one")
    run_dir = Path(shutil.copytree(src, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints")))
    (run_dir / "collapse.jsonl").unlink()
    (run_dir / "report.html").unlink()
    assert (run_dir / IA_PNG).exists()  # drawn by the run: stale once its records are gone
    names = write_run_report(RunDir(str(run_dir)))
    assert names == [LOSS_PNG, VALIDATION_PNG, THROUGHPUT_PNG, "report.html"]
    assert not (run_dir / IA_PNG).exists()
    for name in names[:-1]:
        _check_png(run_dir / name)
    page = (run_dir / "report.html").read_text()
    assert len(_embedded_pngs(page)) == 3 and IA_PNG not in page and "no collapse.jsonl records" in page


def test_undefined_metrics_and_a_single_evaluation_still_draw(tmp_path):
    """NaN and null values (a single-class split's AUC, NE), one evaluation, no summary yet,
    no NE in older records: the curves draw, the gaps stay gaps."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [
        {"kind": "train", "step": 5, "epoch": 0, "loss": 0.6, "examples_per_sec": 1000.0},
        {"kind": "train", "step": 10, "epoch": 1, "loss": math.nan, "examples_per_sec": 1100.0},
        {"kind": "val", "step": 10, "epoch": 1, "auc": math.nan, "logloss": 0.5, "ne": None},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    collapse = {"step": 10, "fields": {"C1": {"set_ia": [2.0], "set_ia_ratio": [0.5], "overall_ia": None,
                                              "overall_ia_ratio": None, "diversity": None}}}
    (run_dir / "collapse.jsonl").write_text(json.dumps(collapse) + "\n")
    names = write_run_report(RunDir(str(run_dir)))
    assert names == [LOSS_PNG, VALIDATION_PNG, THROUGHPUT_PNG, IA_PNG, "report.html"]
    for name in names[:-1]:
        _check_png(run_dir / name)
    assert "No summary.json" in (run_dir / "report.html").read_text()


def test_capture_planner_stats_collects_the_table_and_restores_the_logger(caplog):
    import torch

    from trainer.data.schema import SparseField
    from trainer.job_config import EmbeddingConfig, ModelConfig, ShardingConfig
    from trainer.model import MultiEmbeddingCTR
    from trainer.plan_table import render_plan, with_planner_stats
    from trainer.sharding import PLANNER_STATS_LOGGER, capture_planner_stats, plan_sharding

    logger = logging.getLogger(PLANNER_STATS_LOGGER)
    before = (logger.level, logger.propagate, list(logger.handlers))
    fields = [SparseField("a", 7), SparseField("b", 9)]
    model = MultiEmbeddingCTR.from_config(fields, ModelConfig(name="dnn", hidden=8), EmbeddingConfig("me", 2, base_dim=4), seed=0)
    with caplog.at_level(logging.INFO), capture_planner_stats() as lines:
        plan = plan_sharding(model, ShardingConfig(), 2, torch.device("cpu"), batch_size=64)
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    assert not [r for r in caplog.records if r.name == PLANNER_STATS_LOGGER], "the table was also logged"
    assert sorted(int(m.group(1)) for line in lines if (m := RANK_MEMORY_LINE.match(line))) == [0, 1]
    table = render_plan(plan, model.sparse_arch.tables, 2)
    text = with_planner_stats(table, lines)
    assert text.startswith(table + "\n") and "Planner Statistics" in text and text.endswith("#\n")
    assert with_planner_stats(table, []) == table


@pytest.mark.parametrize("module", ["trainer.main", "trainer.collapse"])
def test_help_does_not_load_matplotlib(module):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('@@', sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("@@ []"), proc.stdout[-500:]


@pytest.mark.slow
def test_collapse_report_of_a_run_checkpoint_has_its_training_curves(runs, tmp_path):
    from trainer.collapse.__main__ import main

    run_dir, _ = runs.result("one")
    main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "with"), "--fields", "C1,C2"])
    _check_png(tmp_path / "with" / "training.png")
    page = (tmp_path / "with" / "report.html").read_text()
    assert (tmp_path / "with" / "training.png").read_bytes() in _embedded_pngs(page)
    assert "Training curves of the analysed runs" in page

    # a checkpoint outside any run directory: no run to draw, the rest of the report as before
    latest = sorted((run_dir / "checkpoints").iterdir())[-1]
    alone = shutil.copytree(latest, tmp_path / "elsewhere" / latest.name)
    main(["--checkpoint", str(alone), "--output", str(tmp_path / "without"), "--fields", "C1,C2"])
    assert not (tmp_path / "without" / "training.png").exists()
    assert (tmp_path / "without" / "ia.png").exists()
