"""Every command of README.md, so that the README cannot drift from the code again.

The commands are the lines of README.md's fenced ``bash`` blocks (comments dropped, ``\\``
continuations joined) and the backticked cells of its tables that start with ``.venv/bin/``,
``python -m``, ``make``, ``torchx`` or ``PATH=``. Each one is classified in ``COMMANDS``
below, keyed by the command exactly as the README prints it (whitespace runs count as one
space, so README prose and alignment may change freely):

- ``Run``: it runs on this machine, and it is run for real, in a temporary copy of a
  checkout where ``make demo`` ran (at a cheap size: see ``workspace``), through ``bash``
  with a ``PATH`` that does not contain ``.venv/bin`` (so a command must name it, as the
  README's do), and must exit 0. ``append``/``replace`` make it cheap (fewer rows, fewer
  cells); each such substitution says why. ``after`` names the README commands that must
  run first (once): those whose output it reads, or that write the same output. The
  commands run two at a time (the workspace starts them all, in dependency order).
- ``DryRun``: it needs a cluster (Kubernetes, GPUs, the paper's data); the same command with
  its tool's own dry-run flag is run instead and must exit 0.
- ``NotHere``: neither is possible here; the reason is listed (``test_commands_not_runnable_here_say_why``).

``test_every_readme_command_is_classified`` (fast) fails on a README command that
``COMMANDS`` does not know, and on an entry of ``COMMANDS`` the README no longer has: a new
or changed README command forces someone to decide how it is checked.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, VENV_BIN

README = ROOT / "README.md"
TABLE_PREFIXES = (".venv/bin/", "python -m ", "make ", "torchx ", "PATH=")


# ---- the README's commands --------------------------------------------------------------------


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` at a word start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def normalize(command: str) -> str:
    return " ".join(command.split())


def readme_commands(text: str) -> list[tuple[str, str]]:
    """``(command, where)`` for every command of a README text, in order (duplicates kept)."""
    found: list[tuple[str, str]] = []
    lines = text.splitlines()
    in_bash = in_other = False
    pending, start = "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if in_bash or in_other:
                assert not pending, f"README.md:{start}: a bash block ends inside a continued command"
                in_bash = in_other = False
            elif stripped == "```bash":
                in_bash = True
            else:
                in_other = True
            continue
        if in_bash:
            code = _strip_comment(line).rstrip()
            if not code.strip() and not pending:
                continue
            if not pending:
                start = number
            if code.endswith("\\"):
                pending += code[:-1] + " "
                continue
            found.append((normalize(pending + code), f"README.md:{start} (bash block)"))
            pending = ""
        elif not in_other and stripped.startswith("|"):
            for cell in re.findall(r"`([^`]+)`", line):
                if cell.strip().startswith(TABLE_PREFIXES):
                    found.append((normalize(cell), f"README.md:{number} (table cell)"))
    return found


# ---- how each command is checked --------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run it here; ``replace`` (old, new) pairs, then ``append``, make it cheap."""

    why: str = ""  # why the substitutions (empty: it runs exactly as printed)
    replace: tuple[tuple[str, str], ...] = ()
    append: str = ""
    after: tuple[str, ...] = ()  # README commands to run first: their output is read, or it is shared
    timeout: float = 300


@dataclass(frozen=True)
class DryRun(Run):
    """Needs a cluster: run the same command with its tool's dry-run flag (``replace``/``append``)."""


@dataclass(frozen=True)
class NotHere:
    reason: str


# The commands whose outputs others read (keys of COMMANDS).
PIPELINE = ".venv/bin/python -m pipelines.run --config configs/pipelines/demo.yaml"
TRAIN_ONE = ".venv/bin/python -m trainer.main --config configs/synthetic_me.yaml --set data.path=runs/demo/dataset"
TORCHRUN = (".venv/bin/torchrun --standalone --nproc-per-node 2 --max-restarts 2 trainer/main.py --config "
            "configs/synthetic_me.yaml --set data.path=runs/demo/dataset")
TORCHX_DDP = ("PATH=$PWD/.venv/bin:$PATH torchx run -s local_cwd dist.ddp -j 1x2 --script trainer/main.py -- --config "
              "configs/synthetic_me.yaml --set data.path=runs/demo/dataset")
