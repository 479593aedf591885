"""Build the project's virtual environment: ``python tools/setup_env.py VENV``.

Reads ``pyproject.toml`` with ``tomllib`` and installs the extra ``cpu`` or
``cuda`` (the torch / fbgemm / torchrec triple of ``[tool.ctr.accelerator]``),
picked by itself (override with ``CTR_ACCELERATOR=cpu|cuda``): the same sets
``pip install ".[cpu]"`` / ``".[cuda]"`` name, so the extras are the one list.
torchrec is installed with ``--no-deps`` (the ``cpu`` extra leaves it out)
because its metadata asks for the CUDA ``fbgemm-gpu``, which must not sit next
to ``fbgemm-gpu-cpu``; its real runtime needs are plain dependencies of the
project.

The Dockerfile runs this same script (so the image has no second list of
versions)::

    CTR_ACCELERATOR=cuda python3 tools/setup_env.py --deps-only --extras cluster --no-system-packages /opt/venv

``--deps-only`` installs the pinned stack and the project's dependencies (plus
those of ``--extras``) without the project itself, so that layer needs only
``pyproject.toml`` and this file; ``--no-system-packages`` (or
``CTR_NO_SYSTEM_PACKAGES=1``) skips the Debian packages installed for the tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info < (3, 11):  # tomllib; pyproject.toml's requires-python
    sys.exit(f"setup: Python >= 3.11 is needed, this is {sys.version.split()[0]} (set PYTHON=python3.11 for make)")
import tomllib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def read_accelerator_pins() -> dict[str, str]:
    """``[tool.ctr.accelerator]`` of pyproject.toml."""
    return pyproject()["tool"]["ctr"]["accelerator"]


def read_string_array(section: str, key: str) -> list[str]:
    """The strings of the array ``key = [...]`` in the table ``section`` (dotted) of
    pyproject.toml; [] when absent."""
    table = pyproject()
    for part in section.split("."):
        table = table.get(part, {})
    return list(table.get(key, []))


def accelerator_requirements(accelerator: str) -> tuple[list[str], str]:
    """(what to install with dependencies, the torchrec requirement to install with ``--no-deps``)
    for ``accelerator``: the extra of that name, torchrec taken out of it (the ``cpu`` extra
    has none: its pin comes from ``[tool.ctr.accelerator]``)."""
    extra = read_string_array("project.optional-dependencies", accelerator)
    rest = [r for r in extra if not re.match(r"torchrec\b", r)]
    torchrec = [r for r in extra if re.match(r"torchrec\b", r)]
    return rest, (torchrec[0] if torchrec else f"torchrec=={read_accelerator_pins()['torchrec']}")


def detect_accelerator() -> str:
    forced = os.environ.get("CTR_ACCELERATOR")
    if forced:
        if forced not in ("cpu", "cuda"):
            sys.exit(f"setup: CTR_ACCELERATOR must be 'cpu' or 'cuda', got {forced!r}")
        return forced
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True).returncode == 0:
        return "cuda"
    return "cpu"


DEBIAN_PACKAGES = {"promtool": "prometheus", "prometheus-pushgateway": "prometheus-pushgateway"}  # binary -> package


def install_debian_packages() -> None:
    """Prometheus, promtool and the Pushgateway for the alerting tests, from Debian, as root."""
    missing = sorted({pkg for binary, pkg in DEBIAN_PACKAGES.items() if shutil.which(binary) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"setup: Debian packages {missing} are missing and this is not root with apt-get: "
              "the Prometheus tests will fail until they are installed", flush=True)
        return
    install_debian(*missing)


def install_debian(*packages: str) -> None:
    """``apt-get install`` (refreshing the package lists once if that fails)."""
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("+", " ".join(install), flush=True)
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)


def pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("venv", nargs="?", default=".venv", help="the virtual environment to build (default: .venv)")
    p.add_argument("--deps-only", action="store_true",
                   help="install the pinned stack and the project's dependencies, not the project")
    p.add_argument("--extras", default="dev", help="comma-separated optional dependencies to add (default: dev)")
    p.add_argument("--no-system-packages", action="store_true",
                   default=os.environ.get("CTR_NO_SYSTEM_PACKAGES", "") not in ("", "0"),
                   help="skip the Debian packages for the alerting tests (also CTR_NO_SYSTEM_PACKAGES=1)")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    venv = Path(args.venv).resolve()
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    accelerator = detect_accelerator()
    print(f"setup: building {venv} for {accelerator}", flush=True)
    if not (venv / "bin" / "python").exists():
        if subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
            install_debian("python3-venv")  # Debian/Ubuntu ship venv's ensurepip separately
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    stack, torchrec = accelerator_requirements(accelerator)
    # e.g. CTR_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, where PyPI's default torch is the CUDA build
    index = ["--extra-index-url", os.environ["CTR_TORCH_INDEX_URL"]] if os.environ.get("CTR_TORCH_INDEX_URL") else []
    pip(venv, *index, *stack)
    pip(venv, "--no-deps", torchrec)
    if args.deps_only:
        requirements = read_string_array("project", "dependencies")
        for extra in extras:
            requirements += read_string_array("project.optional-dependencies", extra)
        pip(venv, *requirements)
    else:
        pip(venv, "-e", f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT))
    if not args.no_system_packages:
        install_debian_packages()
    check = "import torch, torchrec, fbgemm_gpu, torchx, pyarrow; print('setup: torch', torch.__version__, '| torchrec ok')"
    subprocess.run([str(venv / "bin" / "python"), "-c", check], check=True)


if __name__ == "__main__":
    main()
