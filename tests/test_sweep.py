"""The scaling sweep (``python -m pipelines.sweep``): a real tiny grid through the trainer
CLI, skipping finished cells on a rerun, a failing cell that does not stop the others and
resumes from its checkpoint afterwards, spec errors, the Table 1 logic on made-up results,
the paper's numbers, and the torchx component.

The real sweeps (6 cells, two at a time, then 2 cells and the reruns, of the tiny DCNv2/DNN
model on 6,000 synthetic rows) run in the background from the start (tests.helpers.Launcher).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from pipelines import sweep as sw
from pipelines import sweep_launcher, sweep_report, sweep_spec
from pipelines.paper_results import CITATION, PAPER_DATASETS, PAPER_SCALES, TABLE1_TEST_AUC, paper_test_auc
from tests.helpers import ROOT, Launcher, ok, user_error
from tests.sweep_helpers import TINY_SWEEP, sweep_cli, tiny_spec
from trainer.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def summary_mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}


# ---- the real sweeps, started once, in the background ----------------------------------------


@pytest.fixture(scope="module")
def sweeps(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    main = tiny_spec(tmp, tiny_dataset, "main", launcher={"parallel": 2})  # two cells at a time
    # dnn stops at step 8; dcnv2 checkpoints every 5 steps and is killed after step 12 by the
    # trainer's fault injection (on every attempt of a plain process), so only it fails
    faulty = tiny_spec(
        tmp, tiny_dataset, "faulty", scales=[1],
        overrides=TINY_SWEEP + ["train.checkpoint_every_steps=5"],
        per_model_overrides={"dnn": ["train.max_steps=8"]},
    )  # fmt: skip
    jobs = Launcher(workers=2)
    jobs.submit("main", sweep_cli, main)
    jobs.after("faulty", "main", sweep_cli, faulty, CTR_FAIL_AT_STEP="12", CTR_FAIL_RANK="0")

    def rerun(spec: Path) -> dict:
        """The first run's outputs as they were, then the same sweep again."""
        out = tmp / spec.stem
        first = {"mtimes": summary_mtimes(out), "table_md": (out / "table.md").read_text(), "results": results(out)}
        return {**first, "proc": sweep_cli(spec)}

    jobs.after("main_again", "main", rerun, main)
    jobs.after("faulty_again", "faulty", rerun, faulty)
    yield tmp, jobs
    jobs.close()


