"""Multi-hot fields end to end, in process: the loader's KJT lengths, pooling in the sparse
arch (sum and mean, empty rows), the serving program against the eager model for every
model of the zoo (-1 padding anywhere in a field's columns, int8 tables), and the loader's refusals.

Every row carries its row number ``i`` in field ``id``; its multi-hot field ``h`` holds
``i % 4`` ids ``i % 5, i % 5 + 1, ...``, so content can be checked batch by batch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.loader import CTRDataLoader, LoaderConfig
from trainer.data.schema import DatasetSchema, SparseField, read_schema, write_schema
from trainer.data.writer import DatasetWriter, make_table
from trainer.errors import UserError
from trainer.export.artifact import serving_ids
from trainer.export.serving_model import ServingModel, export_program
from trainer.job_config import MODEL_NAMES, EmbeddingConfig, ModelConfig
from trainer.model import MultiEmbeddingCTR

N_TRAIN, N_VAL = 1_003, 211
MAX_LENGTH = 4
FIELDS = [SparseField("id", N_TRAIN), SparseField("h", 9, MAX_LENGTH, "mean"), SparseField("c", 3)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def history(ids: np.ndarray, longest: int = MAX_LENGTH - 1) -> pa.ListArray:
    """Row i: ``i % (longest + 1)`` ids counting up from ``i % 5``."""
    lengths = ids % (longest + 1)
    values = np.concatenate([np.arange(k) + i % 5 for i, k in zip(ids, lengths)] + [np.zeros(0, np.int64)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


def build(root: str, longest: int = MAX_LENGTH - 1) -> None:
    writer = DatasetWriter(root, files_per_split=2, row_group_rows=300)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        ids = np.arange(n)
        table = make_table(ids % 2, {"id": ids})
        table = table.append_column("h", history(ids, longest)).append_column("c", pa.array(ids % 3, pa.int32()))
        writer.write(split, table)
    splits = writer.close()
    del splits["test"]
    write_schema(root, DatasetSchema("synthetic", FIELDS, [], splits))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("multi_hot") / "data")
    build(root)
    return root


def check_batch(kjt: KeyedJaggedTensor) -> np.ndarray:
    ids = kjt["id"].values().numpy()
    h = kjt["h"]
    lengths = h.lengths().numpy()
    np.testing.assert_array_equal(lengths, ids % MAX_LENGTH)
    expected = np.concatenate([np.arange(k) + i % 5 for i, k in zip(ids, lengths)])
    np.testing.assert_array_equal(h.values().numpy(), expected)
    np.testing.assert_array_equal(kjt["c"].values().numpy(), ids % 3)
    np.testing.assert_array_equal(kjt["c"].lengths().numpy(), np.ones(len(ids)))
    return ids


@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_gives_each_row_its_ids_across_ranks_windows_and_shuffles(dataset, world_size):
    config = LoaderConfig(batch_size=64, shuffle_window_rows=250)
    loaders = [CTRDataLoader(dataset, "train", config, rank=r, world_size=world_size) for r in range(world_size)]
    seen = np.concatenate([check_batch(b.sparse_features) for loader in loaders for b in loader])
    np.testing.assert_array_equal(np.sort(seen), np.arange(N_TRAIN))
    assert not np.array_equal(seen, np.arange(N_TRAIN))  # shuffled
    assert loaders[0].column_range("h") == (0, 4 + MAX_LENGTH - 2)  # list column statistics


def test_loader_refuses_a_row_longer_than_max_length_and_a_wrong_column_type(tmp_path):
    root = str(tmp_path / "long")
    build(root, longest=MAX_LENGTH + 1)
    with pytest.raises(UserError, match=r"row group \d+ has a row with 5 h ids, more than its max_length 4"):
        list(CTRDataLoader(root, "train", LoaderConfig(batch_size=64)))
    schema = read_schema(root)
    as_single = DatasetSchema("synthetic", [FIELDS[0], SparseField("h", 9), FIELDS[2]], [], schema.splits)
    write_schema(root, as_single)
    with pytest.raises(UserError, match=r"column 'h' has type list<.*int32>, expected int32"):
        CTRDataLoader(root, "train", LoaderConfig(batch_size=64))
    bad_ids = DatasetSchema("synthetic", [FIELDS[0], SparseField("h", 5, MAX_LENGTH), FIELDS[2]], [], schema.splits)
    write_schema(root, bad_ids)
    with pytest.raises(UserError, match=r"h ids in \[0, 8\] \(parquet statistics\), outside \[0, 5\)"):
        CTRDataLoader(root, "train", LoaderConfig(batch_size=64))
    for name in schema.splits["train"].files:  # without statistics: caught in the decoded window
        path = f"{root}/{name}"
        table = pq.read_table(path)
        h = table.schema.get_field_index("h")
        pq.write_table(table.set_column(h, "h", history(table["id"].to_numpy())), path, write_statistics=False)
    with pytest.raises(UserError, match=r"has h ids in \[0, [5-7]\], outside \[0, 5\)"):  # not "(parquet statistics)"
        list(CTRDataLoader(root, "train", LoaderConfig(batch_size=64)))


def test_pooling_sums_or_averages_each_rows_ids_and_empty_rows_pool_to_zero():
    fields = [SparseField("s", 6, 3, "sum"), SparseField("m", 6, 3, "mean")]
    model = MultiEmbeddingCTR.from_config(fields, ModelConfig(name="dnn", hidden=8), EmbeddingConfig("me", 2, 4), seed=0)
    arch = model.sparse_arch
    rows = [[1, 2, 5], [], [4]]  # per row, for both fields
    lengths = torch.tensor([len(r) for r in rows] * 2, dtype=torch.int32)
    values = torch.tensor([i for r in rows for i in r] * 2)
    pooled = arch(KeyedJaggedTensor.from_lengths_sync(keys=["s", "m"], values=values, lengths=lengths))  # (M, B, F, K)
    bags = arch.embedding_bag_collection.embedding_bags
    for m in range(2):
        for f, name in enumerate(["s", "m"]):
            weight = bags[arch.table_names()[(m, name)]].weight.detach()[:, : arch.dim]
            for b, r in enumerate(rows):
                expected = torch.zeros(arch.dim) if not r else weight[r].sum(0) / (len(r) if name == "m" else 1)
                torch.testing.assert_close(pooled[m, b, f], expected)


def padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_serving_program_pools_like_the_trained_model(name):
    """Every model of the zoo, multi-hot fields (mean and sum, empty bags) beside single-id ones."""
    fields = [SparseField("a", 7), SparseField("h", 11, 3, "mean"), SparseField("t", 5, 2, "sum"), SparseField("b", 4)]
    model = MultiEmbeddingCTR.from_config(fields, ModelConfig(name=name, hidden=16), EmbeddingConfig("me", 2, 4), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    batch = 9
    a, b = torch.randint(0, 7, (batch,), generator=g), torch.randint(0, 4, (batch,), generator=g)
    h = [torch.randint(0, 11, (int(n),), generator=g).tolist() for n in torch.randint(0, 4, (batch,), generator=g)]
    t = [torch.randint(0, 5, (int(n),), generator=g).tolist() for n in torch.randint(0, 3, (batch,), generator=g)]
    h[0], t[1] = [], []  # empty bags
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "h", "t", "b"],
        values=torch.cat([a, torch.tensor(sum(h, [])), torch.tensor(sum(t, []), dtype=torch.int64), b]),
        lengths=torch.tensor([1] * batch + [len(r) for r in h] + [len(r) for r in t] + [1] * batch, dtype=torch.int32),
    )
    with torch.no_grad():
        eager = torch.sigmoid(model(kjt))
    serving = ServingModel.from_model(model, [f.max_length for f in fields])
    ids = torch.cat([a[:, None], padded(h, 3), padded(t, 2), b[:, None]], dim=1)  # (B, W = 7)
    program = export_program(serving).module()
    torch.testing.assert_close(program(ids), eager, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(program(ids[:2]), eager[:2], atol=1e-6, rtol=1e-5)
    shuffled = torch.cat([a[:, None], padded(h, 3).flip(1), padded(t, 2).flip(1), b[:, None]], dim=1)  # -1 anywhere
    torch.testing.assert_close(program(shuffled), eager, atol=1e-6, rtol=1e-5)
    int8 = export_program(serving.int8()).module()(ids)
    assert (int8 - eager).abs().max() < 0.02


def test_serving_ids_pad_each_multi_hot_field_to_its_max_length(dataset):
    table = pq.read_table(f"{dataset}/{read_schema(dataset).splits['val'].files[0]}")
    ids = serving_ids(table.to_batches()[0], FIELDS)
    rows = table["id"].to_numpy()[: len(ids)]
    assert ids.shape == (len(rows), 1 + MAX_LENGTH + 1)
    for row, i in zip(ids, rows):
        k = i % MAX_LENGTH
        assert row[0] == i and row[-1] == i % 3
        assert list(row[1 : 1 + k]) == list(np.arange(k) + i % 5) and (row[1 + k : 1 + MAX_LENGTH] == -1).all()


SPEC_YAML = """
name: tagged
input: {format: csv, header: true}
columns:
  - {name: click, type: label}
  - {name: cat, type: categorical, hash_buckets: 97}
  - {name: tags, type: multi_hot, separator: "|", max_length: 3, pooling: sum}
  - {name: htags, type: multi_hot, separator: ";", max_length: 2, hash_buckets: 13}
  - {name: price, type: numeric, token: buckets, boundaries: [1, 2.5, 10]}
  - {name: n, type: numeric, token: criteo_log}
  - {name: t, type: ignore}
