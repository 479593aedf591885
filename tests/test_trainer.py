"""The trainer through its CLI, one process: a whole run and its run directory, resume
equality, and every user-caused failure (exit 2, ``error: ...``, no traceback).

Runs ``python -m trainer.main`` in subprocesses on a 6,000-row synthetic dataset with a
tiny DCNv2 multi-embedding model (see tests.helpers.TINY). Multi-rank behaviour
(torchrun restarts, resharding, torchx) is in test_trainer_faults.py.
"""

from __future__ import annotations

import json
import math
import re

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.helpers import (
    SUMMARY_KEYS,
    assert_same_tensors,
    checkpoint_steps,
    ckpt_path,
    copy_run,
    load_checkpoint_tensors,
    make_dataset,
    metrics,
    TINY,
    Launcher,
    ok,
    summary,
    train,
    user_error,
)
from trainer.data.loader import CTRDataLoader, LoaderConfig
from trainer.eval_metrics import base_rate_entropy

# The baseline run: 3 epochs of 19 steps would be 57 steps; it stops at max_steps=45, mid-epoch
# and between two evaluations (every 10 steps and at epoch ends), checkpointing every 4 steps.
EPOCHS, MAX_STEPS, EVAL_EVERY, CKPT_EVERY = 3, 45, 10, 4
STOP_AT = 30  # the interrupted run stops here (an evaluation step, mid-epoch 1), then resumes


def _baseline_args(data, run_dir, max_steps=MAX_STEPS):
    return [
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"train.epochs={EPOCHS}",
        f"train.max_steps={max_steps}",
        f"train.eval_every_steps={EVAL_EVERY}",
        f"train.checkpoint_every_steps={CKPT_EVERY}",
    ]


BAD_CONFIGS = {
    "unknown-key": (["train.epoch=2"], ["unknown key", "'epoch'", "valid keys", "epochs", "max_steps"]),
    "adam-on-cpu": (["optim.embedding=adam"], ["'adam'", "cpu can run", "sgd", "rowwise_adagrad"]),
    "row-wise-on-cpu": (["sharding.sharding_types=[row_wise]"], ["row_wise", "cannot run on cpu", "table_wise"]),
    "storage-cap": (["sharding.storage_cap_bytes=1000"], ["does not fit", "1000 bytes", "storage_cap_bytes"]),
}


def _snapshot(run_dir):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """Same generator, twice the cardinalities: the same fields, different table sizes."""
    return make_dataset(tmp_path_factory.mktemp("data") / "wider", cardinality_scale=0.001)