@pytest.mark.slow
def test_sweep_trains_every_cell_and_writes_table1(sweeps):
    tmp, jobs = sweeps
    proc = ok(jobs.result("main"))
    out = tmp / "main"
    ids = {"tiny-dnn-1x-seed0", "tiny-dnn-se2x-seed0", "tiny-dnn-me2x-seed0",
           "tiny-dcnv2-1x-seed0", "tiny-dcnv2-se2x-seed0", "tiny-dcnv2-me2x-seed0"}  # fmt: skip
    recs = results(out)
    assert set(recs) == ids  # SE 1x and ME 1x are one cell
    for r in recs.values():
        assert r["status"] == "done", r
        assert 0.5 < r["test_auc"] < 1 and r["test_logloss"] > 0, r
        assert r["mean_ia"] is not None and 1 <= r["mean_ia"] <= r["scale"] * 4, r
        assert Path(r["run_dir"], "summary.json").exists() and Path(r["log"]).exists()
    assert recs["tiny-dnn-1x-seed0"]["modes"] == ["se", "me"]
    assert recs["tiny-dnn-me2x-seed0"]["modes"] == ["me"]
    # the cell really trained what its id says
    cfg = yaml.safe_load((out / "cells" / "tiny-dcnv2-me2x-seed0" / "config.yaml").read_text())
    assert (cfg["model"]["name"], cfg["embedding"]["mode"], cfg["embedding"]["scale"], cfg["embedding"]["base_dim"]) == ("dcnv2", "me", 2, 4)

    # progress: start, ETA and result of every cell
    err = proc.stderr
    assert len(re.findall(r"\] start tiny-", err)) == 6 and len(re.findall(r"\] done tiny-", err)) == 6, err[-3000:]
    assert "ETA" in err and "test AUC" in err

    # table.md: Table 1's shape, the 1x cell in both rows, a best value in bold per column
    md = (out / "table.md").read_text()
    dnn_se = next(line for line in md.splitlines() if line.startswith("| DNN | SE |"))
    dnn_me = md.splitlines()[md.splitlines().index(dnn_se) + 1]
    assert dnn_me.startswith("|  | ME |")
    auc_1x = f"{recs['tiny-dnn-1x-seed0']['test_auc']:.5f}"
    assert auc_1x in dnn_se.split("|")[3] and auc_1x in dnn_me.split("|")[3]
    assert "### Test AUC" in md and "### Test logloss" in md and "### Test NE" in md and md.count("**") >= 8
    assert "Oracle on the test split" in md

    # table.csv: the same numbers
    rows = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert len(rows) == 3 * 2 * 2  # metrics (AUC, logloss, NE) x models x modes
    ne = {(r["model"], r["mode"]): r for r in rows if r["metric"] == "test_ne"}
    assert float(ne[("dnn", "se")]["1x_mean"]) == pytest.approx(recs["tiny-dnn-1x-seed0"]["test_ne"])
    assert 0 < recs["tiny-dnn-1x-seed0"]["test_ne"] < 2
    auc = {(r["model"], r["mode"]): r for r in rows if r["metric"] == "test_auc"}
    assert float(auc[("dnn", "se")]["1x_mean"]) == pytest.approx(recs["tiny-dnn-1x-seed0"]["test_auc"])
    assert auc[("dnn", "se")]["1x_mean"] == auc[("dnn", "me")]["1x_mean"]
    assert float(auc[("dcnv2", "me")]["2x_mean"]) == pytest.approx(recs["tiny-dcnv2-me2x-seed0"]["test_auc"])
    for scale in ("1x", "2x"):
        column = [r for r in rows if r["metric"] == "test_auc"]
        best = max(float(r[f"{scale}_mean"]) for r in column)
        assert {float(r[f"{scale}_mean"]) for r in column if r[f"{scale}_best"] == "1"} == {best}

    for name in ("auc_vs_scale.png", "ia_vs_scale.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert not list(out.glob("*.tmp*")), "temporary files left behind"


@pytest.mark.slow
def test_rerun_skips_finished_cells(sweeps):
    tmp, jobs = sweeps
    again = jobs.result("main_again")
    before, proc = again["mtimes"], ok(again["proc"])
    assert "6 already done (skipped), 0 to train" in proc.stderr, proc.stderr[-2000:]
    assert "] start " not in proc.stderr
    assert summary_mtimes(tmp / "main") == before and len(before) == 6


@pytest.mark.slow
def test_failed_cell_is_reported_others_complete_and_it_resumes(sweeps):
    tmp, jobs = sweeps
    out = tmp / "faulty"
    proc = jobs.result("faulty")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    log_path = str(out / "logs" / "tiny-dcnv2-1x-seed0.log")
    assert re.search(r"FAILED tiny-dcnv2-1x-seed0 .*exit 17.*log: " + re.escape(log_path), proc.stderr), proc.stderr[-3000:]
    assert "] done tiny-dnn-1x-seed0" in proc.stderr

    # what the first run left: dnn done; dcnv2 failed, marked in the report with its log
    first = jobs.result("faulty_again")
    before, again = first["mtimes"], first["proc"]
    assert set(before) == {"tiny-dnn-1x-seed0"}
    assert first["results"]["tiny-dcnv2-1x-seed0"]["status"] == "failed"
    assert first["results"]["tiny-dcnv2-1x-seed0"]["log"] == log_path
    assert "exit 17" in first["results"]["tiny-dcnv2-1x-seed0"]["error"]
    assert first["results"]["tiny-dnn-1x-seed0"]["status"] == "done"
    md = first["table_md"]
    assert "| DCNv2 | SE | failed |" in md and "|  | ME | failed |" in md and "## Failed cells" in md
    assert "`tiny-dcnv2-1x-seed0`: exit 17" in md and log_path in md
    assert "fault injection" in Path(log_path).read_text()

    # the rerun trains only dcnv2, resuming from its latest checkpoint, and ends green
    ok(again)
    assert "1 already done (skipped), 1 to train" in again.stderr, again.stderr[-2000:]
    assert "start tiny-dcnv2-1x-seed0 (resuming from its latest checkpoint)" in again.stderr
    assert summary_mtimes(out)["tiny-dnn-1x-seed0"] == before["tiny-dnn-1x-seed0"]
    log_text = Path(log_path).read_text()
    assert log_text.count("=== ") == 2 and "resumed from" in log_text and "step-00000010" in log_text
    recs = results(out)
    assert {r["status"] for r in recs.values()} == {"done"}
    assert recs["tiny-dcnv2-1x-seed0"]["steps"] == 19 and recs["tiny-dnn-1x-seed0"]["steps"] == 8


# ---- spec errors ------------------------------------------------------------------------------


@pytest.mark.slow
def test_spec_errors_are_user_errors(tmp_path, tiny_dataset):
    def spec_error(**changes) -> str:
        path = tiny_spec(tmp_path, tiny_dataset, "bad", **changes)
        with pytest.raises(UserError) as e:
            sw.run_sweep(sweep_spec.load_spec(path), str(tmp_path / "bad"), report=False)
        return str(e.value)

    assert "unknown key(s) ['epochs']" in spec_error(epochs=3) and "valid keys are" in spec_error(epochs=3)
    msg = spec_error(launcher={"nprocs": 2})
    assert "launcher" in msg and "nproc" in msg
    msg = spec_error(models=["dnn", "nosuchmodel"])
    assert "nosuchmodel" in msg and "dcnv2" in msg  # lists the valid names
    assert "the grid is empty: models" in spec_error(models=[])
    assert "the grid is empty: seeds" in spec_error(seeds=[])
    assert "repeated" in spec_error(scales=[1, 1])
    assert "model.name is set per cell" in spec_error(overrides=["model.name=dnn"])
    assert "embedding.base_dim is set per cell" in spec_error(per_model_overrides={"dnn": ["embedding.base_dim=8"]})
    assert "per_model_overrides" in spec_error(per_model_overrides={"ipnn": ["model.hidden=8"]})
    assert "paper_dataset" in spec_error(paper_dataset="movielens")
    # an override the trainer would refuse: found before anything trains, naming the cell
    msg = spec_error(per_model_overrides={"dcnv2": ["model.hiden=8"]})
    assert "cell tiny-dcnv2-1x-seed0" in msg and "hiden" in msg and "hidden" in msg
    assert not (tmp_path / "bad" / "cells").exists()


@pytest.mark.slow
def test_spec_error_exit_code_and_changed_spec_refused(tmp_path, tiny_dataset):
    proc = sweep_cli(tiny_spec(tmp_path, tiny_dataset, "bad", models=["dnn", "nosuchmodel"]))
    user_error(proc, "unknown model name", "nosuchmodel")
    # a cell directory holding a run of another config (the spec changed under an output)
    out = tmp_path / "changed"
    cell = out / "cells" / "tiny-dnn-1x-seed0"
    cell.mkdir(parents=True)
    spec = sweep_spec.load_spec(tiny_spec(tmp_path, tiny_dataset, "changed", models=["dnn"]))
    config = sweep_spec.resolve_cell_config(spec, sweep_spec.plan_cells(spec)[0], str(out))
    config["train"]["epochs"] = 5
    (cell / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"tiny-dnn-1x-seed0 \(train.epochs: 5 there, 1 in the spec\)"):
        sw.run_sweep(spec, str(out), report=False)


@pytest.mark.slow
def test_cli_selection_and_dry_run(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path, tiny_dataset, "dry", seeds=[0, 1])
    proc = ok(sweep_cli(spec, "--dry-run", "--models", "dcnv2", "--seeds", "1", "--modes", "me"))
    lines = proc.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["tiny-dcnv2-1x-seed1", "tiny-dcnv2-me2x-seed1"]
    cmd = lines[1].split("\t")[2]
    for part in ("-m trainer.main", "model.name=dcnv2", "embedding.mode=me", "embedding.scale=2", "embedding.base_dim=4",
                 "train.seed=1", "--resume auto", f"run.dir={tmp_path / 'dry' / 'cells' / 'tiny-dcnv2-me2x-seed1'}"):  # fmt: skip
        assert part in cmd, (part, cmd)
    user_error(sweep_cli(spec, "--dry-run", "--models", "ipnn"), "--models", "ipnn")


# ---- the table logic, on made-up results ------------------------------------------------------


def fake_records(spec: sweep_spec.SweepSpec, auc, status=lambda c: "done") -> list[dict]:
    recs = []
    for c in sweep_spec.plan_cells(spec):
        st = status(c)
        recs.append({
            "id": c.id, "dataset": c.dataset, "model": c.model, "mode": c.mode, "modes": list(c.modes),
            "scale": c.scale, "seed": c.seed, "status": st, "log": f"logs/{c.id}.log", "error": "boom" if st == "failed" else None,
            "test_auc": auc(c) if st == "done" else None, "test_logloss": 1 - auc(c) if st == "done" else None,
            "test_ne": 2 - 2 * auc(c) if st == "done" else None,
            "mean_ia": 2.0 * c.scale if st == "done" else None,
        })  # fmt: skip
    return recs


def make_spec(**extra) -> sweep_spec.SweepSpec:
    raw = {"datasets": {"d": "data/d"}, "models": ["dnn", "dcnv2"], "modes": ["se", "me"], "scales": [1, 2], "seeds": [0, 1]}
    raw.update(extra)
    from trainer import typed_yaml

    return typed_yaml.build(sweep_spec.SweepSpec, raw, "spec")


def test_table_mean_std_best_and_shared_1x(tmp_path):
    spec = make_spec(paper_dataset="criteo")
    cells = sweep_spec.plan_cells(spec)
    assert len(cells) == 2 * 2 * 3  # seeds x models x (1x, se2x, me2x)
    assert [c.id for c in cells[:3]] == ["d-dnn-1x-seed0", "d-dnn-se2x-seed0", "d-dnn-me2x-seed0"]

    def auc(c: sweep_spec.Cell) -> float:  # dcnv2 ME 2x is best at 2x; seeds 0.01 apart
        base = {"dnn": 0.70, "dcnv2": 0.72}[c.model] + (0.02 if (c.mode, c.scale) == ("me", 2) else 0.0)
        return base + 0.01 * c.seed

    recs = fake_records(spec, auc)
    stats = sweep_report.aggregate(recs, "d", "test_auc", seeds=2)
    se1, me1 = stats[("dnn", "se", 1)], stats[("dnn", "me", 1)]
    assert se1.values == me1.values == pytest.approx([0.70, 0.71])  # the one 1x cell in both rows
    assert se1.mean == pytest.approx(0.705) and se1.std == pytest.approx(math.sqrt(0.00005))  # sample std
    assert stats[("dcnv2", "me", 2)].mean == pytest.approx(0.745)
    best = sweep_report.best_keys(stats, higher_is_better=True)
    assert best == {("dcnv2", "se", 1), ("dcnv2", "me", 1), ("dcnv2", "me", 2)}  # ties: both 1x rows
    best_loss = sweep_report.best_keys(sweep_report.aggregate(recs, "d", "test_logloss"), higher_is_better=False)
    assert best_loss == best  # logloss = 1 - AUC here: lower is better
    best_ne = sweep_report.best_keys(sweep_report.aggregate(recs, "d", "test_ne"), higher_is_better=False)
    assert best_ne == best  # NE = 2 - 2 AUC here: lower is better

    md = sweep_report.render_markdown(spec, "out", recs)
    assert "| DCNv2 | SE | **0.72500** ± 0.00707 | 0.72500 ± 0.00707 |" in md
    assert "|  | ME | **0.72500** ± 0.00707 | **0.74500** ± 0.00707 |" in md
    assert "### Paper (Criteo): test AUC" in md and CITATION in md
    ne_table = md[md.index("### Test NE"):md.index("### Paper")]
    assert "lower is better" in ne_table and "|  | ME | **0.55000** ± 0.01414 | **0.51000** ± 0.01414 |" in ne_table
    assert "| DCNv2 | SE | 0.81341 | 0.81341 |" in md and "|  | ME | **0.81348** | **0.81361** |" in md

    # a failed seed: n shown, failed cells listed; a wholly failed cell says so
    recs = fake_records(spec, auc, status=lambda c: "failed" if (c.model == "dnn" and c.scale == 2 and (c.seed == 1 or c.mode == "me")) else "done")
    md = sweep_report.render_markdown(spec, "out", recs)
    assert "| DNN | SE | 0.70500 ± 0.00707 | 0.70000 (n=1/2, 1 failed) |" in md
    assert "|  | ME | 0.70500 ± 0.00707 | failed |" in md
    assert "## Failed cells" in md and "`d-dnn-me2x-seed0`: boom (log: `logs/d-dnn-me2x-seed0.log`)" in md

    csv_rows = list(csv.DictReader(sweep_report.render_csv(spec, recs).splitlines()))
    paper = [r for r in csv_rows if r["source"] == "paper_criteo"]
    assert len(paper) == 4 and {r["metric"] for r in paper} == {"test_auc"}
    dcn = next(r for r in csv_rows if r["source"] == "ours" and r["metric"] == "test_auc" and (r["model"], r["mode"]) == ("dcnv2", "me"))
    assert float(dcn["2x_mean"]) == pytest.approx(0.745) and float(dcn["2x_std"]) == pytest.approx(math.sqrt(0.00005))
    assert dcn["2x_n"] == "2" and dcn["2x_best"] == "1"

    names = sweep_report.write_report(spec, str(tmp_path), recs)
    assert set(names) == {"results.jsonl", "table.md", "table.csv", "auc_vs_scale.png", "ia_vs_scale.png"}
    assert (tmp_path / "auc_vs_scale.png").read_bytes().startswith(PNG_MAGIC)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(recs)


def test_parallel_slots_without_gpus():
    import torch

    launcher = sweep_spec.LauncherSpec(nproc=1, parallel=3)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:  # CPU: the cells share the host's cores, each rank its share as its threads
        import os

        cores = len(os.sched_getaffinity(0))
        share = str(max(1, cores // 3))
        assert sweep_launcher.slot_environments(launcher) == [{"CTR_CPU_THREADS": share}] * 3
        two_rank = sweep_spec.LauncherSpec(nproc=2, parallel=1)
        assert sweep_launcher.slot_environments(two_rank) == [{}]  # one cell: torchrun and the trainer decide
    elif gpus >= 3:  # each slot its own GPU
        assert len({e["CUDA_VISIBLE_DEVICES"] for e in sweep_launcher.slot_environments(launcher)}) == 3
    else:
        with pytest.raises(UserError, match="3 GPUs, but this host has"):
            sweep_launcher.slot_environments(launcher)
    with pytest.raises(UserError, match="launcher.parallel must be >= 1"):
        sweep_spec.LauncherSpec(parallel=0)


def test_cpu_threads_of_a_rank(monkeypatch):
    """The trainer's intra-op threads: the sweep slot's share when given, else the affinity's
    cores over the host's ranks; a bad value is a clear error."""
    import os

    from trainer.train import cpu_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("CTR_CPU_THREADS", raising=False)
    assert cpu_threads(1) == cores and cpu_threads(2) == max(1, cores // 2) and cpu_threads(cores * 4) == 1
    monkeypatch.setenv("CTR_CPU_THREADS", "3")
    assert cpu_threads(2) == 3
    monkeypatch.setenv("CTR_CPU_THREADS", "0")
    with pytest.raises(UserError, match="CTR_CPU_THREADS='0'"):
        cpu_threads(1)


def test_no_shared_1x_and_me_only(tmp_path):
    spec = make_spec(share_1x=False, seeds=[0])
    assert [c.id for c in sweep_spec.plan_cells(spec)][:3] == ["d-dnn-se1x-seed0", "d-dnn-me1x-seed0", "d-dnn-se2x-seed0"]
    spec = make_spec(modes=["me"], seeds=[0])
    assert [c.id for c in sweep_spec.plan_cells(spec)][:2] == ["d-dnn-me1x-seed0", "d-dnn-me2x-seed0"]


def test_collapse_record_of_the_best_step(tmp_path):
    records = [
        {"step": 10, "fields": {"a": {"set_ia": [2.0, 4.0], "overall_ia": 5.0, "overall_ia_ratio": 0.5, "diversity": 0.3},
                                "b": {"set_ia": [1.0, 1.0], "overall_ia": 3.0, "overall_ia_ratio": 0.3, "diversity": 0.1}}},
        {"step": 20, "fields": {"a": {"set_ia": [9.0], "overall_ia": None, "overall_ia_ratio": None, "diversity": None}}},
    ]  # fmt: skip
    (tmp_path / "collapse.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 30, "fiel')
    best = sw.read_collapse(str(tmp_path), step=10)
    assert best == {"collapse_step": 10, "mean_ia": 4.0, "mean_ia_ratio": pytest.approx(0.4),
                    "mean_set_ia": 2.0, "mean_diversity": pytest.approx(0.2)}  # fmt: skip
    last = sw.read_collapse(str(tmp_path), step=99)  # no record at that step: the last complete one
    assert last["collapse_step"] == 20 and last["mean_ia"] == 9.0  # no overall IA (one set): the set's
    assert sw.read_collapse(str(tmp_path / "missing")) is None


# ---- the paper's numbers ------------------------------------------------------------------------


def test_paper_table1_numbers():
    assert paper_test_auc("criteo", "dcnv2", "se", 1) == 0.81341
    assert paper_test_auc("criteo", "dcnv2", "me", 10) == 0.81385
    assert paper_test_auc("Avazu", "dnn", "me", 10) == 0.78884
    assert paper_test_auc("avazu", "finalmlp", "se", 3) == 0.78795
    assert paper_test_auc("criteo", "autoint", "me", 2) is None and paper_test_auc("criteo", "dnn", "se", 5) is None
    assert set(TABLE1_TEST_AUC) == set(PAPER_DATASETS)
    for dataset, models in TABLE1_TEST_AUC.items():
        assert set(models) == {"dnn", "ipnn", "nfwfm", "xdeepfm", "dcnv2", "finalmlp"}
        for modes in models.values():
            assert all(set(v) == set(PAPER_SCALES) for v in modes.values())


def _seed_table1() -> list[list[str]] | None:
    seeds = ROOT.parent / "shared" / "seeds"
    for path in sorted(seeds.glob("*.txt")) if seeds.is_dir() else []:
        rows = [line.split("\t") for line in path.read_text(errors="replace").splitlines()]
        rows = [r for r in rows if len(r) == 12 and r[1] in ("SE", "ME")]
        if len(rows) == 12:
            return rows
    return None


def test_paper_numbers_match_the_seed_text():
    rows = _seed_table1()
    if rows is None:
        pytest.skip("the paper's text is not at ../shared/seeds (Table 1 rows not found)")
    names = {"DNN": "dnn", "IPNN": "ipnn", "NFwFM": "nfwfm", "xDeepFM": "xdeepfm", "DCNv2": "dcnv2", "FinalMLP": "finalmlp"}
    model = None
    for row in rows:
        model = names[row[0]] if row[0] else model
        mode = row[1].lower()
        values = [float(v.strip()) for v in row[2:]]
        ours = [paper_test_auc(d, model, mode, s) for d in PAPER_DATASETS for s in PAPER_SCALES]
        assert ours == values, (model, mode)


# ---- shipped specs and the torchx component ----------------------------------------------------


def test_shipped_specs_resolve_for_every_cell():
    from trainer.model.interactions import INTERACTIONS

    small = sweep_spec.load_spec(ROOT / "configs" / "sweeps" / "small.yaml")
    paper = sweep_spec.load_spec(ROOT / "configs" / "sweeps" / "paper.yaml")
    assert len(sweep_spec.plan_cells(small)) == 7 * 5 and small.launcher.nproc == 1
    # the paper's setting: one GPU per cell (BatchNorm and the step over 2048 rows), eight cells at once
    assert len(sweep_spec.plan_cells(paper)) == 2 * 7 * 9 * 3 and (paper.launcher.nproc, paper.launcher.parallel) == (1, 8)
    assert paper.paper_datasets() == {"criteo": "criteo", "avazu": "avazu"}
    for spec in (small, paper):
        sweep_spec.check_models(set(spec.models))  # all seven models are in the trainer
        assert set(spec.models) == set(INTERACTIONS)
        cells = sweep_spec.plan_cells(spec)
        configs = [sweep_spec.resolve_cell_config(spec, c, spec.output) for c in cells[: len(cells) // len(spec.seeds)]]
        assert {c["embedding"]["base_dim"] for c in configs if c["model"]["name"] == "nfwfm"} == {50}
    cfg = sweep_spec.resolve_cell_config(paper, sweep_spec.plan_cells(paper)[0], paper.output)
    assert cfg["recipe"] == "paper" and cfg["optim"]["embedding"] == "dense_adam"
    assert cfg["train"]["batch_size"] == 2048 and cfg["model"]["nfwfm_pairs"] == "all"
    cmd = sweep_spec.cell_command(paper, sweep_spec.plan_cells(paper)[0], "out")
    assert cmd[1:3] == ["-m", "trainer.main"]


def test_torchx_component():
    from torchx.specs.builders import materialize_appdef
    from torchx.specs.finder import get_component

    component = get_component(str(ROOT / "pipelines" / "components.py") + ":sweep")
    assert not component.validation_errors, component.validation_errors
    app = materialize_appdef(component.fn, ["--spec", "configs/sweeps/paper.yaml", "--output", "/runs/paper", "--gpu", "8",
                                            "--max_retries", "3", "--", "--models", "dcnv2"])  # fmt: skip
    (role,) = app.roles
    assert role.entrypoint == "python"
    assert role.args == ["-m", "pipelines.sweep", "--spec", "configs/sweeps/paper.yaml", "--output", "/runs/paper", "--models", "dcnv2"]
    assert role.resource.gpu == 8 and role.max_retries == 3 and app.name == "ctr-sweep"
