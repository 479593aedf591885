"""Check a CUDA machine end to end: ``python tools/gpu_check.py [--wheels DIR] [--dry-run]``.

On one CUDA GPU, in a few minutes and without network access: the install (the NVIDIA
driver, torch's CUDA build, fbgemm_gpu's CUDA kernels, torchrec), then a tiny DCNv2 ME
trained with fused Adam under row-wise sharding, table-wise sharding and UVM caching
(``torchrun`` with one process), a resume of the row-wise run with more steps, an export
of its CUDA checkpoint and the export's parity with the trainer's own test predictions.

It needs Python >= 3.11 (``tomllib`` reads the pins of pyproject.toml). It uses the torch
it finds (never reinstalls it). fbgemm-gpu and torchrec are used as installed, or, when they
do not import, the release matching that torch's major.minor (the pinned triple of
pyproject.toml's ``[tool.ctr.accelerator]``; any other torch fails) is installed from the
wheels in ``--wheels DIR`` (``pip install --no-index --find-links DIR``; torchrec with
``--no-deps``; torch held at its version).
Every step prints ``[ok] STEP`` or ``[FAIL] STEP: reason``; the first failure ends the
check with exit 1. Without a GPU it refuses with exit 2; ``--dry-run`` prints the steps and
commands without running anything (on any machine).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the trainer's dependencies are checked by the steps first
    from trainer.run_dir import RunDir

ROOT = Path(__file__).resolve().parent.parent
MARKER = ".gpu-check"  # the work directory is ours to wipe only when it carries this

ROWS = 20000  # raw synthetic rows: 16k train, 2k val, 2k test
FIRST_STEPS, RESUMED_STEPS = 20, 30  # the row-wise run stops at 20 (a checkpoint), the resume goes on to 30

# the model and optimizer every run shares: tiny DCNv2, multi-embedding (2 sets of dim 4), fused Adam
COMMON = [
    "run.device=cuda",
    "model.name=dcnv2",
    "model.hidden=16",
    "model.cross_layers=1",
    "embedding.mode=me",
    "embedding.scale=2",
    "embedding.base_dim=4",
    "embedding.data_type=fp32",
    "train.dense_autocast=none",
    "train.epochs=1",
    "train.batch_size=512",
    "train.eval_every_steps=10",
    "train.checkpoint_every_steps=10",
    "train.log_every_steps=10",
    "optim.embedding=adam",
    "optim.embedding_lr=0.01",
    "optim.dense_lr=0.01",
]
# name -> (what it shows, its own keys)
RUNS = {
    "row_wise": ("fused Adam, row-wise sharding",
                 ["sharding.sharding_types=[row_wise]", "sharding.compute_kernel=fused"]),
    "table_wise": ("fused Adam, table-wise sharding",
                   ["sharding.sharding_types=[table_wise]", "sharding.compute_kernel=fused"]),
    "uvm_caching": ("fused Adam, tables in UVM with an HBM cache",
                    ["sharding.sharding_types=[table_wise]", "sharding.compute_kernel=fused_uvm_caching",
                     "sharding.uvm_cache_load_factor=0.2"]),
}
RESUMED = "row_wise"  # the run resumed, exported and checked for parity
PARITY_ATOL = 1e-5  # as tests/test_export.py
THROUGHPUT: dict[str, float] = {}  # run -> examples/s, from its summary.json


class Failed(Exception):
    """A step failed: ``str(e)`` is the reason."""


def ok(step: str, detail: str = "") -> None:
    print(f"[ok] {step}" + (f": {detail}" if detail else ""), flush=True)


def warn(step: str, detail: str) -> None:
    print(f"[warn] {step}: {detail}", flush=True)


def clean_env() -> dict[str, str]:
    """The environment of the child commands: this python's bin first, no leftover torchrun rank."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "CTR_FAIL_AT_STEP", "CTR_FAIL_RANK"):
        env.pop(key, None)
    return env


def sh(cmd: list[str], timeout: float, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root; its output goes to ``log`` (when given) too.
    Raises Failed with the exit code and the tail of stderr."""
    print("  $", shlex.join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"timed out after {timeout:.0f} s: {shlex.join(cmd[:4])} ...") from None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {shlex.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [line for line in out if line.startswith("error: ")]  # the CLIs' own message (torchrun buries it)
        tail = "\n".join(errors or out[-15:])
        where = f" (full output: {log})" if log else ""
        raise Failed(f"exit {proc.returncode}{where}\n{tail}")
    return proc


# ---- the install ---------------------------------------------------------------------------


def read_pins() -> dict[str, str]:
    """``[tool.ctr.accelerator]`` of pyproject.toml (step ``python`` has checked for tomllib)."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ctr"]["accelerator"]


