"""``make gpu-check`` (tools/gpu_check.py) on a CPU machine: it refuses cleanly, ``--help``
answers, and ``--dry-run`` lists every step with commands whose ``--set`` keys are the ones
``trainer.main --help`` lists (and whose values the config accepts): drift in the config
breaks this test, not the first run on a GPU node."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.helpers import PYTHON, ROOT, run
from trainer.job_config import load_config

SCRIPT = str(ROOT / "tools" / "gpu_check.py")
STEPS = ["driver", "torch", "install", "fbgemm", "torchrec", "versions", "trainer imports", "data",
         "train row_wise", "train table_wise", "train uvm_caching", "resume row_wise", "export", "parity"]
# one key of trainer.main's help epilog: "  train.epochs (int, default 10): ..."
KEY = re.compile(r"^  ([a-z_]+\.[a-z_.]+) \(")


def no_gpu_here() -> bool:
    import torch

    return not torch.cuda.is_available() and shutil.which("nvidia-smi") is None


@pytest.fixture(scope="module")
def help_keys() -> set[str]:
    proc = run([PYTHON, "-m", "trainer.main", "--help"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    keys = {m[1] for m in map(KEY.match, proc.stdout.splitlines()) if m}
    assert {"data.path", "run.device", "optim.embedding", "sharding.sharding_types"} <= keys, sorted(keys)
    return keys


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """step -> the commands (token lists) ``--dry-run`` prints under it."""
    work = tmp_path_factory.mktemp("gpu_check")
    proc = run([PYTHON, SCRIPT, "--dry-run", "--workdir", str(work / "w")], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (work / "w").exists(), "--dry-run must not create anything"
    steps: dict[str, list[list[str]]] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line.startswith("[step] "):
            current = line[len("[step] "):].split(":", 1)[0]
            steps[current] = []
        elif line.startswith("  $ "):
            steps[current].append(shlex.split(line[4:]))
    return steps


def set_overrides(cmd: list[str]) -> list[str]:
    """The ``KEY=VALUE`` tokens after ``--set`` (up to the next flag)."""
    out, on = [], False
    for token in cmd:
        if token == "--set":
            on = True
        elif token.startswith("--"):
            on = False
        elif on:
            out.append(token)
    return out


@pytest.mark.skipif("not no_gpu_here()", reason="this machine has a GPU: the refusal is for machines without one")
def test_refuses_cleanly_without_a_gpu(tmp_path):
    proc = run([PYTHON, SCRIPT, "--workdir", str(tmp_path / "w")], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == ("gpu-check: no CUDA device here (torch.cuda.is_available() is False; "
                                   "nvidia-smi: not found): nothing to check"), proc.stderr
    assert not (tmp_path / "w").exists()


def test_help_answers():
    proc = run([PYTHON, SCRIPT, "--help"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--wheels", "--dry-run", "--workdir"):
        assert flag in proc.stdout


def test_dry_run_lists_every_step_in_order(dry_run):
    assert list(dry_run) == STEPS


def test_every_set_key_is_one_trainer_main_help_lists_and_the_config_accepts(dry_run, help_keys):
    train_cmds = [cmd for step, cmds in dry_run.items() for cmd in cmds if "trainer/main.py" in cmd]
    assert len(train_cmds) == 4
    for cmd in train_cmds:
        overrides = set_overrides(cmd)
        assert overrides, cmd
        unknown = sorted({o.split("=", 1)[0] for o in overrides} - help_keys)
        assert not unknown, f"not keys of trainer.main --help: {unknown}"
        load_config(None, overrides)  # the values too (no torch: pure config)


def test_the_runs_are_what_the_check_promises(dry_run):
    def keys(step: str) -> dict[str, str]:
        [cmd] = dry_run[step]
        return dict(o.split("=", 1) for o in set_overrides(cmd))

    for step in ("train row_wise", "train table_wise", "train uvm_caching", "resume row_wise"):
        [cmd] = dry_run[step]
        assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "trainer/main.py"], cmd
        assert cmd[-2:] == ["--resume", "auto"]
        k = keys(step)
        assert k["run.device"] == "cuda" and k["optim.embedding"] == "adam" and k["model.name"] == "dcnv2"
        assert k["embedding.mode"] == "me"
    assert keys("train row_wise")["sharding.sharding_types"] == "[row_wise]"
    assert keys("train table_wise")["sharding.sharding_types"] == "[table_wise]"
    assert keys("train uvm_caching")["sharding.compute_kernel"] == "fused_uvm_caching"
    first, resumed = keys("train row_wise"), keys("resume row_wise")
    assert resumed["run.dir"] == first["run.dir"]
    assert int(resumed["train.max_steps"]) > int(first["train.max_steps"]) > 0
    synthetic, preprocess = dry_run["data"]
    assert synthetic[1:3] == ["-m", "trainer.data.synthetic"] and "criteo-tsv" in synthetic
    assert preprocess[1:3] == ["-m", "trainer.data.preprocess"]
    [export] = dry_run["export"]
    assert export[1:3] == ["-m", "trainer.export"] and export[export.index("--checkpoint") + 1] == first["run.dir"]
    install = dry_run["install"]
    assert all("--no-index" in cmd for cmd in install) and any("--no-deps" in cmd and "torchrec" in cmd for cmd in install)
    assert not any(token.startswith("torch==") or token == "torch" for cmd in install for token in cmd), "never reinstall torch"


def test_pins_read_with_tomllib_are_the_set_up_scripts():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
        import setup_env
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert gpu_check.read_pins() == setup_env.read_accelerator_pins()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_target_uses_the_venv_or_the_given_python():
    def dry(*args: str) -> str:
        proc = subprocess.run(["make", "-n", "gpu-check", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in __import__("os").environ.items() if k != "PYTHON"})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert ".venv/bin/python tools/gpu_check.py" in dry()
    assert "python3 tools/gpu_check.py --wheels /opt/wheels" in dry("PYTHON=python3", "WHEELS=/opt/wheels")
