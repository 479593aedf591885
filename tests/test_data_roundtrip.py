"""The data path end to end: synthetic Criteo TSV -> preprocess -> loader on two ranks."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.loader import CTRDataLoader, LoaderConfig
from trainer.data.preprocess import PreprocessConfig, preprocess
from trainer.data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    raw = str(root / "synthetic.tsv")
    report = generate(SyntheticConfig(rows=20_000, cardinality_scale=0.001), raw, fmt="criteo-tsv", progress=False)
    schema = preprocess(PreprocessConfig(dataset="criteo", input=raw, output=str(root / "dataset"), progress=False))
    return report, schema, str(root / "dataset")


def test_preprocessed_splits_are_exactly_the_generators_splits(roundtrip):
    report, schema, _ = roundtrip
    assert schema.recipe["rows_read"] == 20_000
    for split in ("train", "val", "test"):
        assert schema.splits[split].rows == report["oracle"][split]["rows"]
    # the oracle travels with the data, so the trainer can print it beside its own AUC
    assert schema.recipe["oracle"]["test"]["auc"] == report["oracle"]["test"]["auc"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_ranks_cover_each_split_once_with_the_generators_labels(roundtrip, split):
    report, schema, dataset = roundtrip
    rows, positives, fingerprints = 0, 0, []
    for rank in range(2):
        loader = CTRDataLoader(dataset, split, LoaderConfig(batch_size=512, shuffle=split == "train"), rank=rank, world_size=2)
        for batch in loader:
            rows += batch.labels.numel()
            positives += int(batch.labels.sum())
            assert batch.sparse_features.keys() == schema.field_names
            ids = batch.sparse_features.values().view(len(schema.field_names), -1)
            assert all(int(ids[f].max()) < schema.sparse_fields[f].cardinality for f in range(len(schema.field_names)))
            fingerprints.append(np.concatenate([ids.T.numpy(), batch.dense_features.numpy().view(np.int32)], axis=1))
    assert rows == schema.splits[split].rows
    assert positives == report["oracle"][split]["positives"]
    # no row twice: (ids, dense) rows are distinct enough to fingerprint rows of synthetic data
    everything = np.concatenate(fingerprints)
    assert len(np.unique(everything, axis=0)) >= 0.99 * len(everything)
