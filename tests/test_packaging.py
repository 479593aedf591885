"""Packaging: the extras `cpu` / `cuda` name the pinned stack of [tool.ctr.accelerator] (and
uv's tables keep them apart), pip resolves each as README "Install" prints it, the console
scripts answer like their `python -m` forms, and `trainer` in .venv is ours."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.request
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


def readme_cpu_install() -> list[str]:
    """README "Install"'s pip command for the cpu extra, as tokens."""
    [line] = re.findall(r'^ *(pip install "\.\[cpu\]".*)$', (ROOT / "README.md").read_text(), re.M)
    return shlex.split(line)


def test_uv_keeps_the_extras_apart_and_takes_the_cpu_torch_from_the_readme_index():
    """`uv sync --extra cpu|cuda`: the extras conflict (one build of the stack), and the cpu
    extra's torch comes from the CPU index README's pip command names, explicit (only the
    packages routed there are looked up there)."""
    uv = PYPROJECT["tool"]["uv"]
    assert uv["conflicts"] == [[{"extra": "cpu"}, {"extra": "cuda"}]]
    indexes = {index["name"]: index for index in uv["index"]}
    assert uv["sources"] == {"torch": [{"index": "pytorch-cpu", "extra": "cpu"}]}
    assert "torch" in _pins(EXTRAS["cpu"]) and indexes["pytorch-cpu"]["explicit"] is True
    cmd = readme_cpu_install()
    assert indexes["pytorch-cpu"]["url"] == cmd[cmd.index("--extra-index-url") + 1]


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
    """What ``pip install ARGS`` would install, resolved as a user's pip would: without this
    machine's pip configuration (its local wheel folders and indexes)."""
    for url in ["https://pypi.org/simple/", *(args[i + 1] for i, a in enumerate(args) if a == "--extra-index-url")]:
        try:
            urllib.request.urlopen(url, timeout=10).close()
        except OSError as e:
            pytest.skip(f"{url} is not reachable from here: {e}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    cmd = [PYTHON, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--retries", "1", "--report", "-",
           *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if result.returncode != 0 and re.search(r"NewConnectionError|Could not fetch URL|No matching distribution", result.stderr):
        pytest.skip(f"no package index reachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}


@pytest.mark.slow  # resolves against the package index (network, about a minute)
def test_pip_resolves_the_cuda_extra_to_one_coherent_stack():
    """`pip install ".[cuda]"` as a user runs it: torch, fbgemm-gpu and torchrec of the pinned
    triple, never fbgemm-gpu-cpu beside them."""
    resolved = _dry_run(".[cuda]")
    assert resolved["torch"].split("+")[0] == PINS["torch"]
    assert resolved["fbgemm-gpu"] == PINS["torchrec"] and "fbgemm-gpu-cpu" not in resolved, resolved
    assert resolved["torchrec"] == PINS["torchrec"]
    assert any(name.startswith("nvidia-") for name in resolved), "not the CUDA torch: no CUDA libraries"


@pytest.mark.slow  # resolves against PyPI and PyTorch's CPU index (network, about a minute)
def test_pip_resolves_the_cpu_extra_as_readme_prints_it():
    """README "Install"'s command for the cpu extra: torch's CPU build from PyTorch's index and
    fbgemm-gpu-cpu, never the CUDA fbgemm-gpu, torchrec (installed next, without its
    dependencies) or a CUDA library."""
    cmd = readme_cpu_install()
    assert cmd[:2] == ["pip", "install"], cmd
    resolved = _dry_run(*cmd[2:])
    assert resolved["torch"] == f"{PINS['torch']}+cpu", resolved
    assert resolved["fbgemm-gpu-cpu"] == PINS["torchrec"]
    assert not {"fbgemm-gpu", "torchrec"} & set(resolved), resolved
    assert not [name for name in resolved if name.startswith("nvidia-")], resolved