@pytest.fixture(scope="module")
def runs(tiny_dataset, other_dataset, tmp_path_factory):
    """Every CLI run of this module, started at once and run two at a time (each is mostly
    interpreter and TorchRec start-up). Tests take their run's outcome by name:

    - ``baseline`` (run A): uninterrupted, MAX_STEPS steps; ``stopped``: the same run stopped by
      max_steps at STOP_AT. Neither directory is written by anything else.
    - the bad configs, a missing dataset;
    - once ``stopped`` is done, each of the following works on its own copy of it: ``resumed``
      (run B: continue to MAX_STEPS), ``never``, ``corrupt``, ``no-meta``,
      ``mismatch-dataset``, ``mismatch-scale``, ``nan``. Their results are (proc, info).
    """
    root = tmp_path_factory.mktemp("runs")
    stopped = root / "stopped"
    launcher = Launcher()
    launcher.submit("baseline", lambda: ok(train(*_baseline_args(tiny_dataset, root / "baseline"))))
    launcher.submit("stopped", lambda: ok(train(*_baseline_args(tiny_dataset, stopped, max_steps=STOP_AT))))
    for case, (overrides, _) in BAD_CONFIGS.items():
        launcher.submit(case, train, f"data.path={tiny_dataset}", f"run.dir={root / case}", *overrides)
    launcher.submit("missing-data", train, f"data.path={root / 'no-such-dataset'}", f"run.dir={root / 'missing'}")

    def resumed():
        run_dir = copy_run(stopped, root / "resumed")
        return train(*_baseline_args(tiny_dataset, run_dir), resume="auto"), {"dir": run_dir}

    def never():
        run_dir = copy_run(stopped, root / "never")
        before = _snapshot(run_dir)
        return train(*_baseline_args(tiny_dataset, run_dir), resume="never"), {"dir": run_dir, "before": before}

    def corrupt():
        run_dir = copy_run(stopped, root / "corrupt")
        latest = ckpt_path(run_dir, STOP_AT)
        shard = sorted(latest.glob("*.distcp"))[0]
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        info = {"dir": run_dir, "latest": latest, "metrics": (run_dir / "metrics.jsonl").read_text(),
                "checkpoints": checkpoint_steps(run_dir)}
        return train(*_baseline_args(tiny_dataset, run_dir), resume="auto"), info

    def no_meta():
        src = copy_run(stopped, root / "no-meta-src")
        incomplete = ckpt_path(src, STOP_AT)
        (incomplete / "meta.json").unlink()
        return train(*_baseline_args(tiny_dataset, root / "no-meta"), resume=str(incomplete)), {"ckpt": incomplete}

    def mismatch(change):
        run_dir = copy_run(stopped, root / f"mismatch-{change}")
        info = {"dir": run_dir, "config": (run_dir / "config.yaml").read_text(), "plan": (run_dir / "plan.txt").read_text()}
        if change == "dataset":
            args = _baseline_args(other_dataset, run_dir)
        else:
            args = [*_baseline_args(tiny_dataset, run_dir), "embedding.scale=3"]
        return train(*args, resume="auto"), info

    def nan():
        # an absurd dense lr blows the weights up in the first update after resuming at step 30:
        # that step's loss is still finite, the next one (32) is not
        run_dir = copy_run(stopped, root / "nan")
        info = {"dir": run_dir, "checkpoints": checkpoint_steps(run_dir)}
        return train(*_baseline_args(tiny_dataset, run_dir), "optim.dense_lr=1e30", resume="auto"), info

    launcher.after("resumed", "stopped", resumed)
    launcher.after("never", "stopped", never)
    launcher.after("corrupt", "stopped", corrupt)
    launcher.after("no-meta", "stopped", no_meta)
    launcher.after("mismatch-dataset", "stopped", mismatch, "dataset")
    launcher.after("mismatch-embedding.scale", "stopped", mismatch, "embedding.scale")
    launcher.after("nan", "stopped", nan)
    launcher.root = root
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def baseline(runs):
    return runs.root / "baseline", runs.result("baseline")


@pytest.fixture(scope="module")
def stopped(runs):
    runs.result("stopped")
    return runs.root / "stopped"


# ---- 1. a whole run ------------------------------------------------------------------


