"""``make gpu-check`` (tools/gpu_check.py) on a CPU machine: it refuses cleanly, ``--help``
answers, and ``--dry-run`` lists every step with commands whose ``--set`` keys are the ones
``trainer.main --help`` lists (and whose values the config accepts): drift in the config
breaks this test, not the first run on a GPU node. The install step (in process): the
fbgemm-gpu / torchrec release it pins for the torch found, and its refusals (a torch with no
known match, a wheel folder without the release, an externally managed Python), and the
first step's refusal below Python 3.11."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import PYTHON, ROOT, run
from trainer.job_config import load_config

SCRIPT = str(ROOT / "tools" / "gpu_check.py")
STEPS = ["python", "driver", "torch", "install", "fbgemm", "torchrec", "versions", "trainer imports", "data",
         "train row_wise", "train table_wise", "train uvm_caching", "resume row_wise", "export", "parity"]
PINS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ctr"]["accelerator"]
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
    fbgemm, torchrec = dry_run["install"]
    assert fbgemm[-1] == f"fbgemm-gpu=={PINS['torchrec']}" and "-c" in fbgemm
    assert torchrec[-1] == f"torchrec=={PINS['torchrec']}" and "--no-deps" in torchrec
    install = dry_run["install"]
    assert all("--no-index" in cmd for cmd in install)
    assert not any(token.startswith("torch==") or token == "torch" for cmd in install for token in cmd), "never reinstall torch"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return gpu_check


def test_pins_read_with_tomllib_are_the_set_up_scripts(gpu_check):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import setup_env
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert gpu_check.read_pins() == setup_env.read_accelerator_pins()


def test_install_pins_the_fbgemm_and_torchrec_release_matching_the_torch_found(gpu_check, tmp_path):
    torch_minor = ".".join(PINS["torch"].split(".")[:2])
    for found in (PINS["torch"], f"{torch_minor}.7+cu130"):  # any build of the pinned major.minor
        assert gpu_check.matching_release(found) == PINS["torchrec"]
    fbgemm, torchrec = gpu_check.install_commands("/w", PINS["torchrec"], tmp_path / "c.txt")
    assert fbgemm[-3:] == ["-c", str(tmp_path / "c.txt"), f"fbgemm-gpu=={PINS['torchrec']}"], fbgemm
    assert torchrec[-2:] == ["--no-deps", f"torchrec=={PINS['torchrec']}"], torchrec
    for cmd in (fbgemm, torchrec):
        assert cmd[:3] == [sys.executable, "-m", "pip"] and "--no-index" in cmd
        assert cmd[cmd.index("--find-links") + 1] == "/w"


@pytest.mark.parametrize("found", ["2.12.1", "3.13.0+cu130", "2.1.3"])
def test_a_torch_with_no_known_fbgemm_match_is_refused(gpu_check, found):
    with pytest.raises(gpu_check.Failed) as info:
        gpu_check.matching_release(found)
    message = str(info.value)
    assert f"torch {found}: no fbgemm-gpu / torchrec release is known to match" in message
    assert f"pairs torch {'.'.join(PINS['torch'].split('.')[:2])} with {PINS['torchrec']}" in message


def test_the_wheel_folder_must_hold_the_matching_release(gpu_check, tmp_path):
    release = PINS["torchrec"]
    for name in ("fbgemm_gpu-1.0.0-cp311-cp311-manylinux_2_28_x86_64.whl",  # another release
                 f"fbgemm_gpu_cpu-{release}-cp311-cp311-manylinux_2_28_x86_64.whl",  # the CPU build
                 f"torchrec-{release}-py3-none-any.whl"):
        (tmp_path / name).touch()
    with pytest.raises(gpu_check.Failed) as info:
        gpu_check.check_wheels(tmp_path, release)
    message = str(info.value)
    assert f"has no fbgemm_gpu-{release}-*.whl (found:" in message and "torchrec-" not in message.split("(found")[0]
    assert f"pip download --no-deps -d {tmp_path} fbgemm-gpu=={release} torchrec=={release}" in message
    (tmp_path / f"fbgemm_gpu-{release}+cu130-cp311-cp311-manylinux_2_28_x86_64.whl").touch()  # PyTorch's index
    gpu_check.check_wheels(tmp_path, release)
    (tmp_path / f"torchrec-{release}-py3-none-any.whl").unlink()
    with pytest.raises(gpu_check.Failed, match=rf"has no torchrec-{re.escape(release)}-\*\.whl"):
        gpu_check.check_wheels(tmp_path, release)


def test_install_step_refuses_before_pip_runs(gpu_check, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(gpu_check, "importable", lambda *modules: "ModuleNotFoundError: No module named 'torchrec'")
    monkeypatch.setattr(gpu_check, "sh", lambda *a, **k: pytest.fail("pip must not run"))
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu128")
    with pytest.raises(gpu_check.Failed, match=r"torch 2\.12\.0\+cu128: no fbgemm-gpu / torchrec release"):
        gpu_check.step_install(str(tmp_path), tmp_path)
    monkeypatch.setattr(torch, "__version__", PINS["torch"])
    with pytest.raises(gpu_check.Failed, match=r"has no fbgemm_gpu-.* and no torchrec-"):  # an empty folder
        gpu_check.step_install(str(tmp_path), tmp_path)
    for name in (f"fbgemm_gpu-{PINS['torchrec']}-cp311-cp311-linux_x86_64.whl", f"torchrec-{PINS['torchrec']}-py3-none-any.whl"):
        (tmp_path / name).touch()
    (tmp_path / "stdlib").mkdir()
    (tmp_path / "stdlib" / "EXTERNALLY-MANAGED").touch()  # PEP 668's marker, outside a virtual environment
    monkeypatch.setattr(gpu_check.sysconfig, "get_path", lambda name: str(tmp_path / "stdlib"))
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    with pytest.raises(gpu_check.Failed, match=r"externally managed .*\(python3 -m venv --system-site-packages VENV\)"):
        gpu_check.step_install(str(tmp_path), tmp_path)


def test_below_python_3_11_the_first_step_fails_cleanly(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    assert gpu_check.main(["--dry-run", "--workdir", str(tmp_path / "w")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("[FAIL] python: Python 3.10.14 is older than 3.11"), out
    assert "[step]" not in out and not (tmp_path / "w").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_target_uses_the_venv_or_the_given_python():
    def dry(*args: str) -> str:
        proc = subprocess.run(["make", "-n", "gpu-check", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in __import__("os").environ.items() if k != "PYTHON"})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert ".venv/bin/python tools/gpu_check.py" in dry()
    assert "python3 tools/gpu_check.py --wheels /opt/wheels" in dry("PYTHON=python3", "WHEELS=/opt/wheels")


def test_readme_fetches_the_wheels_the_install_step_wants():
    release = PINS["torchrec"]
    assert f"pip download --no-deps -d wheels fbgemm-gpu=={release} torchrec=={release}\n" in (ROOT / "README.md").read_text()
