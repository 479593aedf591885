"""Collapse alerts: the rules file, its CRD twin, and a real Prometheus + Pushgateway on
loopback firing for a collapsed embedding and not for a healthy one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.helpers import ROOT, free_port, ok, train
from trainer.collapse.gram import field_gram
from trainer.collapse.analysis import CollapseReport, analyze_field
from trainer.collapse.toy import interaction_collapse_toy
from trainer.telemetry import Telemetry

RULES = ROOT / "deploy" / "prometheus"
NEEDS = {"promtool": "prometheus", "prometheus": "prometheus", "prometheus-pushgateway": "prometheus-pushgateway"}
missing = [binary for binary in NEEDS if shutil.which(binary) is None]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"{missing} not installed (make setup installs Debian's prometheus packages as root)"
)


def test_rules_pass_promtool_check_and_unit_tests():
    check = subprocess.run(["promtool", "check", "rules", "rules.yaml"], cwd=RULES, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 4 rules found" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", "rules_test.yaml"], cwd=RULES, capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_prometheusrule_crd_carries_exactly_the_rules_file():
    stale = subprocess.run([sys.executable, str(RULES / "render_prometheusrule.py"), "--check"], capture_output=True, text=True)
    assert stale.returncode == 0, stale.stderr
    crd = yaml.safe_load((RULES / "prometheusrule.yaml").read_text())
    assert (crd["apiVersion"], crd["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert crd["spec"]["groups"] == yaml.safe_load((RULES / "rules.yaml").read_text())["groups"]


def _report(table, run: str) -> CollapseReport:
    """A CollapseReport of one single-set field holding ``table`` (rows, dim)."""
    field = analyze_field(field_gram([table], field="C1"))
    return CollapseReport(source="toy", label=run, fields=[field], num_sets=1, dim=table.shape[1])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus_stack(tmp_path):
    """Pushgateway + Prometheus on loopback; Prometheus scrapes the gateway every second and
    evaluates the shipped rules, with `for:` durations cut to 0s (the only change)."""
    gateway_port, prometheus_port = free_port(), free_port()
    rules = yaml.safe_load((RULES / "rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [
            {"job_name": "pushgateway", "honor_labels": True, "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    processes = [
        subprocess.Popen(
            ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{gateway_port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        prometheus = f"http://127.0.0.1:{prometheus_port}"
        _wait_until(lambda: _ready(f"{prometheus}/-/ready") and _ready(f"http://127.0.0.1:{gateway_port}/-/ready"), 30, "servers")
        yield f"127.0.0.1:{gateway_port}", prometheus
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=10)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_alert_fires_for_a_collapsed_embedding_and_not_for_a_healthy_one(prometheus_stack):
    gateway, prometheus = prometheus_stack
    collapsed = interaction_collapse_toy(fixed_rank=1)  # interacted with a rank-1 field
    healthy = interaction_collapse_toy(fixed_rank=None)  # interacted with a full-rank field
    for run, result in (("toy-collapsed", collapsed), ("toy-healthy", healthy)):
        Telemetry(run, pushgateway=gateway).record_collapse(_report(result.trained, run))

    def firing():
        alerts = _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "EmbeddingFieldCollapsed" and a["state"] == "firing"]

    alerts = _wait_until(firing, 60, "EmbeddingFieldCollapsed to fire")
    assert {(a["labels"]["run"], a["labels"]["field"]) for a in alerts} == {("toy-collapsed", "C1")}
    # the healthy run's series is there (so its silence means something): scraped, above the threshold
    query = "ctr_embedding_information_abundance_ratio"
    series = _get(f"{prometheus}/api/v1/query?query={query}")["data"]["result"]
    ratios = {s["metric"]["run"]: float(s["value"][1]) for s in series}
    assert ratios["toy-healthy"] > 0.25 > ratios["toy-collapsed"]


def test_unreachable_pushgateway_warns_once_and_never_raises(caplog):
    closed_port = free_port()  # nothing listens there
    telemetry = Telemetry("r", pushgateway=f"127.0.0.1:{closed_port}")
    with caplog.at_level("WARNING", logger="trainer.telemetry"):
        for step in range(3):
            telemetry.record_train(step, loss=0.5, examples=10, examples_per_second=1.0)
        telemetry.record_validation(0.7, 0.5)
        assert telemetry.close()  # the pushes are tried in the background: a refused one does not wait
    warnings = [r for r in caplog.records if "Pushgateway" in r.getMessage()]
    assert len(warnings) == 1 and f"127.0.0.1:{closed_port}" in warnings[0].getMessage()


@pytest.mark.slow
def test_training_job_pushes_its_metrics_to_a_real_pushgateway(prometheus_stack, tiny_dataset, tmp_path):
    """The trainer's own export (rank 0, Pushgateway, grouping key run=<id>), read back
    through Prometheus: validation metrics and per-field, per-set collapse gauges."""
    gateway, prometheus = prometheus_stack
    ok(train(f"data.path={tiny_dataset}", f"run.dir={tmp_path / 'run'}", "train.max_steps=6",
             f"monitoring.pushgateway={gateway}", "monitoring.run_id=pushed-run"))  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())

    def scraped(query):
        result = _get(f"{prometheus}/api/v1/query?query={query}")["data"]["result"]
        return [r for r in result if r["metric"].get("run") == "pushed-run"]

    ia = _wait_until(lambda: scraped("ctr_embedding_information_abundance"), 30, "the pushed IA gauges")
    fields = json.loads((tiny_dataset / "schema.json").read_text())["sparse_fields"]
    assert {(r["metric"]["field"], r["metric"]["set"]) for r in ia} == {
        (f["name"], s) for f in fields for s in ("0", "1", "all")
    }
    auc = scraped("ctr_validation_auc")
    assert len(auc) == 1 and 0.5 < float(auc[0]["value"][1]) <= 1.0
    assert float(scraped("ctr_train_step")[0]["value"][1]) == summary["steps"]
    assert scraped("ctr_last_success_timestamp_seconds") and scraped("ctr_train_examples_total")

    # the offline monitor pushes the same gauges for a checkpoint, under its own run label
    offline = subprocess.run(
        [sys.executable, "-m", "trainer.collapse", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "report"),
         "--no-plots", "--pushgateway", gateway, "--run-id", "offline-run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr

    def offline_ia():
        result = _get(f"{prometheus}/api/v1/query?query=ctr_embedding_information_abundance")["data"]["result"]
        return {(r["metric"]["field"], r["metric"]["set"]): float(r["value"][1]) for r in result if r["metric"]["run"] == "offline-run"}

    measured = _wait_until(offline_ia, 30, "the offline monitor's gauges")
    online = {(r["metric"]["field"], r["metric"]["set"]): float(r["value"][1]) for r in ia}
    assert measured.keys() == online.keys()
    # the final checkpoint holds the weights the job measured at its last evaluation
    assert all(abs(measured[k] - online[k]) < 1e-6 * max(1.0, online[k]) for k in online)


def test_metrics_are_served_on_a_metrics_port():
    port = free_port()
    telemetry = Telemetry("served-run", metrics_port=port)
    telemetry.record_train(7, loss=0.25, examples=100, examples_per_second=50.0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'ctr_train_loss{run="served-run"} 0.25' in text
    assert 'ctr_train_examples_total{run="served-run"} 100.0' in text
