"""CTRDataLoader: batch layout, sharding across ranks, shuffling, resume, storage and errors.

Every row carries its row number: in sparse field ``id``, in the first dense
column and (mod 7 / mod 2) in field ``a`` and the label, so coverage and
content can be checked batch by batch.
"""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.loader import CTRDataLoader, LoaderConfig, _Units
from trainer.data.schema import DatasetSchema, SparseField, read_schema, write_schema
from trainer.storage import filesystem, join
from trainer.data.writer import DatasetWriter, make_table
from trainer.errors import UserError

N_TRAIN = 10_007  # prime: divisible by no world size or batch size used here
N_VAL = 1_234
FIELDS = ["id", "a", "b"]
BATCH = 64
WINDOW = 1_000  # not a multiple of the row group (700) nor of the batch
CONFIG = LoaderConfig(batch_size=BATCH, shuffle_window_rows=WINDOW)


def build(root: str, n_train: int = N_TRAIN, n_val: int = N_VAL, dense: bool = True) -> None:
    """Rows in chunks of 1,000 spread over 3 part files, row groups of 700."""
    writer = DatasetWriter(root, files_per_split=3, row_group_rows=700)
    for split, n in (("train", n_train), ("val", n_val)):
        for start in range(0, n, 1000):
            ids = np.arange(start, min(start + 1000, n))
            dense_cols = np.stack([ids, -ids, ids * 0.5], axis=1).astype(np.float32) if dense else None
            writer.write(split, make_table(ids % 2, {"id": ids, "a": ids % 7, "b": ids % 5}, dense_cols))
    splits = writer.close()
    del splits["test"]
    fields = [SparseField("id", max(n_train, n_val)), SparseField("a", 7), SparseField("b", 5)]
    write_schema(root, DatasetSchema("synthetic", fields, ["d0", "d1", "d2"] if dense else [], splits))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("ds") / "data")
    build(root)
    return root


def ids_of(batches: list[Batch]) -> list[np.ndarray]:
    return [b.sparse_features["id"].values().numpy() for b in batches]


def check_rows(batch: Batch) -> np.ndarray:
    """Assert every feature of every row agrees with its row number; return the ids (B,)."""
    ids = batch.sparse_features["id"].values().numpy()
    np.testing.assert_array_equal(batch.sparse_features["a"].values().numpy(), ids % 7)
    np.testing.assert_array_equal(batch.sparse_features["b"].values().numpy(), ids % 5)
    np.testing.assert_array_equal(batch.labels.numpy(), ids % 2)
    if batch.dense_features.shape[1]:
        np.testing.assert_array_equal(batch.dense_features.numpy(), np.stack([ids, -ids, ids * 0.5], 1))
    return ids


def stored_ids(root: str, split: str) -> np.ndarray:
    """Row ids in schema file order, row group order."""
    files = read_schema(root).splits[split].files
    return np.concatenate([pq.read_table(join(root, f), columns=["id"])["id"].to_numpy() for f in files])


