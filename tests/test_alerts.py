"""Collapse alerts: the rules file, its CRD twin, and a real Prometheus + Pushgateway on
loopback firing for a collapsed embedding and not for a healthy one."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml

from tests.demo_collapse import demo_report
from tests.helpers import ROOT, free_port, ok, train
from trainer.collapse.gram import field_gram
from trainer.collapse.analysis import CollapseReport, analyze_field
from trainer.collapse.toy import fixed_partner_toy
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


def _promtool_series(*reports: CollapseReport) -> list[dict]:
    """promtool input series: the collapse gauges ``Telemetry`` exports for each report, held
    for three hours."""
    series = []
    for report in reports:
        telemetry = Telemetry(report.label)
        telemetry.record_collapse(report)
        for family in telemetry.registry.collect():
            for sample in family.samples:
                if sample.name.startswith("ctr_embedding_") and math.isfinite(sample.value):
                    labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                    series.append({"series": f"{sample.name}{{{labels}}}", "values": f"{sample.value!r}x180"})
    return series


def test_the_demo_model_fires_no_alert_and_fires_once_a_large_field_collapses(tmp_path):
    """``make demo``'s healthy model (12 of its 39 fields with fewer ids than the dimension)
    fires nothing under the shipped rules, nor does the toy's table trained against a
    full-rank partner; the toy's table trained against a fixed rank-1 partner fires, and so
    does the demo's report with one large field collapsed and its sets converged, for that
    field only: the exported series are the ones the rules read."""
    broken = demo_report("demo-broken")
    c3 = broken.get_field("C3")
    c3.set_ia_normalized[1] = 0.2
    c3.mean_diversity = 0.01 * c3.random_mean_diversity
    fired = {
        "EmbeddingFieldCollapsed": [{
            "exp_labels": {"severity": "warning", "run": "demo-broken", "field": "C3", "set": "1", "rank_bound": "false"},
            "exp_annotations": {
                "summary": "Embedding of field C3 (set 1) collapsed in run demo-broken",
                "description": "Information abundance is 0.20 of a random table's: the table spans a low-dimensional "
                               "subspace. Consider multi-embedding (embedding.mode: me).",
            },
        }],
        "EmbeddingSetsConverged": [{
            "exp_labels": {"severity": "warning", "run": "demo-broken", "field": "C3", "rank_bound": "false"},
            "exp_annotations": {
                "summary": "Embedding sets of field C3 became similar in run demo-broken",
                "description": "Set diversity is 0.010 of random sets' diversity: the multi-embedding sets span the same subspace.",
            },
        }],
    }  # fmt: skip
    collapsed, healthy = trained_toy_tables()
    ratio = _report("toy-collapsed", collapsed).fields[0].set_ia_normalized[0]
    fired["EmbeddingFieldCollapsed"].append({
        "exp_labels": {"severity": "warning", "run": "toy-collapsed", "field": "C1", "set": "0", "rank_bound": "false"},
        "exp_annotations": {
            "summary": "Embedding of field C1 (set 0) collapsed in run toy-collapsed",
            "description": f"Information abundance is {ratio:.2f} of a random table's: the table spans a low-dimensional "
                           "subspace. Consider multi-embedding (embedding.mode: me).",
        },
    })  # fmt: skip
    names = [r["alert"] for g in yaml.safe_load((RULES / "rules.yaml").read_text())["groups"] for r in g["rules"]]
    unit = {
        "rule_files": [str(RULES / "rules.yaml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": _promtool_series(demo_report("demo"), broken, _report("toy-collapsed", collapsed),
                                             _report("toy-healthy", healthy)),
            "alert_rule_test": [{"eval_time": "2h", "alertname": n, "exp_alerts": fired.get(n, [])} for n in names],
        }],
    }  # fmt: skip
    (tmp_path / "demo_test.yaml").write_text(yaml.safe_dump(unit, width=1000))
    done = subprocess.run(["promtool", "test", "rules", "demo_test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


def _report(run: str, *tables) -> CollapseReport:
    """A CollapseReport of one field ``C1`` whose embedding sets are ``tables`` (rows, dim) each."""
    field = analyze_field(field_gram(list(tables), field="C1"))
    return CollapseReport(source="toy", label=run, fields=[field], num_sets=len(tables), dim=tables[0].shape[1])


def trained_toy_tables(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The toy's field table trained against a fixed rank-1 partner (collapsed: IA / random
    0.168-0.175 on seeds 0-9) and against a full-rank one (healthy: 0.81-0.97), 300
    full-batch steps each (``trainer.collapse.toy.fixed_partner_toy``)."""
    return tuple(fixed_partner_toy(rank, seed=seed).trained.numpy() for rank in (1, 10))


