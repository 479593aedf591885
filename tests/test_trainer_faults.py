"""The trainer on 2 real gloo ranks: a rank killed mid-epoch and restarted by torchrun ends
exactly where an uninterrupted run ends; a 2-rank checkpoint loads (resharded) into one
process; the torchx ``dist.ddp`` launch line from the README works.

Same tiny data and model as test_trainer.py (tests.helpers.TINY), 2 epochs of 10 steps
per rank.
"""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import (
    TINY,
    VENV_BIN,
    assert_same_tensors,
    checkpoint_steps,
    ckpt_path,
    load_checkpoint_tensors,
    metrics,
    ok,
    run,
    summary,
    torchrun,
    train,
)

pytestmark = pytest.mark.slow  # 2-rank torchrun and torchx runs

EPOCHS, CKPT_EVERY = 2, 4  # 2 ranks: 10 steps per epoch; checkpoints at 4, 8, 10, 12, 16, 20
# rank 1 dies after step 14, mid-epoch 1 and mid-segment: the latest checkpoint is step 12, so
# steps 13-14 are trained again after the restart
FAIL_AT, RESUME_AT = 14, 12


def _args(data, run_dir):
    return [f"data.path={data}", f"run.dir={run_dir}", f"train.epochs={EPOCHS}", f"train.checkpoint_every_steps={CKPT_EVERY}"]


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """An uninterrupted 2-rank run."""
    run_dir = tmp_path_factory.mktemp("ref2") / "run"
    ok(torchrun(*_args(tiny_dataset, run_dir)))
    return run_dir


def test_killed_rank_restarts_from_the_checkpoint_and_ends_identical(reference, tiny_dataset, tmp_path):
    ref = summary(reference)
    assert ref["world_size"] == 2 and ref["steps"] == 2 * 10
    run_dir = tmp_path / "run"
    proc = ok(torchrun(*_args(tiny_dataset, run_dir), max_restarts=1, CTR_FAIL_AT_STEP=str(FAIL_AT), CTR_FAIL_RANK="1"))
    out = proc.stdout + proc.stderr
    assert f"fault injection: rank 1 exits at step {FAIL_AT}" in out, "the fault was not injected"
    assert f"resumed from {run_dir}/checkpoints/step-{RESUME_AT:08d} at epoch 1, step {RESUME_AT}" in out, "not resumed"

    got = summary(run_dir)
    assert got["world_size"] == 2
    for key in ("test_auc", "test_logloss", "val_auc", "val_logloss"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    for key in ("steps", "best_step", "epochs_completed", "train_examples"):
        assert got[key] == ref[key], key
    ref_vals = [(r["step"], r["auc"]) for r in metrics(reference) if r["kind"] == "val"]
    got_vals = [(r["step"], r["auc"]) for r in metrics(run_dir) if r["kind"] == "val"]
    assert [s for s, _ in got_vals] == [s for s, _ in ref_vals]
    assert [a for _, a in got_vals] == pytest.approx([a for _, a in ref_vals], abs=1e-6)
    assert_same_tensors(
        load_checkpoint_tensors(ckpt_path(reference, 20), tmp_path),
        load_checkpoint_tensors(ckpt_path(run_dir, 20), tmp_path),
        what="step 20 after a restart",
    )


def test_two_rank_checkpoint_reshards_into_one_process(reference, tiny_dataset, tmp_path):
    ref_val = {r["step"]: r for r in metrics(reference) if r["kind"] == "val"}
    source = ckpt_path(reference, 20)
    one = tmp_path / "one"
    # max_steps = the checkpoint's step: load, evaluate, save; no training in between
    proc = ok(train(*_args(tiny_dataset, one), "train.max_steps=20", resume=str(source)))
    assert "resuming a 2-rank checkpoint on 1 ranks" in proc.stderr
    s = summary(one)
    assert s["world_size"] == 1 and s["steps"] == 20 and s["best_step"] == 20
    assert s["val_auc"] == pytest.approx(ref_val[20]["auc"], abs=1e-6)
    assert s["val_logloss"] == pytest.approx(ref_val[20]["logloss"], abs=1e-6)
    assert checkpoint_steps(one) == [20], "the loaded state is checkpointed in the new run directory"
    assert_same_tensors(
        load_checkpoint_tensors(source, tmp_path),
        load_checkpoint_tensors(ckpt_path(one, 20), tmp_path),
        atol=0.0,
        what="2-rank checkpoint loaded by 1 process",
    )

    # and training goes on from there, on one rank
    proc = ok(train(*_args(tiny_dataset, one), "train.epochs=3", "train.max_steps=24", resume="auto"))
    assert f"resumed from {one}/checkpoints/step-{20:08d}" in proc.stderr
    s = summary(one)
    assert s["world_size"] == 1 and s["steps"] == 24
    trained = [r for r in metrics(one) if r["kind"] == "train"]
    assert trained and trained[-1]["step"] == 24 and all(r["step"] > 20 for r in trained)
    assert 0.5 < s["val_auc"] <= 1.0


def test_torchx_dist_ddp_runs_two_ranks(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    sections: dict = {}
    for item in [*TINY, f"data.path={tiny_dataset}", f"run.dir={run_dir}"]:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    config.write_text(yaml.safe_dump(sections))
    proc = run(
        [str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "--script", "trainer/main.py",
         "--", "--config", str(config), "--set", "train.epochs=1", "train.max_steps=4", "train.log_every_steps=2"],
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SUCCEEDED" in out, out[-6000:]
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["steps"] == 4
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 4