def test_batch_layout_and_file_order(dataset):
    loader = CTRDataLoader(dataset, "train", LoaderConfig(batch_size=BATCH, shuffle=False, shuffle_window_rows=WINDOW))
    batches = list(loader)
    assert len(batches) == len(loader) == -(-N_TRAIN // BATCH)
    for batch in batches:
        assert isinstance(batch, Batch) and isinstance(batch.sparse_features, KeyedJaggedTensor)
        b = batch.labels.shape[0]
        assert batch.labels.dtype == torch.float32 and batch.labels.shape == (b,)
        assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (b, 3)
        kjt = batch.sparse_features
        assert kjt.keys() == FIELDS and kjt.stride() == b
        assert kjt.values().dtype == torch.int64 and kjt.values().shape == (3 * b,)
        assert kjt.lengths().dtype == torch.int32 and torch.equal(kjt.lengths(), torch.ones(3 * b, dtype=torch.int32))
        ids = check_rows(batch)
        # field-major values: all rows of "id", then "a", then "b"
        np.testing.assert_array_equal(kjt.values().numpy(), np.concatenate([ids, ids % 7, ids % 5]))
    np.testing.assert_array_equal(np.concatenate(ids_of(batches)), stored_ids(dataset, "train"))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_partition_the_split(dataset, world_size, shuffle):
    config = LoaderConfig(batch_size=BATCH, shuffle=shuffle, shuffle_window_rows=WINDOW)
    loaders = [CTRDataLoader(dataset, "train", config, rank=r, world_size=world_size) for r in range(world_size)]
    steps = -(-N_TRAIN // (BATCH * world_size))
    seen = []
    for loader in loaders:
        loader.set_epoch(2)
        batches = list(loader)
        assert len(batches) == len(loader) == steps
        sizes = [b.labels.shape[0] for b in batches]
        assert 1 <= min(sizes) and max(sizes) <= BATCH and max(sizes) - min(sizes) <= 1
        seen += [check_rows(b) for b in batches]
    seen = np.concatenate(seen)
    assert len(seen) == N_TRAIN
    np.testing.assert_array_equal(np.sort(seen), np.arange(N_TRAIN))
    if not shuffle:  # ranks take consecutive pieces of the file-order stream
        np.testing.assert_array_equal(seen, stored_ids(dataset, "train"))


def test_ranks_read_only_their_row_groups(dataset, monkeypatch):
    reads: list[int] = []
    original = _Units.read
    monkeypatch.setattr(_Units, "read", lambda self, unit: reads.append(unit) or original(self, unit))
    for rank in range(3):
        reads.clear()
        loader = CTRDataLoader(dataset, "train", CONFIG, rank=rank, world_size=3)
        list(loader)
        assert len(set(reads)) == len(reads), "a row group was decoded twice"
        # all groups read hold the rank's rows plus at most a partial group at each end
        assert loader._units.rows[reads].sum() <= loader.rank_rows + 2 * 700


def test_shuffle_is_seeded_by_seed_and_epoch(dataset):
    def order(seed: int, epoch: int) -> np.ndarray:
        loader = CTRDataLoader(dataset, "train", LoaderConfig(batch_size=BATCH, seed=seed, shuffle_window_rows=WINDOW))
        loader.set_epoch(epoch)
        return np.concatenate(ids_of(list(loader)))

    base = order(0, 0)
    np.testing.assert_array_equal(base, order(0, 0))
    for other in (order(0, 1), order(1, 0)):
        assert not np.array_equal(base, other)
        np.testing.assert_array_equal(np.sort(other), np.sort(base))
    np.testing.assert_array_equal(np.sort(base), np.arange(N_TRAIN))
    assert not np.array_equal(base, stored_ids(dataset, "train"))


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_equals_tail_of_full_epoch(dataset, shuffle):
    config = LoaderConfig(batch_size=BATCH, shuffle=shuffle, shuffle_window_rows=WINDOW)
    loader = CTRDataLoader(dataset, "train", config, rank=1, world_size=2)
    loader.set_epoch(3)
    full = ids_of(list(loader))
    offsets = [loader.batch_offset(b) for b in range(len(loader) + 1)]
    crossing = next(b for b in range(len(loader)) if offsets[b] // WINDOW != (offsets[b + 1] - 1) // WINDOW)
    after = crossing + 1  # first batch starting in the next window
    for start in sorted({0, 1, crossing, after, len(loader) // 2, len(loader) - 1, len(loader)}):
        resumed = ids_of(list(loader.iter_from(start)))
        assert len(resumed) == len(full) - start
        for a, b in zip(resumed, full[start:]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        loader.iter_from(len(loader) + 1)


def test_abandoned_iteration_then_new_epoch(dataset):
    loader = CTRDataLoader(dataset, "train", CONFIG)
    it = iter(loader)
    first = next(it)
    it.close()  # stops the background reader
    loader.set_epoch(0)
    np.testing.assert_array_equal(next(iter(loader)).labels.numpy(), first.labels.numpy())


def test_memory_filesystem():
    root = f"memory://loader-test-{uuid.uuid4().hex[:8]}"
    build(root, n_train=3_001, n_val=500)
    try:
        loaders = [CTRDataLoader(root, "val", CONFIG, rank=r, world_size=2) for r in range(2)]
        ids = np.concatenate([check_rows(b) for loader in loaders for b in loader])
        np.testing.assert_array_equal(np.sort(ids), np.arange(500))
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_no_dense_fields(tmp_path):
    root = str(tmp_path / "avazu-like")
    build(root, n_train=2_500, n_val=100, dense=False)
    batches = list(CTRDataLoader(root, "train", CONFIG))
    assert all(b.dense_features.shape == (b.labels.shape[0], 0) for b in batches)
    assert all(b.dense_features.dtype == torch.float32 for b in batches)
    np.testing.assert_array_equal(np.sort(np.concatenate([check_rows(b) for b in batches])), np.arange(2_500))


def test_expected_fields(dataset):
    assert CTRDataLoader(dataset, "val", CONFIG, expected_fields=FIELDS).field_names == FIELDS
    with pytest.raises(UserError, match="differ from the expected"):
        CTRDataLoader(dataset, "val", CONFIG, expected_fields=["id", "b", "a"])


def test_unknown_split(dataset):
    with pytest.raises(UserError, match="no split 'test'.*'train', 'val'"):
        CTRDataLoader(dataset, "test", CONFIG)


def test_missing_file(tmp_path):
    root = str(tmp_path / "d")
    build(root, n_train=2_000, n_val=100)
    victim = read_schema(root).splits["train"].files[1]
    fs, path = filesystem(join(root, victim))
    fs.rm(path)
    with pytest.raises(UserError, match=f"missing dataset file .*{victim}"):
        CTRDataLoader(root, "train", CONFIG)


def test_missing_or_mistyped_column(tmp_path):
    root = str(tmp_path / "d")
    build(root, n_train=2_000, n_val=100)
    victim = join(root, read_schema(root).splits["train"].files[0])
    table = pq.read_table(victim)
    pq.write_table(table.drop_columns(["a"]), victim)
    with pytest.raises(UserError, match=f"{victim}: missing column 'a'"):
        CTRDataLoader(root, "train", CONFIG)
    pq.write_table(table.set_column(table.schema.get_field_index("a"), "a", table["a"].cast("int64")), victim)
    with pytest.raises(UserError, match=f"{victim}: column 'a' has type int64, expected int32"):
        CTRDataLoader(root, "train", CONFIG)


def test_row_count_must_match_schema(tmp_path):
    root = str(tmp_path / "d")
    build(root, n_train=2_000, n_val=100)
    victim = join(root, read_schema(root).splits["train"].files[0])
    pq.write_table(pq.read_table(victim).slice(0, 10), victim)
    with pytest.raises(UserError, match="schema.json says 2000"):
        CTRDataLoader(root, "train", CONFIG)


def test_too_few_rows_for_world_size(dataset):
    with pytest.raises(UserError, match="too few for world_size"):
        CTRDataLoader(dataset, "val", LoaderConfig(batch_size=1), rank=0, world_size=2 * N_VAL)
