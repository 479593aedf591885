"""Two "nodes" on one machine: two torchrun agents (``--nnodes 2 --nproc-per-node 1``, c10d
rendezvous on 127.0.0.1) train the same job as the single-node ``torchrun --standalone
--nproc-per-node 2`` run and end with the same summary; only global rank 0 (node 0) writes
the run directory's files, not node 1's local rank 0.

Each agent's worker has LOCAL_RANK 0 and LOCAL_WORLD_SIZE 1, so it takes all the cores of
its "node" for its threads. On one machine every worker would see all the machine's cores
and take them all (oversubscribed two to one); the results depend on the threads per process
(CPU reductions split differently), so each "node" is given half of the machine's cores
(``os.cpu_count`` patched in the workers): the same threads per process as the single-node
run, whose two ranks share the machine.

Which process wrote what is recorded by an audit hook (``sitecustomize`` on PYTHONPATH) that
logs every file a worker opens for writing, with the worker's RANK, GROUP_RANK and LOCAL_RANK.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, VENV_BIN, cli_env, free_port, metrics, ok, summary, torchrun

pytestmark = pytest.mark.slow  # three torchrun agents, two of them a 2-node job

STEPS = 6  # 2 ranks x 256 rows per step: 1 epoch of the tiny dataset is 10 steps; stop at 6
ARGS = ["train.epochs=1", f"train.max_steps={STEPS}", "train.log_every_steps=2", "train.checkpoint_every_steps=3"]
NODE_CPUS = max(1, (os.cpu_count() or 1) // 2)  # each "node" is half of this machine

# logs "AGENT RANK GROUP_RANK LOCAL_RANK path" for every file under the run directory opened for writing,
# renamed into place or created as a directory
AUDIT_HOOK = textwrap.dedent(
    """
    import os, sys

    _log = os.environ.get("CTR_WRITE_LOG")
    _watch = os.environ.get("CTR_WRITE_WATCH")
    if _log and _watch and "RANK" in os.environ:  # workers only, not the torchrun agents
        _who = " ".join(os.environ.get(k, "-") for k in ("CTR_AGENT", "RANK", "GROUP_RANK", "LOCAL_RANK"))
        _node_cpus = os.environ.get("CTR_NODE_CPUS")
        if _node_cpus:  # this "node"'s cores: the trainer sizes its threads from them (its affinity)
            os.cpu_count = lambda: int(_node_cpus)
            os.sched_getaffinity = lambda pid: set(range(int(_node_cpus)))

        def _threads():  # the intra-op threads the worker trained with
            torch = sys.modules.get("torch")
            if torch is not None:
                with open(_log, "a") as f:
                    f.write(f"{_who} threads={torch.get_num_threads()}\\n")

        import atexit
        atexit.register(_threads)
        _flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _hook(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                path = os.fsdecode(args[0])
                mode, flags = args[1] or "", args[2] or 0
                writes = any(c in str(mode) for c in "wax+") or bool(flags & _flags)
                if writes and os.path.abspath(path).startswith(_watch):
                    with open(_log, "a") as f:  # a nested open: this hook sees it, it is not under _watch
                        f.write(f"{_who} {os.path.abspath(path)}\\n")
            elif event in ("os.rename", "os.replace", "os.mkdir") and args:
                dst = os.fsdecode(args[1] if event != "os.mkdir" else args[0])
                if os.path.abspath(dst).startswith(_watch):
                    with open(_log, "a") as f:
                        f.write(f"{_who} {os.path.abspath(dst)}\\n")

        sys.addaudithook(_hook)
    """
)


def _two_nodes(data: Path, run_dir: Path, hook_dir: Path, write_log: Path, timeout: float = 150) -> list[subprocess.CompletedProcess]:
    """Start the two agents together; kill both process groups if either hangs. Under c10d
    rendezvous torchrun ignores ``--node-rank``: which agent's worker becomes rank 0 (node 0,
    GROUP_RANK 0) is the rendezvous' choice, so the workers log their agent (CTR_AGENT)."""
    port, job = free_port(), f"multinode-{os.getpid()}"
    env = cli_env(
        PYTHONPATH=os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        CTR_WRITE_LOG=str(write_log),
        CTR_WRITE_WATCH=str(run_dir),
        CTR_NODE_CPUS=str(NODE_CPUS),
    )
    procs = []
    outs: list[Path] = []
    try:
        for node in (0, 1):
            cmd = [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job,
                   "--max-restarts", "0", "--monitor-interval", "0.5",
                   "trainer/main.py", "--set", *TINY, f"data.path={data}", f"run.dir={run_dir}", *ARGS]  # fmt: skip
            out = write_log.parent / f"node{node}.out"
            outs.append(out)
            with open(out, "w") as f:  # files, not pipes: nobody reads one agent's pipe while waiting on the other
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "CTR_AGENT": str(node)}, stdout=f, stderr=subprocess.STDOUT, text=True,
                                              start_new_session=True))
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, out.read_text(), "") for p, out in zip(procs, outs)]