def step_python() -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < (3, 11):
        raise Failed(f"Python {version} is older than 3.11, the project's requires-python (tomllib reads "
                     "pyproject.toml): run with a newer python (make gpu-check PYTHON=python3.11)")
    pins = read_pins()
    return f"Python {version}; the pinned triple is torch {pins['torch']}, fbgemm-gpu and torchrec {pins['torchrec']}"


def major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def matching_release(torch_version: str) -> str:
    """The fbgemm-gpu / torchrec release built and tested with ``torch_version`` (its
    major.minor): the pinned triple's. Raises Failed for any other torch."""
    pins = read_pins()
    if major_minor(torch_version) != major_minor(pins["torch"]):
        raise Failed(f"torch {torch_version}: no fbgemm-gpu / torchrec release is known to match torch "
                     f"{major_minor(torch_version)} (pyproject.toml [tool.ctr.accelerator] pairs torch "
                     f"{major_minor(pins['torch'])} with {pins['torchrec']}): use an image with torch "
                     f"{major_minor(pins['torch'])}, or move the pinned triple")
    return pins["torchrec"]


def nvidia_smi() -> tuple[str | None, str]:
    """(driver version or None, what nvidia-smi said)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "not found"
    try:
        proc = subprocess.run([smi, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"did not answer ({e})"
    first = (proc.stdout.strip() or proc.stderr.strip()).splitlines()[:1]
    if proc.returncode != 0 or not proc.stdout.strip():
        return None, f"exit {proc.returncode}: {first[0] if first else 'no output'}"
    gpus = proc.stdout.strip().splitlines()
    return gpus[0].split(",")[0].strip(), "; ".join(g.strip() for g in gpus)


def check_gpu_present() -> None:
    """Refuse (exit 2, no traceback) where there is no CUDA device at all."""
    driver, smi = nvidia_smi()
    try:
        import torch
    except Exception as e:  # noqa: BLE001 (any import failure: report it, do not trace it)
        torch_says = f"torch does not import: {type(e).__name__}: {e}"
        available = False
    else:
        available = torch.cuda.is_available()
        torch_says = f"torch.cuda.is_available() is {available}"
    if not available and driver is None:
        print(f"gpu-check: no CUDA device here ({torch_says}; nvidia-smi: {smi}): nothing to check", file=sys.stderr)
        sys.exit(2)


def step_driver() -> str:
    driver, smi = nvidia_smi()
    if driver is None:
        raise Failed(f"nvidia-smi: {smi}")
    return f"driver {driver} ({smi})"


def step_torch() -> str:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        raise Failed(f"torch does not import: {type(e).__name__}: {e}") from None
    if torch.version.cuda is None:
        raise Failed(f"torch {torch.__version__} at {Path(torch.__file__).parent} is a CPU build (torch.version.cuda is None): "
                     "run with the python of a CUDA torch (make gpu-check PYTHON=...)")
    if not torch.cuda.is_available():
        raise Failed(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device although nvidia-smi does: "
                     "the driver may be older than this CUDA build, or CUDA_VISIBLE_DEVICES hides the GPU")
    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    total = (x * 2).sum().item()
    torch.cuda.synchronize()
    if total != float((1 << 20) * ((1 << 20) - 1)):
        raise Failed(f"a tensor op on the GPU gave a wrong sum: {total}")
    name = torch.cuda.get_device_name(0)
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s), cuda:0 = {name}; a tensor op ran"


def importable(*modules: str) -> str | None:
    """None when every module imports in a fresh interpreter, else the error's last line."""
    proc = subprocess.run([sys.executable, "-c", "import " + ", ".join(modules)], capture_output=True, text=True,
                          env=clean_env(), timeout=300)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def step_install(wheels: str | None, work: Path) -> str:
    problem = importable("fbgemm_gpu", "torchrec")
    if problem is None:
        return "fbgemm_gpu and torchrec import: nothing to install"
    if not wheels:
        raise Failed(f"fbgemm_gpu / torchrec do not import ({problem}) and no --wheels DIR was given to install them from")
    if not Path(wheels).is_dir():
        raise Failed(f"--wheels {wheels}: not a directory")
    import torch

    release = matching_release(torch.__version__)
    check_wheels(Path(wheels), release)
    marker = Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED"
    if sys.prefix == sys.base_prefix and marker.exists():  # PEP 668: pip would refuse to install here
        raise Failed(f"{sys.executable} is externally managed ({marker}): pip installs nothing into it; make a "
                     "virtual environment that sees its torch (python3 -m venv --system-site-packages VENV) and "
                     "run with PYTHON=VENV/bin/python")
    constraints = work / CONSTRAINTS
    constraints.write_text(f"torch=={torch.__version__}\n")
    for cmd in install_commands(wheels, release, constraints):
        sh(cmd, timeout=600)
    importlib.invalidate_caches()
    problem = importable("fbgemm_gpu", "torchrec")
    if problem is not None:
        raise Failed(f"installed from {wheels}, yet they do not import: {problem}")
    return f"fbgemm-gpu and torchrec {release} (matching torch {torch.__version__}) installed from {wheels}"