EXPORT = ".venv/bin/python -m trainer.export --checkpoint runs/synthetic_dcnv2_me2x --output artifacts/dcnv2_me2x"
RAW_ROWS = "head -n 1000 runs/demo/raw.tsv | cut -f 2- > raw_rows.tsv"
SWEEP_DATA = (".venv/bin/python -m trainer.data.synthetic --rows 20000 --cardinality-scale 0.002 --format parquet "
              "--output runs/sweep_small/dataset")
SWEEP_SMALL = ".venv/bin/python -m pipelines.sweep --spec configs/sweeps/small.yaml"
ADS_RAW = ".venv/bin/python -m trainer.data.synthetic --schema ads_log --rows 200000 --output data/ads_raw"
ADS_PREPROCESS = ".venv/bin/python -m trainer.data.preprocess --spec configs/datasets/ads_log.yaml --output data/ads_log"
ADS_TRAIN = ".venv/bin/python -m trainer.main --config configs/ads_log_me.yaml"
ADS_EXPORT = ".venv/bin/python -m trainer.export --checkpoint runs/ads_log_dcnv2_me2x --output artifacts/ads_log"
PAPER = ".venv/bin/python -m pipelines.sweep --spec configs/sweeps/paper.yaml"  # + the README's options

# torchx's kubernetes scheduler builds and pushes an image of the working directory unless
# --workspace is empty, even for --dryrun (and there is no Docker daemon here)
TORCHX_K8S_DRYRUN = DryRun(replace=(("torchx run ", "torchx run --dryrun "),))  # exactly as printed, plus --dryrun
ONE_SWEEP_CELL = "--models dnn --modes me --scales 1"  # the shared 1x cell of one model, not 35 cells

