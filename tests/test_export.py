"""Serving export: artifacts from 2-rank checkpoints, parity with the trainer's own test
predictions on raw rows, int8, a fresh process without the trainer package, and the
refusals (tampered artifacts, wrong checkpoints, datasets and rows).

One raw synthetic Criteo TSV is preprocessed; DCNv2 and DNN, SE and ME, each train one
epoch on 2 gloo ranks (torchrun), and write their test predictions
(``test_predictions.parquet``), which are the reference here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import PYTHON, Launcher, ok, run, torchrun, user_error
from trainer.data.splits import TEST, assign_splits
from trainer.data.transforms import criteo_integer_token
from trainer.errors import UserError
from trainer.export.artifact import ExportConfig, export_artifact
from trainer.export.feature_spec import integer_token_thresholds
from trainer.export.runtime import ArtifactError, Predictor, check_no_pickles
from trainer.export.serving_model import quantize_rowwise

RAW_ROWS = 12000
MODELS = [("dcnv2", "me"), ("dcnv2", "se"), ("dnn", "me"), ("dnn", "se")]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict:
    """The raw TSV, its preprocessed dataset and its test rows (split by the preprocessor's rule)."""
    root = tmp_path_factory.mktemp("export_data")
    tsv, data = root / "raw.tsv", root / "data"
    ok(run([PYTHON, "-m", "trainer.data.synthetic", "--rows", str(RAW_ROWS), "--cardinality-scale", "0.001",
            "--format", "criteo-tsv", "--output", str(tsv)]))
    ok(run([PYTHON, "-m", "trainer.data.preprocess", "--dataset", "criteo", "--input", str(tsv), "--output", str(data),
            "--min-count", "2", "--no-progress"]))
    lines = tsv.read_text().splitlines()
    split = assign_splits(np.arange(len(lines)), (0.8, 0.1, 0.1), 0)
    test_rows = [line.split("\t") for line, s in zip(lines, split) if s == TEST]
    return {"tsv": tsv, "data": data, "test_rows": test_rows, "root": root}


@pytest.fixture(scope="module")
def runs(raw, tmp_path_factory) -> dict:
    """(model, mode) -> run directory of a 1-epoch, 2-rank run at scale 2."""
    root = tmp_path_factory.mktemp("export_runs")
    launcher = Launcher()
    for name, mode in MODELS:
        launcher.submit(
            (name, mode), torchrun, f"data.path={raw['data']}", f"run.dir={root / f'{name}_{mode}'}",
            f"model.name={name}", f"embedding.mode={mode}", "train.epochs=1",
        )
    try:
        for key in MODELS:
            ok(launcher.result(key))
    finally:
        launcher.close()
    return {key: root / f"{key[0]}_{key[1]}" for key in MODELS}


@pytest.fixture(scope="module")
def artifacts(runs, tmp_path_factory) -> dict:
    """(model, mode) -> fp32 artifact exported in-process from the run directory."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for key, run_dir in runs.items():
        out[key] = root / f"{key[0]}_{key[1]}"
        export_artifact(ExportConfig(str(run_dir), str(out[key])))
    return out


def trainer_test_probabilities(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(run_dir / "test_predictions.parquet")
    logits = table["logit"].to_numpy().astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logits)), table["label"].to_numpy()


@pytest.mark.parametrize("key", MODELS, ids=[f"{n}-{m}" for n, m in MODELS])
@pytest.mark.slow
def test_artifact_scores_raw_test_rows_like_the_trainers_own_evaluation(key, raw, runs, artifacts):
    reference, labels = trainer_test_probabilities(runs[key])
    rows = raw["test_rows"]
    assert len(rows) == len(reference) > 500
    assert np.array_equal(labels, [int(r[0]) for r in rows]), "the trainer's test order is not the raw file's"
    predictor = Predictor(artifacts[key])
    scores = predictor.predict_rows(rows, labeled=True).numpy()
    assert np.abs(scores - reference).max() <= 1e-5
    unlabeled = predictor.predict_rows([r[1:] for r in rows]).numpy()  # Criteo's test layout: no label column
    assert np.array_equal(unlabeled, scores)
    card = json.loads((artifacts[key] / "model_card.json").read_text())
    summary = json.loads((runs[key] / "summary.json").read_text())
    assert card["metrics"]["trainer"]["test_auc"] == summary["test_auc"]
    assert abs(card["metrics"]["export_test"]["fp32_auc"] - summary["test_auc"]) < 1e-6
    assert card["source"]["world_size"] == 2
    assert card["embedding"]["num_sets"] == (2 if key[1] == "me" else 1)


@pytest.mark.slow
def test_cli_int8_artifact_scores_in_a_fresh_process_without_the_trainer(raw, runs, artifacts, tmp_path):
    run_dir = runs[("dcnv2", "me")]
    out = tmp_path / "int8"
    proc = ok(run([PYTHON, "-m", "trainer.export", "--checkpoint", str(run_dir), "--output", str(out),
                   "--quantize", "int8"], timeout=180))
    assert "int8" in proc.stdout
    card = json.loads((out / "model_card.json").read_text())
    q, ev = card["quantization"], card["metrics"]["export_test"]
    values = sum(c for _, c in card["data"]["fields"]) * card["embedding"]["num_sets"] * card["embedding"]["dim"]
    assert q["mode"] == "int8" and q["fp32_table_bytes"] == 4 * values
    assert q["table_bytes"] == values * (1 + 4 / card["embedding"]["dim"])  # a byte per value, fp16 scale + bias per K
    assert ev["auc_change"] >= -0.001 and ev["int8_auc"] == pytest.approx(ev["fp32_auc"], abs=0.001)
    from trainer.collapse.stored_tables import analyze_checkpoint

    offline = analyze_checkpoint(card["source"]["checkpoint"], progress=False).summary()  # the offline monitor's numbers
    assert card["collapse"]["mean_ia"] == pytest.approx(offline["mean_overall_ia"], rel=1e-9)
    assert set(json.loads((out / "MANIFEST.json").read_text())["files"]) >= {"program.pt2", "feature_spec.json", "predictor.py",
                                                                              "model_card.json", "model_card.md", "vocab/C1.json"}

    unlabeled = tmp_path / "test_unlabeled.tsv"
    unlabeled.write_text("".join("\t".join(r[1:]) + "\n" for r in raw["test_rows"]))
    scores = tmp_path / "scores.csv"
    script = f"""
import importlib.abc, sys
class Forbid(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("trainer", "torchrec", "fbgemm_gpu", "pyarrow"):
            raise ImportError("the artifact must not need " + name)
sys.meta_path.insert(0, Forbid())
sys.path.insert(0, {str(out)!r})
from predictor import Predictor
n = Predictor({str(out)!r}).score_file({str(unlabeled)!r}, {str(scores)!r}, batch_rows=500, labeled=False)
print("scored", n)
"""
    proc = subprocess.run([PYTHON, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"scored {len(raw['test_rows'])}" in proc.stdout
    lines = scores.read_text().splitlines()
    assert lines[0] == "row,probability" and len(lines) == len(raw["test_rows"]) + 1
    fresh = np.array([float(line.split(",")[1]) for line in lines[1:]])
    fp32 = Predictor(artifacts[("dcnv2", "me")]).predict_rows(raw["test_rows"], labeled=True).numpy()
    assert np.abs(fresh - fp32).max() < 0.02  # int8 tables: close to fp32, not equal
    assert np.abs(fresh - fp32).max() > 0

    # the gate: a zero tolerance refuses exactly when int8 lost AUC, and then writes nothing
    gated = tmp_path / "gated"
    config = ExportConfig(str(run_dir), str(gated), quantize="int8", max_auc_drop=0.0)
    if ev["auc_change"] < 0:
        with pytest.raises(UserError, match="loses"):
            export_artifact(config)
        assert not gated.exists() and not list(tmp_path.glob("gated.tmp-*"))
    else:
        export_artifact(config)
        assert (gated / "MANIFEST.json").exists()


@pytest.mark.slow
def test_predict_cli_writes_probabilities_with_labels(raw, artifacts, tmp_path):
    out = tmp_path / "scores.csv"
    proc = ok(run([PYTHON, "-m", "trainer.predict", "--artifact", str(artifacts[("dnn", "me")]), "--input", str(raw["tsv"]),
                   "--output", str(out), "--labeled"]))
    assert f"scored {RAW_ROWS} rows" in proc.stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "row,probability,label" and len(lines) == RAW_ROWS + 1
    p = np.array([float(line.split(",")[1]) for line in lines[1:]])
    assert ((p > 0) & (p < 1)).all() and p.std() > 0.01


@pytest.mark.slow
def test_dynamic_batch_sizes(artifacts, raw):
    predictor = Predictor(artifacts[("dcnv2", "se")])
    rows = raw["test_rows"]
    all_at_once = predictor.predict_rows(rows[:513], labeled=True).numpy()
    one_by_one = np.concatenate([predictor.predict_rows([r], labeled=True).numpy() for r in rows[:5]])
    assert all_at_once.shape == (513,)
    np.testing.assert_allclose(one_by_one, all_at_once[:5], atol=1e-6)


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_tampered_or_incomplete_artifacts_are_refused(artifacts, tmp_path):
    src = artifacts[("dnn", "se")]
    changed = copy_artifact(src, tmp_path / "changed")
    vocab = changed / "vocab" / "C3.json"
    vocab.write_text(vocab.read_text().replace('"', "'", 2))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Predictor(changed)

    truncated = copy_artifact(src, tmp_path / "truncated")
    program = truncated / "program.pt2"
    program.write_bytes(program.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Predictor(truncated)

    extra = copy_artifact(src, tmp_path / "extra")
    (extra / "vocab" / "evil.json").write_text("[]")
    with pytest.raises(ArtifactError, match="not listed.*evil"):
        Predictor(extra)

    missing = copy_artifact(src, tmp_path / "missing")
    (missing / "MANIFEST.json").unlink()
    with pytest.raises(ArtifactError, match="no MANIFEST.json"):
        Predictor(missing)
    with pytest.raises(ArtifactError, match="not found"):
        Predictor(tmp_path / "nowhere")


@pytest.mark.slow
def test_program_with_pickled_tensors_is_refused(artifacts, tmp_path):
    original = artifacts[("dnn", "se")] / "program.pt2"
    check_no_pickles(original)  # ours has none
    forged = tmp_path / "forged.pt2"
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(forged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ArtifactError, match="stored as a pickle"):
        check_no_pickles(forged)


@pytest.mark.slow
def test_bad_rows_and_ids_are_clear_errors(artifacts, raw, tmp_path):
    predictor = Predictor(artifacts[("dcnv2", "me")])
    row = list(raw["test_rows"][0])
    with pytest.raises(ArtifactError, match=r"expected 40 columns \(with label\), got 38"):
        predictor.predict_rows([row[:38]], labeled=True)
    with pytest.raises(ArtifactError, match=r"expected 39 columns \(without label\), got 38"):
        predictor.predict_rows([row[:38]])
    bad = list(row)
    bad[3] = "abc"  # I3
    with pytest.raises(ArtifactError, match=r"row:2: I3 'abc' is not an integer"):
        predictor.predict_rows([row, bad], labeled=True)
    with pytest.raises(ArtifactError, match=r"row:2: expected 40 columns \(with label\), got 39 \(39 is the width without"):
        predictor.predict_rows([row, row[1:]], labeled=True)
    ids = torch.zeros(2, 39, dtype=torch.int64)
    ids[1, 20] = 10**6
    with pytest.raises(ArtifactError, match=r"ids\[1, 20\] = 1000000: outside"):
        predictor.predict_ids(ids)
    file = tmp_path / "bad.tsv"
    file.write_text("\t".join(row) + "\n" + "\t".join(bad) + "\n")
    proc = run([PYTHON, "-m", "trainer.predict", "--artifact", str(artifacts[("dcnv2", "me")]), "--input", str(file),
                "--output", str(tmp_path / "out.csv"), "--labeled"])
    user_error(proc, f"{file}:2", "I3 'abc' is not an integer")
    assert not (tmp_path / "out.csv").exists() and not list(tmp_path.glob(".out.csv.tmp-*"))
    with pytest.raises(ArtifactError, match="its directory .* does not exist"):
        predictor.score_file(file, tmp_path / "missing_dir" / "out.csv")


@pytest.mark.slow
def test_predict_knows_the_layout_and_never_overwrites(artifacts, raw, tmp_path):
    """A labelled Criteo file whose rows all lost one column is as wide as an unlabelled one:
    it must be refused, not scored with every feature shifted. The layout is stated, never
    guessed; an existing output is kept unless --overwrite."""
    artifact = str(artifacts[("dnn", "me")])
    shifted = tmp_path / "shifted.tsv"  # label kept, I13 dropped: 39 columns, like an unlabelled row
    shifted.write_text("".join("\t".join(r[:13] + r[14:]) + "\n" for r in raw["test_rows"][:20]))
    out = tmp_path / "scores.csv"

    def predict(*flags: str) -> subprocess.CompletedProcess:
        return run([PYTHON, "-m", "trainer.predict", "--artifact", artifact, "--input", str(shifted), "--output", str(out), *flags])

    user_error(predict(), "no header", "--labeled or --unlabeled")
    user_error(predict("--labeled"), f"{shifted}:1", "expected 40 columns (with label), got 39", "without the label")
    assert not out.exists()
    unlabeled = tmp_path / "unlabeled.tsv"
    unlabeled.write_text("".join("\t".join(r[1:]) + "\n" for r in raw["test_rows"][:20]))
    ok(run([PYTHON, "-m", "trainer.predict", "--artifact", artifact, "--input", str(unlabeled), "--output", str(out), "--unlabeled"]))
    first = out.read_text()
    assert first.splitlines()[0] == "row,probability" and len(first.splitlines()) == 21
    out.write_text("keep me\n")
    user_error(run([PYTHON, "-m", "trainer.predict", "--artifact", artifact, "--input", str(unlabeled), "--output", str(out),
                    "--unlabeled"]), "output already exists", str(out))
    assert out.read_text() == "keep me\n"
    ok(run([PYTHON, "-m", "trainer.predict", "--artifact", artifact, "--input", str(unlabeled), "--output", str(out),
            "--unlabeled", "--overwrite"]))
    assert out.read_text() == first


@pytest.mark.slow
def test_export_refuses_wrong_checkpoints_and_datasets(runs, raw, tmp_path):
    # a checkpoint whose tensors belong to another model than its meta.json says
    dnn_ckpt = sorted((runs[("dnn", "me")] / "checkpoints").iterdir())[-1]
    forged = tmp_path / "forged" / "checkpoints" / dnn_ckpt.name
    shutil.copytree(dnn_ckpt, forged)
    dcnv2_ckpt = sorted((runs[("dcnv2", "me")] / "checkpoints").iterdir())[-1]
    shutil.copy(dcnv2_ckpt / "meta.json", forged / "meta.json")
    with pytest.raises(UserError, match="does not match this model"):
        export_artifact(ExportConfig(str(forged), str(tmp_path / "a"), dataset=str(raw["data"])))

    with pytest.raises(UserError, match="checkpoint not found"):
        export_artifact(ExportConfig(str(tmp_path / "nowhere"), str(tmp_path / "b")))

    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(raw["data"], no_vocab)
    (no_vocab / "vocab" / "C7.parquet").unlink()
    proc = run([PYTHON, "-m", "trainer.export", "--checkpoint", str(runs[("dnn", "me")]), "--output", str(tmp_path / "c"),
                "--dataset", str(no_vocab)])
    user_error(proc, "missing vocabulary of C7", "C7.parquet")
    assert not (tmp_path / "c").exists()

    other = tmp_path / "other"
    ok(run([PYTHON, "-m", "trainer.data.synthetic", "--rows", "3000", "--cardinality-scale", "0.001", "--format", "parquet",
            "--output", str(other)]))
    with pytest.raises(UserError, match="other fields or vocabularies"):
        export_artifact(ExportConfig(str(runs[("dnn", "me")]), str(tmp_path / "d"), dataset=str(other)))

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError, match="already exists"):
        export_artifact(ExportConfig(str(runs[("dnn", "me")]), str(existing)))


def test_dataset_without_vocabularies_is_a_clear_error(tmp_path):
    from trainer.data.schema import read_schema
    from trainer.export.feature_spec import build_feature_spec

    data = tmp_path / "parquet_synthetic"
    ok(run([PYTHON, "-m", "trainer.data.synthetic", "--rows", "2000", "--cardinality-scale", "0.001", "--format", "parquet",
            "--output", str(data)]))
    schema = read_schema(str(data))
    with pytest.raises(UserError, match="without raw rows or vocabularies"):
        build_feature_spec(str(data), schema, schema.field_names)


def test_integer_thresholds_reproduce_the_preprocessor():
    thresholds = integer_token_thresholds()
    rng = np.random.default_rng(0)
    values = np.concatenate([np.arange(3, 200_000), rng.integers(3, 10**18, 20_000), np.array(thresholds), np.array(thresholds) - 1])
    values = values[values > 2]
    expected = criteo_integer_token(values)
    assert np.array_equal(np.searchsorted(np.array(thresholds), values, side="right"), expected)


def test_rowwise_int8_error_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 3 * 8, generator=g) * torch.logspace(-3, 3, 1000).unsqueeze(1)
    codes, scale, bias = quantize_rowwise(table, num_sets=3)
    assert codes.dtype == torch.uint8 and scale.shape == (1000, 3, 1)
    restored = codes.view(1000, 3, 8).float() * scale.float() + bias.float()
    error = (restored - table.view(1000, 3, 8)).abs()
    assert (error <= scale.float() * 0.5 + 1e-6 * table.abs().max()).all()


@pytest.mark.parametrize("name", ["dnn", "dcnv2", "ipnn", "nfwfm", "xdeepfm", "finalmlp", "autoint"])
@pytest.mark.parametrize("mode", ["se", "me"])
def test_every_model_exports_and_matches_its_eager_form(name, mode):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from trainer.data.schema import SparseField
    from trainer.export.serving_model import ServingModel, export_program
    from trainer.job_config import EmbeddingConfig, ModelConfig
    from trainer.model import MultiEmbeddingCTR

    fields = [SparseField(f"f{i}", 5 + 3 * i) for i in range(5)]
    model = MultiEmbeddingCTR.from_config(fields, ModelConfig(name=name, hidden=16), EmbeddingConfig(mode, 2, 4), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, f.cardinality, (7,), generator=g) for f in fields], dim=1)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in fields], values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )
    with torch.no_grad():
        eager = torch.sigmoid(model(kjt))
    program = export_program(ServingModel.from_model(model)).module()
    torch.testing.assert_close(program(ids), eager, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(program(ids[:1]), eager[:1], atol=1e-6, rtol=1e-5)