@pytest.mark.slow
def test_one_process_run_writes_a_complete_run_directory(baseline, tiny_dataset):
    run_dir, proc = baseline
    schema = json.loads((tiny_dataset / "schema.json").read_text())
    fields = [f["name"] for f in schema["sparse_fields"]]
    train_rows = schema["splits"]["train"]["rows"]
    loader = CTRDataLoader(str(tiny_dataset), "train", LoaderConfig(batch_size=256, shuffle=True), rank=0, world_size=1)
    steps_per_epoch = len(loader)
    batch_rows = [b.labels.numel() for b in loader]

    for name in ("config.yaml", "plan.txt", "metrics.jsonl", "collapse.jsonl", "summary.json", "summary.txt", "checkpoints"):
        assert (run_dir / name).exists(), f"{name} missing from the run directory"
    assert not [p.name for p in run_dir.rglob("*.tmp")], "temporary files left behind"

    s = summary(run_dir)
    assert SUMMARY_KEYS <= set(s), f"summary lacks {SUMMARY_KEYS - set(s)}"
    assert s["world_size"] == 1 and s["device"] == "cpu"
    for key in ("val_auc", "test_auc"):
        assert 0.5 < s[key] <= 1.0, f"{key} {s[key]}: the tiny model should beat chance"
    assert 0 < s["test_logloss"] < 0.69, "test logloss should beat a coin flip"
    entropy = {}
    for split in ("val", "test"):  # NE: logloss over the entropy of the split's base rate (< 1 beats predicting the CTR)
        entropy[split] = base_rate_entropy(pq.read_table(tiny_dataset / split, columns=["label"])["label"].to_numpy())
        assert s[f"{split}_ne"] == pytest.approx(s[f"{split}_logloss"] / entropy[split], rel=1e-9)
        assert 0 < s[f"{split}_ne"] < 1.2, f"{split} NE {s[f'{split}_ne']}: the tiny model is about as good as the base rate"
    oracle_ne = schema["recipe"]["oracle"]["test"]["logloss"] / entropy["test"]
    assert oracle_ne < 1 and oracle_ne <= s["test_ne"] + 0.02, "no model should beat the true click probabilities"
    assert math.isfinite(s["test_calibration"]) and s["test_calibration"] > 0
    assert s["oracle_test_auc"] == pytest.approx(schema["recipe"]["oracle"]["test"]["auc"])
    assert s["oracle_test_auc"] >= s["test_auc"] - 0.02, "no model should beat the true click probabilities"
    assert s["steps"] == MAX_STEPS and s["epochs_completed"] == MAX_STEPS // steps_per_epoch
    assert s["train_examples"] == 2 * train_rows + sum(batch_rows[: MAX_STEPS - 2 * steps_per_epoch])
    assert s["train_examples_per_sec"] > 0 and s["train_seconds"] > 0
    assert s["model"] == "dcnv2" and s["embedding"].startswith("me 2x")
    text = (run_dir / "summary.txt").read_text()
    assert "test AUC" in text and f"test NE       {s['test_ne']:.5f}" in text and f"val NE        {s['val_ne']:.5f}" in text
    assert "test AUC" in proc.stdout, "the summary is printed at the end"
    # the training log: progress against the run's total steps, elapsed time and ETA
    progress = re.findall(r"epoch \d+ step (\d+)/(\d+) \(\d+%\)  loss [\d.]+  [\d,]+ ex/s  elapsed \d+:\d\d  ETA (\S+)", proc.stderr)
    assert progress, f"no progress line with an ETA in the log:\n{proc.stderr[-3000:]}"
    assert {int(total) for _, total, _ in progress} == {MAX_STEPS}, "the total is train.max_steps (below 3 epochs)"
    assert progress[-1][0] == str(MAX_STEPS) and progress[-1][2] == "0:00"

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["hidden"] == 16 and config["embedding"]["scale"] == 2
    assert config["train"]["patience"] == 3, "config.yaml holds the resolved config, defaults included"

    records = metrics(run_dir)
    trains = [r for r in records if r["kind"] == "train"]
    vals = [r for r in records if r["kind"] == "val"]
    assert trains and all(math.isfinite(r["loss"]) and r["examples_per_sec"] > 0 for r in trains)
    assert trains[-1]["step"] == MAX_STEPS
    expected_evals = sorted({*range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY), steps_per_epoch, 2 * steps_per_epoch, MAX_STEPS})
    assert [r["step"] for r in vals] == expected_evals, "evaluations every N steps, at epoch ends, and at the final step"
    assert all(r["rows"] == schema["splits"]["val"]["rows"] for r in vals), "every val row is scored"
    assert all(0 < r["ne"] < 2 for r in vals), "every validation record has its NE"
    best = max(vals, key=lambda r: r["auc"])
    assert s["best_step"] == best["step"] and s["val_auc"] == pytest.approx(best["auc"], abs=1e-9)

    # collapse monitoring ran at every evaluation, on every field and set, with sane values
    collapse = [json.loads(line) for line in (run_dir / "collapse.jsonl").read_text().splitlines()]
    assert [r["step"] for r in collapse] == [r["step"] for r in vals]
    dim = config["embedding"]["base_dim"]
    for record in collapse:
        assert sorted(record["fields"]) == sorted(fields)
        for f in record["fields"].values():
            assert len(f["set_ia"]) == 2 and all(1.0 <= ia <= dim + 1e-9 for ia in f["set_ia"])
            assert all(0 < r < 1.5 for r in f["set_ia_ratio"])
            assert 1.0 <= f["overall_ia"] <= 2 * dim + 1e-9
            assert f["diversity"] is None or -1e-9 <= f["diversity"] <= 1 + 1e-9
    assert s["collapse_monitor_seconds"] > 0 and s["collapse_monitor_overhead"] >= 0

    plan = (run_dir / "plan.txt").read_text()
    rows = {tuple(line.split()[:3]) for line in plan.splitlines()[2:]}
    for m in range(2):
        for f in fields:
            assert (str(m), f, f"set{m}__{f}") in rows, f"plan.txt lacks set {m} field {f}"
    assert len(plan.split("\n\n")[0].splitlines()) == 2 + 2 * len(fields)  # our table; the planner's estimates follow

    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert all(re.fullmatch(r"step-\d{8}", n) for n in names), names
    assert set(checkpoint_steps(run_dir)) == {MAX_STEPS, s["best_step"]}, "only the latest and the best are kept"
    for step in checkpoint_steps(run_dir):
        d = ckpt_path(run_dir, step)
        meta = json.loads((d / "meta.json").read_text())
        assert meta["progress"]["step"] == step
        assert list(d.glob("*.distcp")) and (d / ".metadata").exists()
    assert s["best_checkpoint"].endswith(f"step-{s['best_step']:08d}")