def test_two_nodes_end_like_one_node_and_only_rank0_writes(tiny_dataset, tmp_path):
    ref_dir = tmp_path / "one_node" / "run"
    ok(torchrun(f"data.path={tiny_dataset}", f"run.dir={ref_dir}", *ARGS))

    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    write_log = tmp_path / "writes.log"
    run_dir = tmp_path / "two_nodes" / "run"
    node0, node1 = _two_nodes(tiny_dataset, run_dir, hook_dir, write_log)
    for node, proc in enumerate((node0, node1)):
        assert proc.returncode == 0, f"node {node} agent exit {proc.returncode}\n{proc.stdout[-6000:]}"

    assert write_log.exists(), f"the audit hook did not run\n{node0.stdout[-3000:]}"

    # the same job: same summary as the single-node 2-rank run
    ref, got = summary(ref_dir), summary(run_dir)
    assert ref["world_size"] == got["world_size"] == 2 and ref["steps"] == got["steps"] == STEPS
    for key in ("test_auc", "test_logloss", "val_auc", "val_logloss"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    for key in ("steps", "best_step", "epochs_completed", "train_examples"):
        assert got[key] == ref[key], key
    records = metrics(run_dir)
    lines = write_log.read_text().splitlines()
    # threads from LOCAL_WORLD_SIZE (1 per node): all of the node's cores, not cores / WORLD_SIZE
    threads = {tuple(line.split(" ")[:4]): line.split("threads=")[1] for line in lines if " threads=" in line}
    workers = sorted(threads)
    assert [w[1:] for w in sorted(workers, key=lambda w: w[1])] == [("0", "0", "0"), ("1", "1", "0")], workers
    assert set(threads.values()) == {str(NODE_CPUS)}, threads
    main_agent = next(w[0] for w in workers if w[1] == "0")  # the agent whose worker is global rank 0
    main, other = (node0, node1) if main_agent == "0" else (node1, node0)

    # the summary is printed once, by global rank 0 (node 0's local rank 0)
    assert "test AUC" in main.stdout and f"run directory: {run_dir}" in main.stdout, main.stdout[-3000:]
    assert "test AUC" not in other.stdout and "run directory:" not in other.stdout, other.stdout[-3000:]

    # the run directory's files were written once, by global rank 0 alone: node 1's local rank 0 wrote
    # nothing but its own checkpoint shards
    for kind in ("train", "val"):
        steps = [r["step"] for r in records if r["kind"] == kind]
        assert steps and len(steps) == len(set(steps)), f"{kind} steps logged more than once: {steps}"
    assert [(r["kind"], r["step"]) for r in records] == [(r["kind"], r["step"]) for r in metrics(ref_dir)]
    writes = [line.split(" ", 4) for line in lines if " threads=" not in line]
    outside_checkpoints = [w for w in writes if not w[4].startswith(str(run_dir / "checkpoints"))]  # DCP: every rank its shards
    assert outside_checkpoints, "the audit hook saw no run directory writes"
    by_other = [w for w in outside_checkpoints if w[1:4] != ["0", "0", "0"]]
    assert not by_other, f"run directory files written by a process other than global rank 0: {by_other}"
    plan_writes = [w for w in outside_checkpoints if Path(w[4]).name.startswith("plan")]
    assert len([w for w in plan_writes if Path(w[4]).name == "plan.txt"]) == 1, f"plan.txt not written once: {plan_writes}"
    summary_writes = [w for w in outside_checkpoints if Path(w[4]).name == "summary.json"]
    assert len(summary_writes) == 1, f"summary.json not written once: {summary_writes}"
    assert (run_dir / "plan.txt").read_text() and json.loads((run_dir / "summary.json").read_text())