defaults: {min_count: 1}
split: {kind: time, time: {column: t, train_before: 240, val_before: 270}}
"""


def test_runtime_maps_raw_text_rows_as_the_preprocessor_did(tmp_path):
    """Hashed short and long (> 8 bytes) tokens, multi-hot cells with a separator (empty
    pieces, more than max_length ids, empty cells), bucketed numbers and the integer recipe:
    the artifact's transform gives the prepared dataset's ids, split by split."""
    import csv

    from trainer.data.preprocess import PreprocessConfig, preprocess
    from trainer.export.feature_spec import build_feature_spec
    from trainer.export.runtime import FeatureTransform

    rng = np.random.default_rng(0)
    lines = ["click,cat,tags,htags,price,n,t"]
    for i in range(300):
        cat = f"c{rng.integers(0, 5)}" if i % 3 else f"a-long-category-{rng.integers(0, 9)}"
        tags = "|".join(rng.choice(["x", "y", "", "zz", "w"], rng.integers(0, 6)))
        htags = ";".join(rng.choice(["p", "quite-a-long-tag", "r"], rng.integers(0, 4)))
        price = "" if i % 11 == 0 else str(round(float(rng.exponential(4)), 2))
        n = "" if i % 7 == 0 else str(rng.integers(-3, 300))
        lines.append(f"{int(rng.random() < 0.3)},{cat},{tags},{htags},{price},{n},{i}")
    raw = tmp_path / "raw.csv"
    raw.write_text("\n".join(lines) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML)
    schema = preprocess(PreprocessConfig(spec=str(spec), input=str(raw), output=str(tmp_path / "data"), progress=False))
    feature_spec, files = build_feature_spec(str(tmp_path / "data"), schema, schema.field_names)
    artifact = tmp_path / "artifact"
    for path, data in files.items():
        (artifact / path).parent.mkdir(parents=True, exist_ok=True)
        (artifact / path).write_bytes(data)
    transform = FeatureTransform(artifact, feature_spec)
    assert transform.max_lengths == [1, 3, 2, 1, 1] and transform.vocab[0] is None and transform.vocab[2] is None
    rows = list(csv.reader(lines[1:]))
    positions, _ = transform.field_positions(len(rows[0]), "raw.csv", labeled=True)
    for name, (lo, hi) in {"train": (0, 240), "val": (240, 270), "test": (270, 300)}.items():
        table = pa.concat_tables(pq.read_table(tmp_path / "data" / f) for f in schema.splits[name].files)
        expected = serving_ids(table.combine_chunks().to_batches()[0], schema.sparse_fields)
        np.testing.assert_array_equal(transform.ids(rows[lo:hi], positions).numpy(), expected, err_msg=name)
