"""The synthetic generator: determinism, the raw Criteo format, the prepared
dataset layout, the planted model and its oracle metrics, CLI errors, memory."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT
from trainer.data import synthetic
from trainer.data.schema import MISSING_ID, SPLITS, read_schema
from trainer.data.splits import assign_splits, parse_split
from trainer.data.synthetic import (
    CATEGORICAL_FIELDS,
    CATEGORICAL_MISSING,
    FIELDS,
    INTEGER_FIELDS,
    LOW_RANK_FIELDS,
    MAX_INTEGER,
    PAIRS,
    TSV_SCHEMA,
    PlantedModel,
    SyntheticConfig,
    generate,
)
from trainer.data.transforms import criteo_integer_token
from trainer.errors import run_cli


def _read_tsv(path: Path) -> pa.Table:
    """Strict parse: exactly the 40 typed columns of TSV_SCHEMA, empty cell = null."""
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=TSV_SCHEMA.names),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=TSV_SCHEMA, strings_can_be_null=True),
    )


def _exact_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    pos = int(labels.sum())
    neg = len(labels) - pos
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


@pytest.fixture(scope="module")
def tsv_run(tmp_path_factory):
    """50k rows of criteo-tsv at default settings: (data path, report)."""
    path = tmp_path_factory.mktemp("tsv") / "synth.tsv"
    report = generate(SyntheticConfig(rows=50_000), str(path), "criteo-tsv", progress=False)
    return path, report


def test_output_is_deterministic_and_prefix_stable(tmp_path):
    def run(name: str, rows: int, seed: int = 0) -> Path:
        path = tmp_path / name
        generate(SyntheticConfig(rows=rows, seed=seed, chunk_rows=1000), str(path), "criteo-tsv", progress=False)
        return path

    a, again, other, longer = run("a.tsv", 2500), run("b.tsv", 2500), run("c.tsv", 2500, seed=1), run("d.tsv", 4200)
    assert a.read_bytes() == again.read_bytes()
    assert a.read_bytes() != other.read_bytes()
    lines = a.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2500
    assert longer.read_bytes().splitlines(keepends=True)[:2500] == lines, "rows must not depend on --rows"
    p_short = pq.read_table(f"{a}.truth.parquet").column("p_true").to_numpy()
    p_long = pq.read_table(f"{longer}.truth.parquet").column("p_true").to_numpy()
    np.testing.assert_array_equal(p_long[:2500], p_short)

    compressed = tmp_path / "a.tsv.gz"
    generate(SyntheticConfig(rows=2500, chunk_rows=1000), str(compressed), "criteo-tsv", progress=False)
    assert compressed.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(compressed.read_bytes()) == a.read_bytes()


def test_tsv_is_raw_criteo_format(tsv_run):
    path, _ = tsv_run
    raw = path.read_bytes().splitlines()
    assert all(line.count(b"\t") == 39 for line in raw[:2000])
    table = _read_tsv(path)
    assert table.num_rows == 50_000 and table.num_columns == 40
    assert set(np.unique(table.column("label").to_numpy())) == {0, 1}

    ints = [table.column(f) for f in INTEGER_FIELDS]
    values = np.concatenate([c.drop_null().to_numpy() for c in ints])
    assert values.min() >= 0 and values.max() <= MAX_INTEGER
    assert values.max() > 100_000, "integer features should be heavy-tailed"
    missing = sum(c.null_count for c in ints) / (table.num_rows * len(ints))
    assert 0.15 < missing < 0.25

    hex8 = re.compile(r"^[0-9a-f]{8}$")
    for f, rate in zip(CATEGORICAL_FIELDS, CATEGORICAL_MISSING):
        column = table.column(f)
        assert abs(column.null_count / table.num_rows - rate) < 0.02, f
        assert all(hex8.match(v) for v in column.drop_null().unique().to_pylist()[:500]), f


def test_categorical_ids_are_zipf_skewed(tsv_run):
    table = _read_tsv(tsv_run[0])
    counts = np.array(table.column("C3").drop_null().value_counts().field("counts"))
    assert counts.max() > 100 * np.median(counts), "the top id should dominate a Zipf field"
    assert len(counts) > 5_000, "a 10M-id field should show a long tail"


def test_oracle_metrics_match_exact_computation(tsv_run):
    path, report = tsv_run
    labels = _read_tsv(path).column("label").to_numpy()
    p_true = pq.read_table(f"{path}.truth.parquet").column("p_true").to_numpy()
    assert len(p_true) == len(labels)
    split = assign_splits(np.arange(len(labels), dtype=np.int64), parse_split("8,1,1"), 0)
    for s, name in enumerate(SPLITS):
        y, p = labels[split == s], p_true[split == s].astype(np.float64)
        oracle = report["oracle"][name]
        assert oracle["rows"] == len(y) and oracle["positives"] == int(y.sum())
        assert oracle["auc"] == pytest.approx(_exact_auc(y, p), abs=1e-4), name
        logloss = -np.mean(np.where(y == 1, np.log(p), np.log1p(-p)))
        assert oracle["logloss"] == pytest.approx(logloss, abs=1e-4), name
    ctr, mean_p = labels.mean(), p_true.mean()
    assert report["ctr"] == pytest.approx(ctr)
    assert abs(ctr - mean_p) < 4 * np.sqrt(mean_p * (1 - mean_p) / len(labels)), "labels must be Bernoulli(p_true)"
    assert 0.2 < ctr < 0.3


def test_interactions_carry_a_real_share_of_the_signal(tsv_run):
    _, report = tsv_run
    for name in ("train", "test"):
        oracle = report["oracle"][name]
        assert 0.75 < oracle["auc"] < 0.86, name
        assert oracle["auc"] - oracle["first_order_auc"] > 0.05, name


def test_planted_model_has_the_stated_low_rank_fields():
    model = PlantedModel(SyntheticConfig(rows=1, cardinality_scale=0.01))
    d = model.config.latent_dim
    for f in FIELDS:
        table = model.latents[f]
        assert table.shape == (model.table_rows[f], d)
        expected = LOW_RANK_FIELDS.get(f, min(model.table_rows[f], d))
        assert model.ranks[f] == expected
        assert np.linalg.matrix_rank(table.astype(np.float64), tol=1e-4) == expected, f
    assert all(r < d for r in (model.ranks[f] for f in LOW_RANK_FIELDS))
    low_rank_pairs = [p for p in PAIRS if set(p) & set(LOW_RANK_FIELDS)]
    assert len(low_rank_pairs) >= 5
    description = model.describe()
    assert description["low_rank_fields"] == LOW_RANK_FIELDS
    assert description["pairs"] == [list(p) for p in PAIRS]

    same = PlantedModel(SyntheticConfig(rows=1, cardinality_scale=0.01))
    other = PlantedModel(SyntheticConfig(rows=1, cardinality_scale=0.01, seed=7))
    assert np.array_equal(same.latents["C3"], model.latents["C3"]) and same.bias == model.bias
    assert not np.array_equal(other.latents["C3"], model.latents["C3"])


def test_parquet_dataset_matches_the_tsv_rows(tmp_path):
    # one chunk: each split's rows land in order in its first part file
    config = SyntheticConfig(rows=3000, cardinality_scale=0.01)
    root = tmp_path / "ds"
    report = generate(config, str(root), "parquet", progress=False)
    tsv_report = generate(config, str(tmp_path / "same.tsv"), "criteo-tsv", progress=False)
    assert report["oracle"] == tsv_report["oracle"]

    schema = read_schema(str(root))
    assert schema.dataset == "synthetic" and schema.field_names == list(FIELDS)
    assert schema.dense_fields == list(INTEGER_FIELDS) and schema.extra_columns == ["p_true"]
    assert schema.recipe["oracle"] == report["oracle"] and schema.recipe["model"]["pairs"]
    assert sum(info.rows for info in schema.splits.values()) == 3000

    tsv = _read_tsv(tmp_path / "same.tsv")
    truth = pq.read_table(tmp_path / "same.tsv.truth.parquet").column("p_true").to_numpy()
    split = assign_splits(np.arange(3000, dtype=np.int64), parse_split(config.split), config.split_seed)
    for s, name in enumerate(SPLITS):
        info = schema.splits[name]
        parts = [pq.read_table(root / f) for f in info.files]
        assert sum(p.num_rows for p in parts) == info.rows == report["oracle"][name]["rows"]
        data, rows = parts[0], split == s
        assert data.num_rows == info.rows
        np.testing.assert_array_equal(data.column("label").to_numpy(), tsv.column("label").to_numpy()[rows])
        np.testing.assert_array_equal(data.column("p_true").to_numpy(), truth[rows])
        dense = np.stack(data.column("dense").to_numpy(zero_copy_only=False))
        for j, f in enumerate(INTEGER_FIELDS):
            raw = tsv.column(f).filter(pa.array(rows))
            missing = raw.is_null().to_numpy(zero_copy_only=False)
            values = raw.fill_null(0).to_numpy()
            ids = data.column(f).to_numpy()
            expected = np.where(missing, MISSING_ID, criteo_integer_token(values) - criteo_integer_token(np.zeros(1))[0] + 2)
            np.testing.assert_array_equal(ids, expected, err_msg=f)
            assert ids.max() < schema.cardinality(f)
            np.testing.assert_allclose(dense[:, j], np.where(missing, 0.0, np.log1p(values)), rtol=1e-6)
        for f in CATEGORICAL_FIELDS:
            raw = tsv.column(f).filter(pa.array(rows)).to_numpy(zero_copy_only=False)
            ids = data.column(f).to_numpy()
            assert ids.min() >= 1 and ids.max() < schema.cardinality(f), f
            np.testing.assert_array_equal(ids == MISSING_ID, raw == None)  # noqa: E711
            pairs = set(zip(ids[ids != MISSING_ID].tolist(), raw[ids != MISSING_ID].tolist()))
            assert len(pairs) == len({i for i, _ in pairs}) == len({h for _, h in pairs}), f"{f}: id <-> hash not 1:1"


def test_failed_run_leaves_no_outputs(tmp_path, monkeypatch):
    def crash(rows):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_tsv_table", crash)
    with pytest.raises(RuntimeError):
        generate(SyntheticConfig(rows=100), str(tmp_path / "x.tsv"), "criteo-tsv", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows", "0"], "--rows must be positive"),
        (["--rows", "10", "--cardinality-scale", "0"], "--cardinality-scale must be positive"),
        (["--rows", "10", "--split", "8,1"], "--split must be"),
        (["--rows", "10", "--seed", "-1"], "must be non-negative"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(synthetic.main, [*args, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_unknown_format_by_its_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(synthetic.main, ["--rows", "10", "--format", "csv", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'csv'" in err and "criteo-tsv" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_output_unless_overwrite(tmp_path, capsys):
    for fmt, out in (("criteo-tsv", tmp_path / "x.tsv"), ("parquet", tmp_path / "ds")):
        argv = ["--rows", "200", "--format", fmt, "--output", str(out)]
        run_cli(synthetic.main, argv)
        assert "oracle on test" in capsys.readouterr().out
        with pytest.raises(SystemExit) as exit_info:
            run_cli(synthetic.main, argv)
        assert exit_info.value.code == 2
        assert "already exists" in capsys.readouterr().err
        run_cli(synthetic.main, [*argv, "--overwrite"])
    assert json.loads((tmp_path / "x.tsv.oracle.json").read_text())["rows"] == 200
    assert read_schema(str(tmp_path / "ds")).recipe["rows"] == 200


_PEAK_RSS = """
import resource, sys
from trainer.data.synthetic import SyntheticConfig, generate
generate(SyntheticConfig(rows=int(sys.argv[1]), chunk_rows=16384), sys.argv[2], "criteo-tsv", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_rows(tmp_path):
    def peak_kib(rows: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(rows), str(tmp_path / f"{rows}.tsv")],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(out.stdout.split()[-1])

    small, large = peak_kib(50_000), peak_kib(500_000)
    # 450k more rows held in memory would cost several hundred MiB
    assert large < small + 40 * 1024, (small, large)


def test_module_entry_point(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "trainer.data.synthetic", "--rows", "300", "--format", "criteo-tsv", "--output", str(tmp_path / "s.tsv")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "oracle on test" in out.stdout and "rows/s" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "trainer.data.synthetic", "--rows", "-5", "--output", str(tmp_path / "t")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "error: --rows must be positive" in bad.stderr and "Traceback" not in bad.stderr
