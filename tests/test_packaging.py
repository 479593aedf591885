"""Packaging: the extras `cpu` / `cuda` name the pinned stack of [tool.ctr.accelerator], the
console scripts answer like their `python -m` forms, and `trainer` in .venv is ours."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import PYTHON, ROOT, VENV_BIN

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = PYPROJECT["tool"]["ctr"]["accelerator"]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
SCRIPTS = {
    "ctr-train": "trainer.main:cli",
    "ctr-preprocess": "trainer.data.preprocess:cli",
    "ctr-synthetic": "trainer.data.synthetic:cli",
    "ctr-collapse": "trainer.collapse.__main__:cli",
    "ctr-export": "trainer.export.__main__:cli",
    "ctr-predict": "trainer.predict:cli",
    "ctr-pipeline": "pipelines.run:cli",
    "ctr-sweep": "pipelines.sweep:cli",
}


def _pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for r in requirements:
        name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][^;\s]*)", r).groups()
        out[name.lower().replace("_", "-")] = version
    return out


def test_accelerator_extras_name_the_pinned_triple():
    assert sys.version_info >= (3, 11) and PYPROJECT["project"]["requires-python"] == ">=3.11"
    fbgemm_cpu, fbgemm_cpu_version = PINS["fbgemm_cpu"].split("==")
    fbgemm_cuda, fbgemm_cuda_version = PINS["fbgemm_cuda"].split("==")
    assert (fbgemm_cpu, fbgemm_cuda) == ("fbgemm-gpu-cpu", "fbgemm-gpu")
    # TorchRec and FBGEMM are released as pairs: one version for both fbgemm builds and torchrec
    assert fbgemm_cpu_version == fbgemm_cuda_version == PINS["torchrec"]
    # CUDA: the whole triple (torchrec's fbgemm-gpu requirement is met by the pin)
    assert _pins(EXTRAS["cuda"]) == {"torch": PINS["torch"], fbgemm_cuda: fbgemm_cuda_version, "torchrec": PINS["torchrec"]}
    # CPU: no torchrec (its metadata would pull the CUDA fbgemm-gpu beside fbgemm-gpu-cpu)
    assert _pins(EXTRAS["cpu"]) == {"torch": PINS["torch"], fbgemm_cpu: fbgemm_cpu_version}
    # and nothing else pins them a second time
    others = [r for name, reqs in EXTRAS.items() if name not in ("cpu", "cuda") for r in reqs]
    others += PYPROJECT["project"]["dependencies"]
    assert not [r for r in others if re.match(r"(torch|torchrec|fbgemm[-_]gpu\S*)\s*(==|>=|~=|<|$)", r)], others


def test_setup_env_installs_what_the_extras_name():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import setup_env
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert setup_env.accelerator_requirements("cuda") == (EXTRAS["cuda"][:2], f"torchrec=={PINS['torchrec']}")
    assert setup_env.accelerator_requirements("cpu") == (EXTRAS["cpu"], f"torchrec=={PINS['torchrec']}")


def test_every_cli_has_its_console_script():
    assert PYPROJECT["project"]["scripts"] == SCRIPTS
    for target in SCRIPTS.values():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_console_script_reports_a_user_error_with_exit_2():
    script = VENV_BIN / "ctr-train"
    if not script.exists():
        pytest.fail(f"{script} is missing: reinstall the project (make setup, or .venv/bin/pip install --no-deps -e .)")
    result = subprocess.run([str(script), "--set", "bogus.key=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: config: unknown key(s) ['bogus']"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # eight interpreters importing torch
def test_every_console_script_answers_help():
    def help_of(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / name), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(SCRIPTS, pool.map(help_of, SCRIPTS)))
    for name, result in results.items():
        assert result.returncode == 0 and "usage:" in result.stdout, f"{name}: {result.stderr}"


def test_no_other_distribution_provides_the_trainer_package():
    """PyPI has an unrelated distribution called `trainer` (and others could ship a top-level
    `trainer`): installed beside ours, its files would overwrite or shadow our package."""
    code = (
        "import importlib.metadata as m, json, trainer, pipelines;"
        "d = m.packages_distributions();"
        "print(json.dumps({'trainer': sorted(set(d.get('trainer', []))), 'pipelines': sorted(set(d.get('pipelines', []))),"
        " 'file': trainer.__file__}))"
    )
    found = json.loads(subprocess.run([PYTHON, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout)
    assert found["trainer"] == ["ctr-multiembed"], f"top-level `trainer` provided by {found['trainer']}"
    assert found["pipelines"] == ["ctr-multiembed"], f"top-level `pipelines` provided by {found['pipelines']}"
    assert found["file"].startswith(str(ROOT / "trainer")), found["file"]


def _dry_run(*args: str) -> dict[str, str]:
    cmd = [PYTHON, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report", "-", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and re.search(r"NewConnectionError|Could not fetch URL|No matching distribution", result.stderr):
        pytest.skip(f"no package index reachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}


@pytest.mark.slow  # resolves against the package index (network, about a minute)
def test_pip_resolves_the_cuda_extra_to_one_coherent_stack():
    """`pip install ".[cuda]"` as a user runs it: torch, fbgemm-gpu and torchrec of the pinned
    triple, never fbgemm-gpu-cpu beside them. (The cpu extra is what `make setup` installs on
    every CI run, so it is exercised for real there.)"""
    resolved = _dry_run(".[cuda]")
    assert resolved["torch"].split("+")[0] == PINS["torch"]
    assert resolved["fbgemm-gpu"] == PINS["torchrec"] and "fbgemm-gpu-cpu" not in resolved, resolved
    assert resolved["torchrec"] == PINS["torchrec"]
