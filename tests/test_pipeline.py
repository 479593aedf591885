"""The torchx pipeline and components: the whole chain through ``local_cwd`` with a real
Pushgateway, a failing stage that stops it and a rerun that resumes, and the Kubernetes
requests (Volcano jobs) built by ``--dryrun``.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import PYTHON, ROOT, TINY, VENV_BIN, free_port, ok, run, user_error
from trainer.export.runtime import Predictor

pytestmark = pytest.mark.slow  # the whole pipeline and torchx, in subprocesses


@pytest.fixture
def pushgateway():
    port = free_port()
    process = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def pushed_groups(gateway: str) -> list[dict]:
    with urllib.request.urlopen(f"http://{gateway}/api/v1/metrics", timeout=5) as r:
        return json.loads(r.read())["data"]


def write_config(path: Path, root: Path, overrides: list[str]) -> Path:
    config = {
        "root": str(root),
        "run_id": "pipeline-test",
        "generate": {"rows": 8000, "cardinality_scale": 0.001},
        "preprocess": {"dataset": "criteo", "min_count": 2},
        "train": {"config": "configs/synthetic_me.yaml", "overrides": [*TINY, "train.epochs=1", *overrides], "j": "1x2"},
        "collapse": {"enabled": True},
        "export": {"enabled": True, "quantize": "none"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def pipeline(config: Path, *args: str, timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "pipelines.run", "--config", str(config), *args], timeout=timeout, **env)


def test_failed_stage_stops_the_pipeline_and_a_rerun_resumes_to_the_end(tmp_path, pushgateway):
    root = tmp_path / "pipeline"
    broken = write_config(tmp_path / "broken.yaml", root, ["train.no_such_key=1"])
    proc = pipeline(broken, CTR_PUSHGATEWAY=pushgateway)
    assert proc.returncode == 2, proc.stderr[-4000:]
    message = proc.stderr[proc.stderr.index("error: stage train failed"):]  # before it: the stages' own logs, echoed
    for needle in ("unknown key", "no_such_key", "finished stages are skipped", str(root / "logs")):
        assert needle in message, message
    assert "Traceback" not in message  # torchrun's own traceback stays in the log, not in the verdict
    assert (root / "dataset" / "schema.json").exists() and (root / "raw.tsv.oracle.json").exists()
    assert not (root / "train" / "summary.json").exists() and not (root / "collapse").exists()

    fixed = write_config(tmp_path / "fixed.yaml", root, [])
    proc = ok(pipeline(fixed, CTR_PUSHGATEWAY=pushgateway))
    log = proc.stderr
    assert "generate: already done" in log and "preprocess: already done" in log
    assert "ran: train, collapse, export" in proc.stdout

    summary = json.loads((root / "train" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_auc"] > 0.55
    collapse = json.loads((root / "collapse" / "collapse.json").read_text())
    assert (root / "collapse" / "report.html").exists() and collapse
    predictor = Predictor(root / "artifact")
    rows = [line.split("\t") for line in (root / "raw.tsv").read_text().splitlines()[:50]]
    probabilities = predictor.predict_rows(rows, labeled=True).numpy()
    assert probabilities.shape == (50,) and ((probabilities > 0) & (probabilities < 1)).all()

    groups = pushed_groups(pushgateway)
    by_job = {g["labels"]["job"]: g for g in groups if g["labels"].get("run") == "pipeline-test"}
    assert set(by_job) == {"ctr_trainer", "ctr_collapse_monitor"}, groups
    assert "ctr_validation_auc" in by_job["ctr_trainer"] and "ctr_train_loss" in by_job["ctr_trainer"]
    assert "ctr_embedding_information_abundance_ratio" in by_job["ctr_collapse_monitor"]

    proc = ok(pipeline(fixed))  # everything done: nothing runs
    assert "ran: nothing" in proc.stdout


def test_from_stage_reruns_that_stage_and_the_later_ones(tmp_path):
    root = tmp_path / "pipeline"
    config = write_config(tmp_path / "p.yaml", root, [])
    config_dict = yaml.safe_load(config.read_text())
    config_dict["collapse"]["enabled"] = False
    config_dict["export"]["enabled"] = False
    config_dict["generate"]["rows"] = 4000
    config.write_text(yaml.safe_dump(config_dict))
    ok(pipeline(config, "--set", "train.overrides=[train.max_steps=2]"))
    first = (root / "dataset" / "schema.json").stat().st_mtime_ns
    proc = ok(pipeline(config, "--from", "train", "--set", "train.overrides=[train.max_steps=2]"))
    assert "removing" in proc.stderr and "ran: train" in proc.stdout
    assert "[train] " in proc.stderr  # the stage's own log, echoed as it runs
    assert (root / "dataset" / "schema.json").stat().st_mtime_ns == first


@pytest.mark.parametrize("case, needles", [
    ("root: x\nbogus: 1\n", ["unknown key", "bogus"]),
    ("root: x\nscheduler: slurm\n", ["scheduler 'slurm'", "local_cwd"]),
    ("root: x\ngenerate: {rows: 0}\n", ["preprocess.input"]),
    ("root: x\ngenerate: {rows: 10}\ntrain: {overrides: [run.dir=elsewhere]}\n", ["set by the pipeline"]),
])
def test_bad_pipeline_configs_are_clear_errors(case, needles, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(case)
    user_error(pipeline(config, timeout=60), *needles)


def test_kubernetes_dryrun_of_the_pipeline_gives_volcano_jobs():
    proc = ok(pipeline(ROOT / "configs" / "pipelines" / "kubernetes.yaml", "--dryrun", timeout=120))
    out = proc.stdout
    assert out.count("kind: Job") == 4 and out.count("apiVersion: batch.volcano.sh/v1alpha1") == 4
    for stage in ("preprocess", "train", "collapse", "export"):
        assert f"--- stage {stage} -> s3://ctr-example/pipelines/criteo-dcnv2-me4x/" in out
    assert "queue: ctr" in out and "serviceAccountName: ctr-trainer" in out


def test_pipeline_gives_the_preprocess_job_one_replica_per_worker(capsys):
    from pipelines.run import main

    main(["--config", str(ROOT / "configs" / "pipelines" / "kubernetes.yaml"), "--dryrun", "--set", "preprocess.workers=2"])
    out = capsys.readouterr().out
    job = yaml.safe_load(out.split("--- stage preprocess -> ", 1)[1].split("\n", 1)[1].split("--- stage train", 1)[0])
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2 and all(t["replicas"] == 1 for t in tasks)
    for i, task in enumerate(tasks):
        (container,) = task["template"]["spec"]["containers"]
        command = container["command"]
        assert command[command.index("--workers") + 1] == "2" and command[command.index("--worker") + 1] == str(i)


def _volcano_job(stdout: str) -> dict:
    request = stdout.split("=== SCHEDULER REQUEST ===", 1)[1]
    return yaml.safe_load(request)


def test_kubernetes_dryrun_of_the_train_component_for_2x8():
    cmd = [
        str(VENV_BIN / "torchx"), "run", "-s", "kubernetes", "--dryrun", "--workspace", "",
        "-cfg", "queue=ctr,namespace=ctr,service_account=ctr-trainer",
        "pipelines/components.py:train",
        "--config", "configs/criteo_me.yaml", "--data", "s3://b/criteo", "--run_dir", "s3://b/runs/me4x",
        "-j", "2x8", "--gpu", "8", "--memMB", "480000", "--image", "registry.example.com/ctr-multiembed:0.1.0",
        "--pushgateway", "pushgateway.ctr.svc:9091", "--run_id", "me4x", "--max_retries", "3",
        "--mounts", "type=volume,src=ctr-scratch,dst=/scratch",
        "embedding.scale=4",
    ]
    job = _volcano_job(ok(run(cmd, timeout=120)).stdout)
    assert job["kind"] == "Job" and job["apiVersion"] == "batch.volcano.sh/v1alpha1"
    assert job["spec"]["queue"] == "ctr" and job["spec"]["maxRetry"] == 3
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2  # two hosts
    for task in tasks:
        pod = task["template"]["spec"]
        assert pod["serviceAccountName"] == "ctr-trainer"
        (container,) = pod["containers"]
        assert container["image"] == "registry.example.com/ctr-multiembed:0.1.0"
        command = " ".join(container["command"])
        assert "torchrun" in command and "--nnodes 2" in command and "--nproc_per_node 8" in command
        assert "trainer/main.py --config configs/criteo_me.yaml --resume auto --set data.path=s3://b/criteo" in command
        assert "run.dir=s3://b/runs/me4x embedding.scale=4" in command
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8" and limits["memory"] == "480000M"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["CTR_PUSHGATEWAY"] == "pushgateway.ctr.svc:9091" and env["CTR_RUN_ID"] == "me4x"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/scratch" in mounts
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[mounts["/scratch"]] == "ctr-scratch"


def test_components_document_their_arguments():
    for name in ("generate", "preprocess", "train", "collapse_monitor", "export", "sweep", "pipeline"):
        proc = ok(run([str(VENV_BIN / "torchx"), "run", f"pipelines/components.py:{name}", "--help"], timeout=60))
        assert "usage" in proc.stdout.lower() and "--image" in proc.stdout, name


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    config = tmp_path / "k8s.yaml"
    config.write_text(f"root: {tmp_path / 'root'}\nscheduler: kubernetes\ngenerate: {{rows: 10}}\n")
    proc = pipeline(config, timeout=120, KUBECONFIG=str(tmp_path / "no-kubeconfig"))
    user_error(proc, "stage generate: cannot submit it to kubernetes")
