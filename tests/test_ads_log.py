"""The ads-log example ("your own data") end to end: raw daily Parquet files -> the shipped
spec (configs/datasets/ads_log.yaml) -> a trained model that learns from the multi-hot
history field -> an exported artifact that scores the raw test day exactly as the trainer
did (1e-5), with collapse monitored on the multi-hot run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.helpers import PYTHON, ROOT, ok, run
from trainer.data.loader import CTRDataLoader, LoaderConfig
from trainer.data.preprocess import PreprocessConfig, preprocess
from trainer.data.synthetic_ads_log import AdsLogConfig, AdsLogModel, generate_ads_log
from trainer.errors import UserError
from trainer.eval_metrics import auc
from trainer.job_config import EmbeddingConfig, ModelConfig
from trainer.model import MultiEmbeddingCTR

SPEC = ROOT / "configs" / "datasets" / "ads_log.yaml"
ROWS = 21_000  # 3,000 a day: days 1-5 train, 6 val, 7 test
SCALE = 0.005  # 100 users, 250 items: a few thousand rows learn their weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ads(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ads_log")
    report = generate_ads_log(AdsLogConfig(rows=ROWS, cardinality_scale=SCALE), str(root / "raw"))
    schema = preprocess(PreprocessConfig(spec=str(SPEC), input=str(root / "raw" / "*.parquet"), output=str(root / "data"),
                                         progress=False))
    return {"root": root, "report": report, "schema": schema, "data": str(root / "data")}


def test_the_spec_makes_a_time_split_with_a_multi_hot_hashed_and_bucketed_field(ads):
    schema, days = ads["schema"], ads["report"]["days"]
    assert all(d["oracle_auc"] > d["oracle_auc_without_history"] + 0.1 for d in days)  # the planted history term
    assert {s: schema.splits[s].rows for s in ("train", "val", "test")} == {
        "train": sum(d["rows"] for d in days[:5]), "val": days[5]["rows"], "test": days[6]["rows"]}
    fields = {f.name: f for f in schema.sparse_fields}
    assert (fields["history"].max_length, fields["history"].pooling) == (20, "mean")
    assert fields["item_id"].cardinality == 50_000 + 2 and fields["price"].cardinality <= 8 + 2
    lengths = pq.read_table(Path(ads["data"]) / schema.splits["test"].files[0], columns=["history"])["history"]
    assert max(len(v) for v in lengths.to_pylist()) == 20  # the raw lists go up to 30: truncated


def test_the_generator_is_deterministic_day_by_day(tmp_path):
    config = AdsLogConfig(rows=700, days=2, cardinality_scale=SCALE)
    reports = [generate_ads_log(config, str(tmp_path / name)) for name in ("a", "b")]
    for day in reports[0]["days"]:
        assert (tmp_path / "a" / day["file"]).read_bytes() == (tmp_path / "b" / day["file"]).read_bytes()
    table = pq.read_table(tmp_path / "a" / reports[0]["days"][0]["file"])
    history = table.schema.field("history").type
    assert table.num_rows == 350 and pa.types.is_list(history) and pa.types.is_int32(history.value_type)
    assert max(len(h) for h in table["history"].to_pylist()) <= 30 and table["hour"].to_numpy()[[0, -1]].tolist() == [
        2026010100, 2026010123]


def test_the_planted_history_term_is_the_mean_pooled_inner_product():
    model = AdsLogModel(AdsLogConfig(rows=100))
    drawn = model.sample((1, 0), 400, np.full(400, 2026010112))
    history, category = drawn["columns"]["history"].to_pylist(), drawn["columns"]["item_category"]
    assert sum(not h for h in history) > 5  # rows without history among them
    for i, h in enumerate(history):
        pooled = model.latent[h].mean(axis=0) if h else np.zeros(model.latent.shape[1])
        term = model.config.history_weight * pooled @ model.latent[category[i]]
        assert drawn["logit"][i] - drawn["logit_without_history"][i] == pytest.approx(term, abs=1e-9)


def _train_and_test(data: str, fields: list[str]) -> float:
    """Test AUC of a small IPNN (ME 2 x 4) trained 2 epochs in process on ``fields`` only (the
    others dropped from the batches): the planted history term is an inner product, which
    IPNN's pairwise products learn from a few thousand rows."""
    schema = CTRDataLoader(data, "test", LoaderConfig(batch_size=512)).schema
    model = MultiEmbeddingCTR.from_config([f for f in schema.sparse_fields if f.name in fields],
                                          ModelConfig("ipnn", hidden=32, dropout=0.0), EmbeddingConfig("me", 2, 4), seed=0)

    def batches(split: str, shuffle: bool, epoch: int = 0):
        loader = CTRDataLoader(data, split, LoaderConfig(batch_size=512, shuffle=shuffle, prefetch=False))
        loader.set_epoch(epoch)
        for b in loader:
            yield KeyedJaggedTensor.from_jt_dict({f: b.sparse_features[f] for f in fields}), b.labels

    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for epoch in range(2):
        for kjt, labels in batches("train", True, epoch):
            loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scored = [(model(kjt), labels) for kjt, labels in batches("test", False)]
    return auc(torch.cat([s for s, _ in scored]).numpy(), torch.cat([y for _, y in scored]).numpy())