COMMANDS: dict[str, Run | NotHere] = {
    # -- Quick start
    "make demo": NotHere(
        "the full-size pipeline (800k rows); the same pipeline command on configs/pipelines/demo.yaml "
        "runs here at a cheap size (the Five ways table), and tests/test_pipeline.py runs the chain in CI"),
    "make test": NotHere("the whole suite, this test included: it is what CI runs (.ci/run)"),
    "make test-fast": NotHere("the suite without the slow tests, a subset of make test, which CI runs"),
    # -- Training (and the Five ways table: the same one-process and torchrun lines). The
    # demo's dataset here is tiny, so they run as printed; all three share the config's run.dir
    # (so one at a time: the later ones resume the finished run, on 2 ranks).
    TRAIN_ONE: Run(after=(PIPELINE,)),
    TORCHRUN: Run(after=(PIPELINE, TRAIN_ONE)),
    TORCHX_DDP: Run(after=(PIPELINE, TORCHRUN)),
    "PATH=$PWD/.venv/bin:$PATH torchx run -s local_cwd pipelines/components.py:train --config configs/synthetic_me.yaml "
    "--data runs/demo/dataset --run_dir runs/x -j 1x2": Run(after=(PIPELINE,)),
    ".venv/bin/torchx run -s kubernetes -cfg namespace=ctr,queue=ctr,service_account=ctr-trainer --workspace \"\" "
    "pipelines/components.py:train --image REGISTRY/ctr-multiembed:TAG -j 2x8 --gpu 8 --memMB 480000 --config "
    "configs/criteo_me.yaml --data s3://BUCKET/criteo --run_dir s3://BUCKET/runs/me4x "
    "--pushgateway pushgateway.ctr.svc:9091": TORCHX_K8S_DRYRUN,
    PIPELINE: Run(
        "make demo's pipeline, as a checkout where make demo ran has it, but on 6,000 generated rows, not 800k "
        "(runs/demo then serves every command that reads it)",
        append="--set generate.rows=6000 generate.cardinality_scale=0.001", timeout=420),
    # -- The data layer
    ".venv/bin/python -m trainer.data.synthetic --rows 1000000 --output data/synth.tsv.gz --format criteo-tsv":
        Run("2,000 rows, not a million", replace=(("--rows 1000000", "--rows 2000"),)),
    ".venv/bin/python -m trainer.data.synthetic --rows 1000000 --output data/synth --format parquet":
        Run("2,000 rows, not a million", replace=(("--rows 1000000", "--rows 2000"),)),
    # train.txt.gz and train.csv (the raw Criteo and Avazu files) are tiny stand-ins: see workspace
    ".venv/bin/python -m trainer.data.preprocess --dataset criteo --input train.txt.gz --output data/criteo": Run(),
    ".venv/bin/python -m trainer.data.preprocess --dataset avazu --input train.csv --output data/avazu": Run(),
    "PATH=$PWD/.venv/bin:$PATH torchx run -s local_cwd pipelines/components.py:preprocess --dataset criteo "
    "--input train.txt.gz --output data/criteo_2w --workers 2": Run(),
    ".venv/bin/torchx run -s kubernetes -cfg namespace=ctr,queue=ctr,service_account=ctr-trainer --workspace \"\" "
    "pipelines/components.py:preprocess --dataset criteo_1tb --input 's3://BUCKET/criteo_1tb/day_*' "
    "--output s3://BUCKET/criteo_1tb --workers 12 --memMB 64000 --image REGISTRY/ctr-multiembed:TAG": TORCHX_K8S_DRYRUN,
    # -- Your own data (the ads log, a chain of its own: 7,000 rows, one epoch)
    ADS_RAW: Run("7,000 rows, not 200,000", replace=(("--rows 200000", "--rows 7000"),)),
    ADS_PREPROCESS: Run(after=(ADS_RAW,)),
    # the next three (about 45 s here) are what tests/test_ads_log.py runs: the shipped config (one
    # epoch, smaller), export, and trainer.predict's main on the raw test day, parity checked
    ADS_TRAIN: NotHere("tests/test_ads_log.py trains configs/ads_log_me.yaml (one epoch, smaller) on the spec's dataset"),
    ADS_EXPORT: NotHere("tests/test_ads_log.py exports that run in process (the same export_artifact)"),
    ".venv/bin/python -m trainer.predict --artifact artifacts/ads_log --input data/ads_raw/day_2026-01-07.parquet "
    "--output ads_scores.csv": NotHere("tests/test_ads_log.py runs trainer.predict's main on the raw Parquet test day "
                                       "and checks it against the trainer's own test predictions"),
    # four torchx jobs (about a minute here): the same chain runs above as one-process commands;
    # the dry run builds every stage's job from the shipped config
    ".venv/bin/python -m pipelines.run --config configs/pipelines/ads_log.yaml": DryRun(append="--dryrun"),
    # -- Export for serving
    EXPORT: Run(after=(TRAIN_ONE, TORCHX_DDP)),  # (TORCHX_DDP: the last to write that run)
    ".venv/bin/python -m trainer.export --checkpoint runs/synthetic_dcnv2_me2x --output artifacts/dcnv2_me2x_int8 "
    "--quantize int8": Run(after=(TRAIN_ONE, TORCHX_DDP)),
    RAW_ROWS: Run(after=(PIPELINE,)),
    ".venv/bin/python -m trainer.predict --artifact artifacts/dcnv2_me2x --input raw_rows.tsv --output scores.csv "
    "--unlabeled": Run(after=(EXPORT, RAW_ROWS)),
    # -- Scaling sweep
    "make sweep-small": NotHere("35 trainings (~13 min); its two steps are the next two README lines, run here at a cheap size"),
    SWEEP_DATA: Run("3,000 rows, not 20,000", replace=(("--rows 20000", "--rows 3000"),)),
    SWEEP_SMALL: Run("one cell of the 35", append=ONE_SWEEP_CELL, after=(SWEEP_DATA,)),
    # the paper's grid: 378 cells of 8 GPUs each on Criteo and Avazu; --dry-run lists the cells
    # (one at a time: a sweep locks its output, runs/sweep_paper)
    PAPER: DryRun(append="--dry-run"),
    f"{PAPER} --models dcnv2,dnn --seeds 0": DryRun(append="--dry-run", after=(PAPER,)),
    f"{PAPER} --dry-run": Run(after=(f"{PAPER} --models dcnv2,dnn --seeds 0",)),
    f"{PAPER} --report-only": Run(after=(f"{PAPER} --dry-run",)),
    "PATH=$PWD/.venv/bin:$PATH torchx run -s local_cwd pipelines/components.py:sweep --spec configs/sweeps/small.yaml":
        Run("one cell of the 35 (done by the line above: the job writes the report)",
            append=f"-- {ONE_SWEEP_CELL}", after=(SWEEP_SMALL,)),
    ".venv/bin/torchx run -s kubernetes -cfg namespace=ctr,queue=ctr,service_account=ctr-trainer --workspace \"\" "
    "pipelines/components.py:sweep --spec /runs/paper.yaml --image REGISTRY/ctr-multiembed:TAG --gpu 8 --memMB 200000 "
    "--max_retries 3 --mounts type=volume,src=sweeps,dst=/runs --output /runs/paper": TORCHX_K8S_DRYRUN,
    # each cell its own job on the cluster: the dry run prints each cell's Volcano job; the output
    # is a local directory here (no s3fs or credentials), the datasets are not opened by a dry run
    ".venv/bin/python -m pipelines.sweep --spec configs/sweeps/paper.yaml --scheduler kubernetes --output "
    "s3://BUCKET/sweeps/paper --set 'launcher.scheduler_args={namespace: ctr, queue: ctr, service_account: ctr-trainer}' "
    "launcher.image=REGISTRY/ctr-multiembed:TAG launcher.gpu=8 launcher.cpu=64 launcher.memMB=480000 "
    "'datasets={criteo: s3://BUCKET/criteo, avazu: s3://BUCKET/avazu}' --models dcnv2,dnn --seeds 0": DryRun(
        "a local output instead of the bucket", replace=(("s3://BUCKET/sweeps/paper", "runs/sweep_paper_k8s"),),
        append="--dry-run"),
    # -- Several nodes
    ".venv/bin/torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id JOB "
    "--max-restarts 2 trainer/main.py --config configs/criteo_me.yaml --set data.path=s3://BUCKET/criteo "
    "run.dir=s3://BUCKET/runs/me4x": NotHere(
        "needs two nodes with 8 GPUs each; tests/test_multinode.py runs the same two-agent c10d line on loopback "
        "(--nnodes 2 --nproc-per-node 1) and compares it with the 1x2 run"),
    # -- GPU clusters
    "pip download --no-deps -d wheels fbgemm-gpu==1.8.0 torchrec==1.8.0": NotHere(
        "downloads the CUDA fbgemm-gpu wheel (hundreds of MB); tests/test_packaging.py resolves these two pins from "
        "the index (the cuda extra) and tests/test_gpu_check.py checks that the install step wants exactly them"),
    "make gpu-check PYTHON=python3 WHEELS=wheels": NotHere(
        "needs a CUDA GPU; tests/test_gpu_check.py checks the make target's PYTHON/WHEELS and the install step's "
        "commands and refusals"),
    "make gpu-check": NotHere("needs a CUDA GPU; tests/test_gpu_check.py checks that it refuses cleanly here"),
    "make gpu-check GPU_CHECK_ARGS=--dry-run": Run(),
    # -- Kubernetes
    ".venv/bin/torchx run -s kubernetes -cfg namespace=ctr,queue=ctr,service_account=ctr-trainer --workspace \"\" "
    "dist.ddp --image REGISTRY/ctr-multiembed:TAG -j 2x8 --gpu 8 --memMB 200000 --script trainer/main.py -- "
    "--config configs/criteo_me.yaml --set data.path=s3://BUCKET/criteo run.dir=s3://BUCKET/runs/me4x": TORCHX_K8S_DRYRUN,
    ".venv/bin/torchx run -s kubernetes -cfg namespace=ctr,queue=ctr,service_account=ctr-submitter --workspace \"\" "
    "pipelines/components.py:pipeline --config configs/pipelines/kubernetes.yaml --scheduler kubernetes "
    "--image REGISTRY/ctr-multiembed:TAG": TORCHX_K8S_DRYRUN,
    "docker build -t REGISTRY/ctr-multiembed:TAG .": NotHere("needs a Docker daemon (tests/test_deploy.py checks the Dockerfile)"),
    "docker push REGISTRY/ctr-multiembed:TAG": NotHere("needs a Docker daemon and a registry"),
    ".venv/bin/kubectl kustomize deploy/k8s/overlays/example": Run(),
    # object-store.env holds dummy keys here (see workspace)
    ".venv/bin/kubectl -n ctr-example create secret generic ctr-object-store --from-env-file=object-store.env":
        DryRun(append="--dry-run=client -o yaml"),
    ".venv/bin/kubectl apply -k deploy/k8s/overlays/example": NotHere(
        "needs a cluster's API server, even with --dry-run=client (it downloads the server's OpenAPI schema); "
        "the render is the kustomize line above, and tests/test_deploy.py validates it"),
    # -- Benchmarks (each at a small size: make bench runs them at full size)
    ".venv/bin/python -m bench.bench_cli_help": Run("one run per CLI, not five", append="--repeat 1"),
    ".venv/bin/python -m bench.bench_loader": Run("20k rows, not 2M", append="--rows 20000"),
    ".venv/bin/python -m bench.bench_preprocess": Run("20k rows, not 1M and 5M", append="--rows 20000"),
    ".venv/bin/python -m bench.bench_dataset_spec": Run("20k rows, not 1M and 2M", append="--rows 20000"),
    ".venv/bin/python -m bench.bench_vocabulary": Run("20k tokens and rows, not up to 5M and 7M", append="--tokens 20000 --rows 20000"),
    ".venv/bin/python -m bench.bench_synthetic": Run("20k rows, not 1M", append="--rows 20000"),
    ".venv/bin/python -m bench.bench_train --models dcnv2 --modes se me --scales 1 4 10 --threads 1": NotHere(
        "the Criteo-sized grid takes minutes; tests/test_bench_train.py runs the same CLI at a tiny size beside "
        "the baseline and checks its columns"),
    ".venv/bin/python -m bench.bench_collapse --rows 10000000": Run(
        "20k rows, not 10M", replace=(("--rows 10000000", "--rows 20000"),)),
    ".venv/bin/python -m bench.bench_collapse --sets 10 --rows 1000000 --dim 10": Run(
        "20k rows, not 1M", replace=(("--rows 1000000", "--rows 20000"),)),
    ".venv/bin/python -m bench.bench_paper_findings --threads 1": Run(
        "one toy seed and one SE-vs-ME setting of 3,000 rows, not 5 seeds and 12 settings of 30k",
        append="--rows 3000 --toy-seeds 0 --seeds 0 --latent-dims 16 --recipes industrial"),
    ".venv/bin/python -m bench.bench_auc_scale --out runs/auc_scale --threads 1": NotHere(
        "21 trainings, over an hour of CPU; tests/test_paper_findings.py runs its --results path on cells it writes"),
    ".venv/bin/python -m bench.bench_checkpoint --gib 1": Run("10 MiB, not 1 GiB", replace=(("--gib 1", "--gib 0.01"),)),
    ".venv/bin/python -m bench.bench_multi_hot": Run("14k rows, two rounds of one step", append="--rows 20000 --rounds 2 --steps 1"),
    ".venv/bin/python -m bench.bench_embedding_optim": Run("the demo vocabulary at 1x, batch 256, one step",
                                                           append="--vocab demo --scales 1 --batch 256 --warmup 0 --steps 1"),
    ".venv/bin/python -m bench.bench_export": Run("a small vocabulary, few iterations",
                                                  append="--cardinality-scale 0.001 --iters 5"),
    ".venv/bin/python -m trainer.predict ...": NotHere(
        "a placeholder for the predict command of Export for serving, which runs here"),
}


