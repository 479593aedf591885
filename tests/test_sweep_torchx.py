"""The sweep on a scheduler (``launcher.scheduler`` / ``--scheduler``): one torchx job per cell.

A kubernetes dry run (no cluster: torchx's dryrun only) prints one Volcano job per
unfinished cell with the cell's overrides and skips finished cells; a real ``local_cwd``
sweep of one tiny cell ends with the same numbers and table as the subprocess launcher; a
URL output is refused for the subprocess launcher and written through fsspec otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import yaml

from pipelines import sweep as sw
from pipelines import sweep_launcher, sweep_spec
from tests.helpers import ok, user_error
from tests.sweep_helpers import sweep_cli, tiny_spec
from trainer.errors import UserError

K8S = {"namespace": "ctr", "queue": "ctr", "service_account": "ctr-trainer"}


def test_kubernetes_dry_run_one_volcano_job_per_unfinished_cell(tmp_path, tiny_dataset):
    launcher = {"scheduler_args": K8S, "image": "REGISTRY/ctr-multiembed:TAG", "nproc": 2, "gpu": 2, "memMB": 100000}
    spec_path = tiny_spec(tmp_path, tiny_dataset, "k8s", models=["dnn"], launcher=launcher)
    spec = sweep_spec.load_spec(spec_path)
    out = tmp_path / "k8s"
    # a finished cell: a complete summary.json in its run directory
    done = next(c for c in sweep_spec.plan_cells(spec) if c.id == "tiny-dnn-se2x-seed0")
    summary = {key: 0.5 for key in __import__("trainer.run_dir", fromlist=["SUMMARY_KEYS"]).SUMMARY_KEYS}
    (out / "cells" / done.id).mkdir(parents=True)
    (out / "cells" / done.id / "summary.json").write_text(json.dumps(summary))

    proc = ok(sweep_cli(spec_path, "--scheduler", "kubernetes", "--dry-run"))
    jobs = [doc for doc in proc.stdout.split("--- cell ")[1:] if "kind: Job" in doc]
    assert len(jobs) == 2, proc.stdout  # 1x (shared) and me2x; se2x is done
    assert f"{done.id}: done, skipped" in proc.stdout
    assert not list((out / "cells").glob("tiny-dnn-1x-seed0"))  # nothing submitted, nothing written
    for cell_id, mode, scale in (("tiny-dnn-1x-seed0", "se", 1), ("tiny-dnn-me2x-seed0", "me", 2)):
        text = next(j for j in jobs if j.startswith(cell_id))
        job = yaml.safe_load(text.split("\n", 1)[1])
        assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["spec"]["queue"] == "ctr"
        pod = job["spec"]["tasks"][0]["template"]["spec"]
        assert pod["serviceAccountName"] == "ctr-trainer"
        (container,) = pod["containers"]
        assert container["image"] == "REGISTRY/ctr-multiembed:TAG"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        cmd = " ".join(container["command"])
        assert "--nproc_per_node 2" in cmd and "trainer/main.py" in cmd and "--resume auto" in cmd
        for override in sweep_spec.cell_overrides(spec, next(c for c in sweep_spec.plan_cells(spec) if c.id == cell_id), str(out)):
            assert override in cmd, (override, cmd)
        assert f"embedding.mode={mode}" in cmd and f"embedding.scale={scale}" in cmd
        assert job["spec"]["tasks"][0]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "train"  # NetworkPolicy


def test_scheduler_spec_and_url_output(tmp_path, tiny_dataset):
    spec_path = tiny_spec(tmp_path, tiny_dataset, "s", models=["dnn"])
    with pytest.raises(UserError, match="launcher.scheduler"):
        sweep_spec.load_spec(spec_path, ["launcher.scheduler=slurm"])
    with pytest.raises(UserError, match="subprocess needs a local directory"):
        sweep_spec.load_spec(spec_path, ["output=s3://bucket/sweep"])
    user_error(sweep_cli(spec_path, "--output", "s3://bucket/sweep", "--dry-run"), "subprocess needs a local directory")
    spec = sweep_spec.load_spec(spec_path, ["output=memory://sweep", "launcher.scheduler=kubernetes"])
    assert spec.launcher.torchx and spec.launcher.scheduler == "kubernetes"
    cell = sweep_spec.plan_cells(spec)[0]
    assert sweep_spec.cell_log("memory://sweep", cell) == f"memory://sweep/logs/{cell.id}.log"
    # the report and the cells' logs through fsspec
    records = sw.collect_records(spec, sweep_spec.plan_cells(spec), "memory://sweep", {})
    sw.write_report(spec, "memory://sweep", records, plots=False)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/sweep/table.md") and len(fs.cat_file("/sweep/results.jsonl").decode().splitlines()) == len(records)
    sweep_launcher.append_text("memory://sweep/logs/x.log", "a\n")
    sweep_launcher.append_text("memory://sweep/logs/x.log", "b\n")
    assert fs.cat_file("/sweep/logs/x.log") == b"a\nb\n"
    with sweep_launcher.output_lock("memory://sweep"):  # no lock on an object store, no error
        pass


@pytest.mark.slow
def test_local_cwd_sweep_matches_the_subprocess_sweep(tmp_path, tiny_dataset):
    """One tiny cell trained as a torchx local_cwd job and as a subprocess: same numbers, same table."""
    sub = tiny_spec(tmp_path, tiny_dataset, "sub", models=["dnn"], modes=["me"], scales=[1])
    tx = tiny_spec(tmp_path, tiny_dataset, "tx", models=["dnn"], modes=["me"], scales=[1])
    ok(sweep_cli(sub))
    proc = ok(sweep_cli(tx, "--scheduler", "local_cwd"))
    assert "torchx job local_cwd://" in proc.stderr, proc.stderr[-3000:]
    a = {r["id"]: r for r in map(json.loads, (tmp_path / "sub" / "results.jsonl").read_text().splitlines())}
    b = {r["id"]: r for r in map(json.loads, (tmp_path / "tx" / "results.jsonl").read_text().splitlines())}
    assert set(a) == set(b) == {"tiny-dnn-me1x-seed0"}
    ra, rb = a["tiny-dnn-me1x-seed0"], b["tiny-dnn-me1x-seed0"]
    assert rb["status"] == "done" and Path(rb["run_dir"], "summary.json").exists()
    assert "torchx job local_cwd://" in Path(rb["log"]).read_text()
    for key in ("test_auc", "test_logloss", "steps"):
        assert rb[key] == pytest.approx(ra[key], rel=1e-4), key
    table = lambda p: [line for line in (p / "table.md").read_text().splitlines() if line.startswith("|")]  # noqa: E731
    assert table(tmp_path / "tx") == table(tmp_path / "sub")
    # a rerun skips the finished cell: no job submitted
    again = ok(sweep_cli(tx, "--scheduler", "local_cwd"))
    assert "1 already done (skipped), 0 to train" in again.stderr and "torchx job" not in again.stderr