CONSTRAINTS = "torch-constraint.txt"  # in the work directory: torch==THE_VERSION_FOUND


def install_commands(wheels: str, release: str, constraints: Path) -> list[list[str]]:
    """The pip commands installing fbgemm-gpu and torchrec ``release`` from ``wheels`` only;
    ``constraints`` holds torch where it is (pip refuses rather than replace the image's torch)."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--find-links", wheels]
    return [
        [*pip, "-c", str(constraints), f"fbgemm-gpu=={release}"],
        [*pip, "--no-deps", f"torchrec=={release}"],
    ]


def check_wheels(wheels: Path, release: str) -> None:
    """Raise Failed unless ``wheels`` holds a fbgemm-gpu and a torchrec wheel of ``release``."""
    names = sorted(p.name for p in wheels.glob("*.whl"))
    missing = [dist for dist in ("fbgemm_gpu", "torchrec")
               if not any(re.match(rf"{dist}-{re.escape(release)}(\+[^-]+)?-", name) for name in names)]
    if missing:
        found = [n for n in names if n.startswith(("fbgemm", "torchrec"))]
        raise Failed(f"{wheels} has no {' and no '.join(f'{d}-{release}-*.whl' for d in missing)} (found: "
                     f"{', '.join(found) or 'none of either'}); gather them on a machine with network: pip download "
                     f"--no-deps -d {wheels} fbgemm-gpu=={release} torchrec=={release} (README \"GPU clusters\")")


def distributions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for d in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "").lower())
        if name.startswith(("torch", "fbgemm")):
            out[name] = d.version
    return out


def step_fbgemm() -> str:
    try:
        import fbgemm_gpu  # noqa: F401 (loads the operator libraries)
        import torch
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            EmbeddingLocation,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as e:  # noqa: BLE001
        raise Failed(f"fbgemm_gpu does not import: {type(e).__name__}: {e}") from None
    dists = distributions()
    if "fbgemm-gpu-cpu" in dists:
        raise Failed(f"fbgemm-gpu-cpu {dists['fbgemm-gpu-cpu']} is installed: its CPU-only kernels shadow the CUDA ones "
                     "(pip uninstall fbgemm-gpu-cpu, then install fbgemm-gpu)")
    missing = [op for op in ("asynchronous_complete_cumsum", "bounds_check_indices") if not hasattr(torch.ops.fbgemm, op)]
    if missing:
        raise Failed(f"torch.ops.fbgemm lacks {missing}: the operator library did not load")
    try:
        lengths = torch.tensor([1, 2, 3], device="cuda")
        cumsum = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).tolist()
        if cumsum != [0, 1, 3, 6]:
            raise Failed(f"asynchronous_complete_cumsum on cuda gave {cumsum}")
        for location in (EmbeddingLocation.DEVICE, EmbeddingLocation.MANAGED_CACHING):  # HBM, then UVM + cache
            tbe = SplitTableBatchedEmbeddingBagsCodegen(
                embedding_specs=[(100, 8, location, ComputeDevice.CUDA), (50, 8, location, ComputeDevice.CUDA)],
                optimizer=EmbOptimType.ADAM, learning_rate=0.01, device=torch.device("cuda"),
            )  # fmt: skip
            indices = torch.tensor([1, 2, 3, 4, 5, 6], device="cuda")
            offsets = torch.tensor([0, 2, 4, 6], device="cuda")  # 2 tables x batch 2
            out = tbe(indices, offsets)
            out.sum().backward()  # the fused Adam update runs in the backward
            torch.cuda.synchronize()
            if tuple(out.shape) != (2, 16) or not torch.isfinite(out).all():
                raise Failed(f"TBE ({location.name}) gave {tuple(out.shape)} / non-finite values")
    except Failed:
        raise
    except Exception as e:  # noqa: BLE001
        raise Failed(f"fbgemm CUDA kernels failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return f"fbgemm_gpu {dists.get('fbgemm-gpu', '?')}: CUDA ops load; TBE with fused Adam ran in HBM and with UVM caching"


def step_torchrec() -> str:
    try:
        import torchrec
        from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise Failed(f"torchrec does not import: {type(e).__name__}: {e}") from None
    return f"torchrec {getattr(torchrec, '__version__', None) or distributions().get('torchrec', '?')}"


def step_versions() -> str:
    import torch

    pins = read_pins()
    dists = distributions()
    used = {"torch": torch.__version__, "fbgemm-gpu": dists.get("fbgemm-gpu", "?"), "torchrec": dists.get("torchrec", "?")}
    pinned = {"torch": pins["torch"], "fbgemm-gpu": pins["fbgemm_cuda"].split("==")[-1], "torchrec": pins["torchrec"]}
    print(f"  using torch {used['torch']} (CUDA {torch.version.cuda}), fbgemm-gpu {used['fbgemm-gpu']}, "
          f"torchrec {used['torchrec']}, Python {sys.version.split()[0]}", flush=True)
    differ = [f"{k} {used[k]} (pinned {pinned[k]})" for k in used if used[k].split("+")[0] != pinned[k]]
    if differ:
        warn("versions", "not the pinned triple of pyproject.toml [tool.ctr.accelerator]: " + ", ".join(differ))
        return "usable, but not the pinned triple (see the warning)"
    return f"the pinned triple (torch {pinned['torch']}, fbgemm-gpu {pinned['fbgemm-gpu']}, torchrec {pinned['torchrec']})"


# ---- training, resume, export --------------------------------------------------------------


def data_commands(work: Path) -> list[list[str]]:
    raw, data = work / "raw.tsv", work / "data"
    return [
        [sys.executable, "-m", "trainer.data.synthetic", "--rows", str(ROWS), "--cardinality-scale", "0.001",
         "--format", "criteo-tsv", "--output", str(raw)],
        [sys.executable, "-m", "trainer.data.preprocess", "--dataset", "criteo", "--input", str(raw), "--output", str(data),
         "--min-count", "2", "--no-progress"],
    ]  # fmt: skip


def train_command(work: Path, name: str, max_steps: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "trainer/main.py", "--set", f"data.path={work / 'data'}", f"run.dir={work / 'runs' / name}", *COMMON,
        *RUNS[name][1], f"train.max_steps={max_steps}", "--resume", "auto",
    ]  # fmt: skip


def export_command(work: Path) -> list[str]:
    return [sys.executable, "-m", "trainer.export", "--checkpoint", str(work / "runs" / RESUMED),
            "--output", str(work / "artifact")]


def run_of(work: Path, name: str) -> RunDir:
    from trainer.run_dir import RunDir

    return RunDir(str(work / "runs" / name))


def run_summary(work: Path, name: str) -> dict:
    from trainer.run_dir import SUMMARY

    run = run_of(work, name)
    summary = run.read_summary()
    if summary is None:
        raise Failed(f"{run.file(SUMMARY)} is missing or not a finished run's summary")
    return summary


def step_train(work: Path, name: str) -> str:
    sh(train_command(work, name, FIRST_STEPS), timeout=240, log=work / "logs" / f"{name}.log")
    s = run_summary(work, name)
    if s.get("steps") != FIRST_STEPS or s.get("device") not in ("cuda", "cuda:0"):
        raise Failed(f"summary.json says steps {s.get('steps')} on {s.get('device')}, expected {FIRST_STEPS} on cuda")
    THROUGHPUT[name] = s["train_examples_per_sec"]
    return f"{RUNS[name][0]}: {s['steps']} steps, test AUC {s.get('test_auc', float('nan')):.3f}, " \
           f"{s['train_examples_per_sec']:,.0f} examples/s"


def step_resume(work: Path) -> str:
    from trainer.checkpoint import checkpoint_name
    from trainer.storage import join

    proc = sh(train_command(work, RESUMED, RESUMED_STEPS), timeout=240, log=work / "logs" / f"{RESUMED}-resumed.log")
    expected = f"resumed from {join(run_of(work, RESUMED).checkpoints, checkpoint_name(FIRST_STEPS))}"
    if expected not in proc.stderr + proc.stdout:
        raise Failed(f"the second invocation did not log {expected!r}: it restarted instead of resuming")
    s = run_summary(work, RESUMED)
    if s.get("steps") != RESUMED_STEPS:
        raise Failed(f"summary.json says {s.get('steps')} steps after the resume, expected {RESUMED_STEPS}")
    THROUGHPUT[f"{RESUMED} resumed"] = s["train_examples_per_sec"]
    return f"{RESUMED} from step {FIRST_STEPS} to {RESUMED_STEPS}, {s['train_examples_per_sec']:,.0f} examples/s"


def step_export(work: Path) -> str:
    sh(export_command(work), timeout=240, log=work / "logs" / "export.log")
    card = json.loads((work / "artifact" / "model_card.json").read_text())
    return f"{work / 'artifact'} from {card['source']['checkpoint']}"


def step_parity(work: Path) -> str:
    """tests/test_export.py's check: the artifact scores the raw test rows (split by the
    preprocessor's rule) as the trainer's own evaluation did (RUN/test_predictions.parquet)."""
    import numpy as np
    import pyarrow.parquet as pq

    from trainer.data.splits import TEST, assign_splits
    from trainer.export.runtime import Predictor
    from trainer.run_dir import TEST_PREDICTIONS

    table = pq.read_table(run_of(work, RESUMED).file(TEST_PREDICTIONS))
    logits = table["logit"].to_numpy().astype(np.float64)
    reference, labels = 1.0 / (1.0 + np.exp(-logits)), table["label"].to_numpy()
    lines = (work / "raw.tsv").read_text().splitlines()
    split = assign_splits(np.arange(len(lines)), (0.8, 0.1, 0.1), 0)
    rows = [line.split("\t") for line, s in zip(lines, split) if s == TEST]
    if len(rows) != len(reference):
        raise Failed(f"{len(rows)} raw test rows but {len(reference)} trainer predictions")
    if not np.array_equal(labels, [int(r[0]) for r in rows]):
        raise Failed("the trainer's test order is not the raw file's")
    scores = Predictor(work / "artifact").predict_rows(rows, labeled=True).numpy()
    diff = float(np.abs(scores - reference).max())
    if not diff <= PARITY_ATOL:
        raise Failed(f"the artifact's scores differ from the trainer's test predictions by up to {diff:.2e} (> {PARITY_ATOL})")
    return f"{len(rows)} raw test rows, max |artifact - trainer| = {diff:.1e} (<= {PARITY_ATOL})"


# ---- the driver ----------------------------------------------------------------------------


WHAT = {  # step -> what it checks (printed by --dry-run)
    "python": "Python >= 3.11 (tomllib reads the pinned triple of pyproject.toml [tool.ctr.accelerator])",
    "driver": "the NVIDIA driver version and the GPUs, from nvidia-smi",
    "torch": "torch is a CUDA build, sees the GPU, and a tensor op runs on it",
    "install": "fbgemm-gpu and torchrec import, else the release matching the torch found is installed from "
               "--wheels DIR (torch is never reinstalled; a torch with no known match fails)",
    "fbgemm": "fbgemm_gpu's CUDA ops load (torch.ops.fbgemm); a TBE with fused Adam runs in HBM and with UVM caching",
    "torchrec": "torchrec imports (and its distributed model parallel)",
    "versions": "the torch / fbgemm-gpu / torchrec in use, warned when not the pinned triple of pyproject.toml",
    "trainer imports": "the trainer's and the exporter's other dependencies import",
    "data": "a tiny synthetic raw Criteo TSV, preprocessed into a dataset",
    "parity": "the artifact's Predictor.predict_rows(raw test rows, labeled=True) equals RUN/test_predictions.parquet "
              f"(the resumed {RESUMED} run) within {PARITY_ATOL}",
    "export": f"python -m trainer.export from the CUDA checkpoint of the resumed {RESUMED} run",
    f"resume {RESUMED}": f"a second invocation with train.max_steps={RESUMED_STEPS} and --resume auto continues "
                         f"from step {FIRST_STEPS}",
    **{f"train {name}": f"{what}, {FIRST_STEPS} steps on cuda (torchrun, 1 process); examples/s from summary.json"
       for name, (what, _) in RUNS.items()},
}


def steps(args: argparse.Namespace, work: Path, python: str) -> list[tuple[str, list[list[str]], object]]:
    """(step, the commands it runs (for --dry-run), the function that runs it); ``python`` is
    what step ``python`` found (it runs before the others are planned: they read the pins)."""
    release = read_pins()["torchrec"]  # the release for the pinned torch; the install step matches the torch found
    out = [
        ("python", [], lambda: python),
        ("driver", [["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"]], step_driver),
        ("torch", [], step_torch),
        ("install", install_commands(args.wheels or "DIR", release, work / CONSTRAINTS),
         lambda: step_install(args.wheels, work)),
        ("fbgemm", [], step_fbgemm),
        ("torchrec", [], step_torchrec),
        ("versions", [], step_versions),
        ("trainer imports", [[sys.executable, "-c", "import trainer.train, trainer.export.runtime"]], step_imports),
        ("data", data_commands(work), lambda: step_data(work)),
    ]
    for name in RUNS:
        out.append((f"train {name}", [train_command(work, name, FIRST_STEPS)], lambda name=name: step_train(work, name)))
    out += [
        (f"resume {RESUMED}", [train_command(work, RESUMED, RESUMED_STEPS)], lambda: step_resume(work)),
        ("export", [export_command(work)], lambda: step_export(work)),
        ("parity", [], lambda: step_parity(work)),
    ]
    return out


def step_imports() -> str:
    sh([sys.executable, "-c", "import trainer.train, trainer.export.runtime"], timeout=300)
    return "the trainer and the exporter import (their dependencies are installed)"


def step_data(work: Path) -> str:
    for i, cmd in enumerate(data_commands(work)):
        sh(cmd, timeout=240, log=work / "logs" / f"data-{i}.log")
    return f"{ROWS} raw rows -> {work / 'data'}"


def prepare_workdir(work: Path) -> None:
    if work.exists():
        if not (work / MARKER).exists() and any(work.iterdir()):
            raise Failed(f"{work} exists and is not a gpu-check work directory: pick another --workdir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("tools/gpu_check.py wipes this directory on each run\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 all steps ok; 1 a step failed (named); 2 no CUDA device here.")
    p.add_argument("--wheels", metavar="DIR",
                   help="install fbgemm-gpu and torchrec from the wheels in DIR (no network) when they do not import")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "gpu_check"),
                   help="scratch directory for the data, runs and artifact (wiped at each run; default: runs/gpu_check)")
    p.add_argument("--dry-run", action="store_true", help="print the steps and the commands they would run; run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    try:
        python = step_python()
    except Failed as e:
        print(f"[FAIL] python: {e}", flush=True)
        return 1
    plan = steps(args, work, python)
    if args.dry_run:
        print(f"gpu-check --dry-run: {len(plan)} steps, python {sys.executable}, work directory {work}")
        for name, commands, _ in plan:
            print(f"[step] {name}: {WHAT.get(name, '')}")
            for cmd in commands:
                print("  $", shlex.join(cmd))
        return 0
    check_gpu_present()
    start = time.monotonic()
    print(f"gpu-check: python {sys.executable}, work directory {work}", flush=True)
    try:
        prepare_workdir(work)
    except Failed as e:
        print(f"[FAIL] workdir: {e}", flush=True)
        return 1
    for name, _, fn in plan:
        try:
            detail = fn()
        except Failed as e:
            print(f"[FAIL] {name}: {e}", flush=True)
            print(f"gpu-check: failed at step {name!r} after {time.monotonic() - start:.0f} s", flush=True)
            return 1
        except Exception as e:  # noqa: BLE001 (a bug or a surprise: still name the step)
            print(f"[FAIL] {name}: unexpected {type(e).__name__}: {e}", flush=True)
            print(f"gpu-check: failed at step {name!r} after {time.monotonic() - start:.0f} s", flush=True)
            return 1
        ok(name, detail)
    print("\nexamples/s (summary.json train_examples_per_sec; tiny model and batches: a smoke figure, not a benchmark)")
    for name, rate in THROUGHPUT.items():
        print(f"  {name:<18} {rate:>12,.0f}")
    elapsed = time.monotonic() - start
    print(f"gpu-check: all {len(plan)} steps ok in {elapsed:.0f} s")
    if elapsed > 300:
        warn("time", f"took {elapsed:.0f} s, over the 5-minute budget")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the trainer package, when run as tools/gpu_check.py
    sys.exit(main())