def converged_sets(rows: int = 2000, dim: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two embedding sets of a large field that span the same subspace: the second is the
    first rotated within it, plus noise far below its scale (multi-embedding degenerated into
    single-embedding). Each set alone is as rich as a random table."""
    rng = np.random.default_rng(seed)
    first = rng.uniform(-1, 1, (rows, dim)) / np.sqrt(rows)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return first, first @ rotation + 1e-4 * rng.standard_normal((rows, dim)) / np.sqrt(rows)


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


def _alerts(prometheus: str) -> list[dict]:
    return _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]


def _series(prometheus: str, query: str) -> list[dict]:
    return _get(f"{prometheus}/api/v1/query?query={urllib.parse.quote(query)}")["data"]["result"]


# The demo's model (DCNv2, multi-embedding 2 sets of dim 10) on the tiny dataset: 18 of its 39
# fields have fewer ids than the set dimension, like 12 of the demo's.
DEMO_LIKE = ("embedding.base_dim=10", "train.max_steps=6")


@pytest.mark.slow
def test_alerts_fire_for_collapsed_embeddings_and_not_for_a_healthy_demo_like_run(prometheus_stack, tiny_dataset, tmp_path):
    """A trained, healthy demo-like run, small-id fields included, fires nothing, nor does the
    toy's table trained against a full-rank partner; the toy's table trained against a fixed
    rank-1 partner and the converged sets fire, and only those."""
    gateway, prometheus = prometheus_stack
    ok(train(f"data.path={tiny_dataset}", f"run.dir={tmp_path / 'run'}", *DEMO_LIKE,
             f"monitoring.pushgateway={gateway}", "monitoring.run_id=demo-like"))  # fmt: skip
    fields = {f["name"]: f["cardinality"] for f in json.loads((tiny_dataset / "schema.json").read_text())["sparse_fields"]}
    small = {name for name, rows in fields.items() if rows <= 10}  # fewer ids than the dim: diversity 0 by construction
    assert len(small) >= 10, fields
    # every field of the healthy run is in Prometheus, the small ones too: its silence means something
    diversity = _wait_until(lambda: _series(prometheus, 'ctr_embedding_set_diversity{run="demo-like"}'), 30, "the run's gauges")
    assert {s["metric"]["field"] for s in diversity} == set(fields)
    assert all(float(s["value"][1]) < 0.05 for s in diversity if s["metric"]["field"] in small)  # what today's raw rule saw

    collapsed, healthy = trained_toy_tables()
    for run, report in (
        ("demo", demo_report("demo")),  # the figures of `make demo`'s model (tests/data/)
        ("toy-collapsed", _report("toy-collapsed", collapsed)),
        ("toy-healthy", _report("toy-healthy", healthy)),
        ("toy-converged", _report("toy-converged", *converged_sets())),
    ):
        Telemetry(run, pushgateway=gateway).record_collapse(report)
    expected = {("EmbeddingFieldCollapsed", "toy-collapsed", "C1"), ("EmbeddingSetsConverged", "toy-converged", "C1")}

    def toys_firing():
        got = {(a["labels"]["alertname"], a["labels"]["run"], a["labels"]["field"]) for a in _alerts(prometheus)
               if a["state"] == "firing" and "field" in a["labels"]}  # fmt: skip
        return expected <= got

    _wait_until(toys_firing, 60, "the toys' alerts to fire")
    time.sleep(3)  # a few more evaluations of everything scraped
    alerts = _alerts(prometheus)
    got = {(a["labels"]["alertname"], a["labels"]["run"], a["labels"].get("field")) for a in alerts}
    healthy = sorted((run, name, field) for name, run, field in got if run in ("demo-like", "demo"))
    assert not healthy, f"a healthy model fired {healthy}"
    assert got == expected
    # the healthy toy's series is there (so its silence means something): scraped, above the threshold
    ratios = {s["metric"]["run"]: float(s["value"][1]) for s in _series(prometheus, 'ctr_embedding_information_abundance_ratio{set="0"}')}
    assert ratios["toy-healthy"] > 0.25 > ratios["toy-collapsed"]

    # every query of the Grafana dashboard shows these runs (Grafana's multi-value $run is a
    # regex alternation), but the one that needs an hour of history; the silence panel leaves
    # out the run that finished (demo-like) and keeps the one that never said so (demo)
    board = json.loads((ROOT / "deploy" / "grafana" / "ctr-training.json").read_text())
    expected_runs = {"IA / random, now vs an hour ago": set(), "Silent for (unfinished runs)": {"demo"}}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$run", "(demo-like|demo)").replace("$field", ".*")
            shown = {s["metric"].get("run") for s in _series(prometheus, expr)}
            if panel["title"] in expected_runs:
                assert shown == expected_runs[panel["title"]], (panel["title"], expr, shown)
            else:
                assert shown and shown <= {"demo-like", "demo"}, (panel["title"], target["refId"], expr, shown)


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