@pytest.mark.slow
def test_a_model_learns_from_the_history_field(ads):
    every = [f.name for f in ads["schema"].sparse_fields]
    with_history = _train_and_test(ads["data"], every)
    without = _train_and_test(ads["data"], [f for f in every if f != "history"])
    oracle = ads["report"]["days"][6]
    print(f"test AUC with history {with_history:.4f}, without {without:.4f}; oracle {oracle['oracle_auc']:.4f} "
          f"({oracle['oracle_auc_without_history']:.4f} without the history term)")
    assert without + 0.03 < with_history < oracle["oracle_auc"]


@pytest.mark.slow
def test_trained_exported_artifact_scores_the_raw_test_day_like_the_trainer(ads, tmp_path):
    from trainer import predict
    from trainer.export.artifact import ExportConfig, export_artifact

    run_dir = tmp_path / "run"  # the README's configs/ads_log_me.yaml, smaller and one epoch
    ok(run([PYTHON, "-m", "trainer.main", "--config", "configs/ads_log_me.yaml", "--set", f"data.path={ads['data']}",
            f"run.dir={run_dir}", "train.epochs=1", "model.hidden=16", "embedding.base_dim=4",
            "monitoring.collapse_every_steps=10"], timeout=300))
    collapse = [json.loads(line) for line in (run_dir / "collapse.jsonl").read_text().splitlines()]
    history = collapse[-1]["fields"]["history"]
    assert len(history["set_ia"]) == 2 and 1 <= history["overall_ia"] <= 8 and 0 < history["diversity"] <= 1
    meta = json.loads(next(iter(sorted((run_dir / "checkpoints").iterdir()))).joinpath("meta.json").read_text())
    assert meta["identity"]["pooling"] == {"history": "mean"}
    assert meta["dataset"]["schema"]["recipe"]["spec"]["name"] == "ads_log"  # the checkpoint records the spec

    artifact = tmp_path / "artifact"
    card = export_artifact(ExportConfig(str(run_dir), str(artifact)))
    assert card["inputs"]["max_lengths"] == [1, 1, 1, 20, 1]
    assert 1 <= card["collapse"]["fields"]["history"]["ia"] <= 8  # the offline monitor's numbers, at export
    assert card["data"]["recipe"]["spec"]["split"]["kind"] == "time"
    reference = pq.read_table(run_dir / "test_predictions.parquet")
    expected = 1.0 / (1.0 + np.exp(-reference["logit"].to_numpy().astype(np.float64)))
    test_day = ads["root"] / "raw" / ads["report"]["days"][6]["file"]  # the time split's test rows, in file order
    scores = tmp_path / "scores.csv"
    predict.main(["--artifact", str(artifact), "--input", str(test_day), "--output", str(scores), "--batch-rows", "700"])
    lines = scores.read_text().splitlines()
    assert len(lines) == len(expected) + 1 and lines[0] == "row,probability,label"
    got = np.array([float(line.split(",")[1]) for line in lines[1:]])
    np.testing.assert_array_equal([int(line.split(",")[2]) for line in lines[1:]], reference["label"].to_numpy())
    assert np.abs(got - expected).max() <= 1e-5
    lacking = tmp_path / "lacking.parquet"
    pq.write_table(pq.read_table(test_day).drop_columns(["history"]), lacking)
    with pytest.raises(UserError, match=r"lacking.parquet: no column\(s\) \['history'\] of the model's fields; the file has"):
        predict.main(["--artifact", str(artifact), "--input", str(lacking), "--output", str(tmp_path / "x.csv")])
    assert not (tmp_path / "x.csv").exists()