def effective(command: str, plan: Run) -> str:
    for old, new in plan.replace:
        assert old in command, f"COMMANDS[{command!r}]: {old!r} is not in the command any more"
        command = command.replace(old, new, 1)
    return f"{command} {plan.append}" if plan.append else command


# ---- the classification (fast) ----------------------------------------------------------------

HOW_TO = """Classify each in COMMANDS of tests/test_readme_commands.py, keyed by the command exactly as printed:
  Run()                        it runs here as printed (exit 0 expected)
  Run("why", append=..., replace=((old, new),), after=(other README command,))
                               it runs here once made cheap (fewer rows/steps/cells), or needs another's output
  DryRun(append="--dry-run")   it needs a cluster, and its tool can dry-run it (torchx: TORCHX_K8S_DRYRUN)
  NotHere("reason")            neither: say why (docker, an API server, a placeholder, CI runs it)"""


def test_every_readme_command_is_classified():
    found = readme_commands(README.read_text())
    assert len(found) > 30, f"only {len(found)} commands parsed from README.md: is the parser still right?"
    unknown = [f"  {where}: {cmd}" for cmd, where in found if cmd not in COMMANDS]
    assert not unknown, "README commands this test does not know:\n" + "\n".join(unknown) + "\n" + HOW_TO
    printed = {cmd for cmd, _ in found}
    stale = [f"  {cmd}" for cmd in COMMANDS if cmd not in printed]
    assert not stale, ("COMMANDS entries that README.md no longer prints (remove them, or fix the README; "
                       "a changed command is also reported as unknown):\n" + "\n".join(stale))
    for cmd, plan in COMMANDS.items():
        if isinstance(plan, Run):
            effective(cmd, plan)
            missing = [dep for dep in plan.after if dep not in COMMANDS]
            assert not missing, f"COMMANDS[{cmd!r}].after names no command: {missing}"