# ---- 2. resume equality ----------------------------------------------------------------


@pytest.mark.slow
def test_resumed_run_ends_identical_to_the_uninterrupted_one(runs, baseline, stopped, tmp_path):
    a_dir, _ = baseline
    first = summary(stopped)
    assert first["steps"] == STOP_AT and checkpoint_steps(stopped)[-1] == STOP_AT

    proc, info = runs.result("resumed")
    ok(proc)
    b_dir = info["dir"]
    assert f"resumed from {b_dir}/checkpoints/step-{STOP_AT:08d}" in proc.stderr, "must resume, not restart"

    a, b = summary(a_dir), summary(b_dir)
    for key in ("test_auc", "test_logloss", "val_auc", "val_logloss"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    for key in ("steps", "best_step", "epochs_completed", "train_examples"):
        assert b[key] == a[key], key

    b_records = metrics(b_dir)
    assert [r["step"] for r in b_records if r["kind"] == "train" and r["step"] <= STOP_AT] == [
        r["step"] for r in metrics(a_dir) if r["kind"] == "train" and r["step"] <= STOP_AT
    ], "the resumed part did not retrain (or relog) the steps before the checkpoint"
    a_vals = [(r["step"], r["auc"], r["logloss"]) for r in metrics(a_dir) if r["kind"] == "val"]
    b_vals = [(r["step"], r["auc"], r["logloss"]) for r in b_records if r["kind"] == "val"]
    assert [v[0] for v in b_vals] == [v[0] for v in a_vals]
    for (_, auc_a, ll_a), (_, auc_b, ll_b) in zip(a_vals, b_vals):
        assert auc_b == pytest.approx(auc_a, abs=1e-6) and ll_b == pytest.approx(ll_a, abs=1e-6)

    assert_same_tensors(
        load_checkpoint_tensors(ckpt_path(a_dir, MAX_STEPS), tmp_path),
        load_checkpoint_tensors(ckpt_path(b_dir, MAX_STEPS), tmp_path),
        what=f"step {MAX_STEPS} (model and optimizer state)",
    )


# ---- 3. --resume never -------------------------------------------------------------------


@pytest.mark.slow
def test_resume_never_refuses_a_run_directory_with_checkpoints(runs):
    proc, info = runs.result("never")
    user_error(proc, "already has checkpoints", f"step-{STOP_AT:08d}", "--resume auto")
    assert _snapshot(info["dir"]) == info["before"], "the run directory was touched"


# ---- 4. bad input ------------------------------------------------------------------------


def test_config_reads_exponent_floats_and_names_bad_keys():
    from trainer.job_config import load_config
    from trainer.errors import UserError

    config = load_config(None, ["data.path=x", "optim.dense_lr=1e-3", "optim.weight_decay=1e-6"])
    assert config.optim.dense_lr == 1e-3 and config.optim.weight_decay == 1e-6
    with pytest.raises(UserError, match=r"optim\.dense_lr: expected a number"):
        load_config(None, ["data.path=x", "optim.dense_lr=fast"])


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
@pytest.mark.slow
def test_bad_config_is_a_clear_error(case, runs):
    proc = runs.result(case)
    user_error(proc, *BAD_CONFIGS[case][1])
    assert not (runs.root / case / "checkpoints").exists()
    assert not (runs.root / case / "config.yaml").exists(), "a refused config left a run directory behind"


@pytest.mark.slow
def test_missing_dataset_is_a_clear_error(runs):
    user_error(runs.result("missing-data"), str(runs.root / "no-such-dataset"), "schema.json")


@pytest.mark.slow
def test_corrupt_checkpoint_is_an_error_never_a_silent_restart(runs):
    proc, info = runs.result("corrupt")
    user_error(proc, "corrupt", str(info["latest"]))
    assert checkpoint_steps(info["dir"]) == info["checkpoints"]
    assert (info["dir"] / "metrics.jsonl").read_text() == info["metrics"], "it trained after all"
    assert "training:" not in proc.stderr


@pytest.mark.slow
def test_checkpoint_without_meta_is_refused_as_incomplete(runs):
    proc, info = runs.result("no-meta")
    user_error(proc, "incomplete", "meta.json", str(info["ckpt"]))


@pytest.mark.parametrize("change", ["dataset", "embedding.scale"])
@pytest.mark.slow
def test_resume_into_another_model_or_dataset_is_refused(change, runs, stopped):
    proc, info = runs.result(f"mismatch-{change}")
    message = user_error(proc, "written for another model or dataset", f"step-{STOP_AT:08d}")
    if change == "dataset":
        assert "cardinalities" in message
    else:
        assert "'scale': 2" in message and "'scale': 3" in message
    assert (info["dir"] / "config.yaml").read_text() == info["config"], "a refused resume rewrote config.yaml"
    assert (info["dir"] / "plan.txt").read_text() == info["plan"], "a refused resume rewrote plan.txt"
    assert checkpoint_steps(info["dir"]) == checkpoint_steps(stopped)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(runs, stopped, tmp_path):
    """Resumed at step 30 with an absurd dense lr: the loss is NaN/inf by step 32, and the run
    stops before the checkpoint due at 32, naming the last good one (30), which stays."""
    proc, info = runs.result("nan")
    run_dir = info["dir"]
    message = user_error(proc, "NaN/inf", "by step 32", "last good checkpoint", f"step-{STOP_AT:08d}", "optim.dense_lr")
    assert message.count("error:") == 1
    assert checkpoint_steps(run_dir) == info["checkpoints"], f"a checkpoint was written after the blow-up: {checkpoint_steps(run_dir)}"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert (run_dir / "summary.json").read_text() == (stopped / "summary.json").read_text(), "no summary of a failed run"
    tensors = load_checkpoint_tensors(ckpt_path(run_dir, STOP_AT), tmp_path)
    assert all(torch.isfinite(v).all() for v in tensors.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


@pytest.mark.slow
def test_checkpoint_refuses_non_finite_weights(tiny_dataset, tmp_path):
    """A blow-up can leave NaN/inf weights after a step whose loss was finite: save() must
    refuse them (in-process: NaN one fused table shard, then one dense weight)."""
    from trainer.job_config import load_config
    from trainer.dist_context import init_distributed, shutdown
    from trainer.errors import UserError
    from trainer.run_dir import RunDir
    from trainer.sharding import local_table_windows
    from trainer.train import Trainer

    run_dir = RunDir(str(tmp_path / "run"))
    config = load_config(None, [*TINY, f"data.path={tiny_dataset}", f"run.dir={run_dir.url}"])
    owned = not torch.distributed.is_initialized()
    ctx = init_distributed("cpu")
    try:
        run_dir.create()
        trainer = Trainer(config, ctx, run_dir)
        trainer.save()  # finite weights: saved
        assert checkpoint_steps(tmp_path / "run") == [0]
        table = next(w for t, w, _, _ in local_table_windows(trainer.model) if t.field == "C3")
        dense = next(p for name, p in trainer.model.named_parameters() if "tail" in name and p.is_floating_point())
        for weight in (table, dense):
            saved = weight.detach().clone()
            with torch.no_grad():
                weight.view(-1)[0] = float("nan") if weight is table else float("inf")
            trainer.progress.step += 1
            with pytest.raises(UserError, match=r"weights became NaN/inf by step \d+.*last good checkpoint is .*step-00000000"):
                trainer.save()
            with torch.no_grad():
                weight.copy_(saved)
        assert checkpoint_steps(tmp_path / "run") == [0]
        trainer.save()  # finite again: saved
        assert checkpoint_steps(tmp_path / "run")[-1] == trainer.progress.step
    finally:
        if owned:
            shutdown()