def test_parser_reads_blocks_continuations_comments_and_table_cells():
    text = "\n".join([
        "prose `make demo` is not a command here",
        "```bash",
        "make demo   # trailing comment",
        "# a comment line",
        "",
        "torchx run -s k8s \\",
        "    comp --a 1   # note",
        "echo 'a # b'",
        "```",
        "```",
        "python -m not.bash",
        "```",
        "| What | Command |",
        "| --- | --- |",
        "| x | `python -m bench.x --rows 2` and `--flag` |",
        "| y | `make  test` |",
    ])
    assert [c for c, _ in readme_commands(text)] == [
        "make demo", "torchx run -s k8s comp --a 1", "echo 'a # b'", "python -m bench.x --rows 2", "make test"]


# ---- running them (slow) ------------------------------------------------------------------------


def _avazu_csv(path: Path, rows: int = 400) -> None:
    from trainer.data.raw_formats import AVAZU

    rng = np.random.default_rng(0)
    lines = [",".join(AVAZU.columns)]
    for i in range(rows):
        row = [str(10_000_000_000_000_000_000 + i), str(int(rng.random() < 0.3)), f"141021{rng.integers(0, 3):02d}"]
        row += [f"v{rng.integers(0, 6)}" if k % 2 else f"{rng.integers(0, 5):08x}" for k in range(21)]
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")


def _env() -> dict[str, str]:
    """This machine's environment, without .venv/bin on PATH (the commands must name it) and
    without what a torchrun parent or a Pushgateway setting would leak into the commands."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID",
                        "CTR_FAIL_AT_STEP", "CTR_FAIL_RANK", "CTR_PUSHGATEWAY", "VIRTUAL_ENV")}
    venv_bins = {str(VENV_BIN), str(VENV_BIN.resolve())}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p not in venv_bins)
    return env


class Workspace:
    """A checkout where ``make demo`` ran: the sources linked, ``configs/`` and ``.torchxconfig``
    copied, the raw inputs a user brings (tiny stand-ins), and ``runs/demo`` written by the
    README's own pipeline command (at a cheap size) before the commands that read it."""

    LINKED = (".venv", "trainer", "pipelines", "bench", "deploy", "tools", "Makefile")
    COPIED = ("configs", ".torchxconfig", "pyproject.toml")

    def __init__(self, root: Path):
        self.root = root
        for name in self.LINKED:
            (root / name).symlink_to(ROOT / name)
        for name in self.COPIED:
            src = ROOT / name
            shutil.copytree(src, root / name) if src.is_dir() else shutil.copy2(src, root / name)
        self.env = _env()
        self.lock = threading.Lock()
        self.results: dict[str, Future] = {}
        self.seconds: dict[str, float] = {}
        self.queued: dict[str, Future] = {}
        # the raw files the README's preprocess lines read (Criteo's train.txt.gz, Avazu's train.csv)
        tsv = root / "criteo-sample.tsv"
        self._check(f".venv/bin/python -m trainer.data.synthetic --rows 3000 --cardinality-scale 0.001 "
                    f"--format criteo-tsv --output {tsv.name}")
        with open(tsv, "rb") as src, gzip.open(root / "train.txt.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        _avazu_csv(root / "train.csv")
        # the env file the README's kubectl line makes the Secret from: dummy values
        (root / "object-store.env").write_text("AWS_ACCESS_KEY_ID=example\nAWS_SECRET_ACCESS_KEY=example\n")

    def _check(self, command: str) -> None:
        proc = self._bash(command, 300)
        assert proc.returncode == 0, f"workspace set-up failed: {command}\n{proc.stderr[-3000:]}"

    def run(self, command: str) -> subprocess.CompletedProcess:
        """Run a README command once (its ``after`` commands first), or wait for the thread
        running it; raises on its failure or a failed ``after`` command."""
        with self.lock:
            future = self.results.get(command)
            mine = future is None
            if mine:
                future = self.results[command] = Future()
        if mine:  # dependencies are acyclic, so a thread waits only on threads that make progress
            plan = COMMANDS[command]
            assert isinstance(plan, Run)
            try:
                for dep in plan.after:
                    self.run(dep)
                started = time.monotonic()
                proc = self._bash(effective(command, plan), plan.timeout)
                self.seconds[command] = time.monotonic() - started
                if proc.returncode != 0:
                    raise AssertionError(
                        f"README command failed (exit {proc.returncode}), in {self.root}:\n  {effective(command, plan)}\n"
                        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
                future.set_result(proc)
            except BaseException as e:  # remembered, not retried
                future.set_exception(AssertionError(f"{command}: {e}") if not isinstance(e, AssertionError) else e)
        return future.result()

    def _bash(self, script: str, timeout: float) -> subprocess.CompletedProcess:
        """``bash -o pipefail -c SCRIPT`` in the workspace; on a timeout its whole process group
        (torchrun's ranks, torchx's jobs) is killed, so nothing keeps the shared cores busy."""
        with subprocess.Popen(["bash", "-o", "pipefail", "-c", script], cwd=self.root, env=self.env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                raise AssertionError(f"timed out after {timeout:.0f}s: {script}\nstdout:\n{out[-3000:]}\n"
                                     f"stderr:\n{err[-5000:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def start_all(self, commands: list[str], workers: int = 2) -> ThreadPoolExecutor:
        """Queue every runnable command, run ``workers`` at a time (``self.queued[c]``): first
        those that others wait for and that wait for none (the pipeline), then the others by
        the length of their chain of ``after`` commands, so that while one worker runs a long
        chain the other has independent commands to run."""

        def depth(command: str) -> int:
            return 1 + max((depth(d) for d in COMMANDS[command].after), default=0)

        runnable = [c for c in commands if isinstance(COMMANDS[c], Run)]
        awaited = {d for c in runnable for d in COMMANDS[c].after}
        order = sorted(runnable, key=lambda c: (not (c in awaited and depth(c) == 1), depth(c)))  # stable: README order
        pool = ThreadPoolExecutor(max_workers=workers)
        self.queued = {c: pool.submit(self.run, c) for c in order}
        return pool


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, request):
    ws = Workspace(tmp_path_factory.mktemp("readme-checkout"))
    selected = [item.callspec.params["command"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_readme_command" and hasattr(item, "callspec")]
    pool = ws.start_all(selected)  # only the selected ones (and what they need: -k picks a few)
    yield ws
    pool.shutdown(wait=True, cancel_futures=True)
    print("\nREADME commands, seconds each:\n" + "\n".join(f"{s:7.1f}  {c}" for c, s in ws.seconds.items()))


def _readme_order() -> list[str]:
    """The README's commands that run here (for real or as a dry run), in README order."""
    seen: dict[str, None] = {}
    for cmd, _ in readme_commands(README.read_text()):
        if cmd in COMMANDS and not isinstance(COMMANDS[cmd], NotHere):
            seen.setdefault(cmd)
    return list(seen)


def test_commands_not_runnable_here_say_why():
    """Each README command that cannot run here (Docker, a cluster, CI itself) names why:
    a list, not skipped tests."""
    not_here = {cmd: plan.reason for cmd, plan in COMMANDS.items() if isinstance(plan, NotHere)}
    assert not_here and all(len(reason.split()) >= 3 for reason in not_here.values()), not_here


def _test_id(command: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:=,/-]+", "_", command.replace(".venv/bin/", ""))[:90]


@pytest.mark.slow
@pytest.mark.parametrize("command", _readme_order(), ids=_test_id)
def test_readme_command(command: str, request):
    workspace = request.getfixturevalue("workspace")
    workspace.queued[command].result()  # raises the command's failure
    if command == RAW_ROWS:
        rows = (workspace.root / "raw_rows.tsv").read_text().splitlines()
        assert len(rows) == 1000 and all(len(r.split("\t")) == 39 for r in rows)  # Criteo without its label
    if command.startswith(".venv/bin/python -m trainer.predict"):
        output = command.split("--output ", 1)[1].split()[0]  # scores.csv, ads_scores.csv
        assert len((workspace.root / output).read_text().splitlines()) >= 1000
