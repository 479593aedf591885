"""Fidelity to the authors' code (thuml/Multi-Embedding): the Criteo integer tokens,
NFwFM's field pairs, the global shuffle of the training split and BatchNorm over
the global batch."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.schema import SPLITS, read_schema
from trainer.data.splits import assign_splits, parse_split
from trainer.data.transforms import criteo_integer_token
from trainer.errors import UserError

# --- Criteo integer tokens ------------------------------------------------------------------


def test_small_integers_get_tokens_of_their_own():
    """The authors' rule: v <= 2 -> v - 2, else floor(ln(v)^2); no small value shares a token."""
    values = np.arange(-5, 3)
    tokens = criteo_integer_token(values)
    assert tokens.tolist() == (values - 2).tolist()
    big = criteo_integer_token(np.arange(3, 100_000))
    assert big.min() == 1 and not set(tokens.tolist()) & set(big.tolist())
    assert criteo_integer_token(np.array([3, 4, 5, 1382])).tolist() == [
        math.floor(math.log(v) ** 2) for v in (3, 4, 5, 1382)
    ]


def _integer_rows(n: int) -> list[list[str]]:
    """Criteo-format rows whose integers cover -3..5 (and a few larger values and empties)."""
    rng = np.random.default_rng(3)
    small = [str(v) for v in range(-3, 6)]
    rows = []
    for i in range(n):
        ints = [small[(i + k) % len(small)] if k < 6 else ("" if rng.random() < 0.2 else str(rng.integers(-3, 500)))
                for k in range(13)]  # I1..I13
        cats = [f"{rng.integers(0, 4):08x}" for _ in range(26)]  # C1..C26
        rows.append([str(i % 2)] + ints + cats)
    return rows


def test_exported_transform_encodes_integers_as_preprocess_does(tmp_path):
    """The serving runtime's ids of raw rows equal the preprocessor's, for values 0..5 and negatives."""
    from trainer.data.preprocess import PreprocessConfig, preprocess
    from trainer.export.feature_spec import build_feature_spec
    from trainer.export.runtime import FeatureTransform

    rows = _integer_rows(360)
    raw = tmp_path / "raw.tsv"
    raw.write_text("".join("\t".join(r) + "\n" for r in rows))
    out = tmp_path / "data"
    schema = preprocess(PreprocessConfig(dataset="criteo", input=str(raw), output=str(out), min_count=1, progress=False))
    spec, files = build_feature_spec(str(out), schema, schema.field_names)
    artifact = tmp_path / "artifact"
    for path, data in files.items():
        (artifact / path).parent.mkdir(parents=True, exist_ok=True)
        (artifact / path).write_bytes(data)
    transform = FeatureTransform(artifact, spec)
    split = assign_splits(np.arange(len(rows)), parse_split("8,1,1"), 0)
    positions, _ = transform.field_positions(len(rows[0]), "raw.tsv", labeled=True)
    for s, name in enumerate(SPLITS):
        chosen = [r for r, k in zip(rows, split) if k == s]
        ids = transform.ids(chosen, positions).numpy()
        table = pa.concat_tables(pq.read_table(out / f) for f in schema.splits[name].files)
        expected = np.stack([table[f].to_numpy() for f in schema.field_names], axis=1)
        np.testing.assert_array_equal(ids, expected, err_msg=name)
    tokens = {str(v): transform.integer_token(v) for v in range(-3, 6)}
    assert tokens == {str(v): int(criteo_integer_token(np.array([v]))[0]) for v in range(-3, 6)}
    assert len(set(tokens.values())) == 8  # only 3 and 4 share a token (1)
    i1 = read_schema(str(out)).cardinality("I1")
    assert i1 == 2 + 8  # OOV, missing, then -5..0 (v - 2 of -3..2) and 1 (3, 4), 2 (5)


def test_export_refuses_a_dataset_made_with_another_integer_rule(tmp_path):
    from trainer.data.preprocess import PreprocessConfig, preprocess
    from trainer.data.schema import write_schema
    from trainer.export.feature_spec import build_feature_spec

    raw = tmp_path / "raw.tsv"
    raw.write_text("".join("\t".join(r) + "\n" for r in _integer_rows(50)))
    out = tmp_path / "data"
    schema = preprocess(PreprocessConfig(dataset="criteo", input=str(raw), output=str(out), min_count=1, progress=False))
    old = "token: v if v <= 2 else floor(ln(v)^2), empty -> missing id; dense: log1p(max(v, 0)), empty -> 0"
    write_schema(str(out), dataclasses.replace(schema, recipe={**schema.recipe, "integer_transform": old}))
    with pytest.raises(UserError, match="Preprocess the raw data again"):
        build_feature_spec(str(out), read_schema(str(out)), schema.field_names)


# --- NFwFM pairs ----------------------------------------------------------------------------


@pytest.mark.parametrize("pairs", ["all", "upper"])
def test_nfwfm_pairs_equal_a_double_loop(pairs):
    """"all": every ordered pair (i, j) of the F x F grid, the diagonal included (the
    reference); "upper": i < j only. The diagonal's share is nonzero."""
    import torch

    from trainer.job_config import ModelConfig
    from trainer.model.interactions.nfwfm import NFwFMInteraction

    torch.manual_seed(0)
    num_fields = 4
    interaction = NFwFMInteraction.from_config(ModelConfig("nfwfm", nfwfm_pairs=pairs), num_fields, dim=3)
    e = torch.randn(5, num_fields, 3, dtype=torch.float64)
    w = interaction.field_weights.detach().double()
    interaction.field_weights.data = w.float()
    expected = torch.zeros(5, 3, dtype=torch.float64)
    for i in range(num_fields):
        for j in range(num_fields):
            if pairs == "all" or i < j:
                expected += w[i, j] * e[:, i] * e[:, j]
    pooled = interaction.pooled(e.float()).double()
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    diagonal = sum(w[i, i] * e[:, i] * e[:, i] for i in range(num_fields))
    assert diagonal.abs().min() > 1e-3
    upper = sum(w[i, j] * e[:, i] * e[:, j] for i in range(num_fields) for j in range(i + 1, num_fields))
    assert torch.allclose(pooled, upper, atol=1e-5) == (pairs == "upper")


def test_nfwfm_pairs_is_validated():
    from trainer.job_config import ModelConfig

    with pytest.raises(UserError, match=r"nfwfm_pairs 'lower': expected one of \['all', 'upper'\]"):
        ModelConfig("nfwfm", nfwfm_pairs="lower")


# --- BatchNorm over the global batch --------------------------------------------------------

_ROWS = (5, 3)  # rows per rank: uneven on purpose


def _global_batch(steps: int = 2):
    """Per step: (inputs (8, 4), upstream gradients (8, 3)) of the whole global batch."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randn(sum(_ROWS), 4, generator=g) * 3 + 1, torch.randn(sum(_ROWS), 3, generator=g)) for _ in range(steps)]


def _bn_model(norm):
    """Linear(4, 3) -> norm(3), the same weights everywhere (the BN's affine made non-trivial)."""
    import torch

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), norm)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    return model


def _bn_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from trainer.model.global_batchnorm import GlobalBatchNorm1d

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_bn_model(GlobalBatchNorm1d(3, momentum=0.3)))
        rows = slice(sum(_ROWS[:rank]), sum(_ROWS[: rank + 1]))
        result = {"outputs": [], "input_grads": []}
        for x, grad in _global_batch():
            x = x[rows].clone().requires_grad_(True)
            model.zero_grad()
            y = model(x)
            y.backward(grad[rows] * 2)  # DDP averages parameter gradients over the 2 ranks
            result["outputs"].append(y.detach())
            result["input_grads"].append(x.grad * 0.5)
        result["params"] = {k: p.grad for k, p in model.module.named_parameters()}
        result["buffers"] = dict(model.module.named_buffers())
        # TorchRec's train pipeline traces the dense model with torch.fx: the all-reduce is one opaque call
        result["traced"] = torch.fx.symbolic_trace(model.module).code
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_on_two_gloo_ranks_equals_batchnorm_over_the_global_batch(tmp_path):
    """Outputs, input and parameter gradients (under DDP) and running statistics of 2 ranks
    with 5 and 3 rows equal one process's BatchNorm1d over the 8 rows, to 1e-5."""
    import torch

    from tests.helpers import free_port

    port, ctx = free_port(), torch.multiprocessing.get_context("spawn")
    other = ctx.Process(target=_bn_worker, args=(1, port, str(tmp_path)))  # rank 0 is this process: one start-up less
    other.start()
    try:
        _bn_worker(0, port, str(tmp_path))
    finally:
        other.join(timeout=120)
    assert other.exitcode == 0
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _bn_model(torch.nn.BatchNorm1d(3, momentum=0.3))
    for step, (x, grad) in enumerate(_global_batch()):
        x = x.clone().requires_grad_(True)
        model.zero_grad()
        y = model(x)
        y.backward(grad)
        for key, expected in (("outputs", y.detach()), ("input_grads", x.grad)):
            got = torch.cat([r[key][step] for r in ranks])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{key} at step {step}")
    norm = model[1]  # what BatchNorm over rank 0's rows alone gives: not the same
    local = torch.nn.functional.batch_norm(model[0](x[: _ROWS[0]]), None, None, norm.weight, norm.bias, training=True)
    assert not torch.allclose(local, y[: _ROWS[0]], atol=1e-3)
    for r in ranks:
        assert r["traced"].count("_global_batch_norm(") == 1
        for k, p in model.named_parameters():
            torch.testing.assert_close(r["params"][k], p.grad, atol=1e-5, rtol=1e-5, msg=k)
        for k, b in model.named_buffers():
            torch.testing.assert_close(r["buffers"][k], b, atol=1e-5, rtol=1e-5, msg=k)


def test_sync_batchnorm_swaps_every_batchnorm_and_keeps_the_model():
    """model.sync_batchnorm: same state dict keys and values, no plain BatchNorm1d left, and in
    one process (or in eval) the same outputs as BatchNorm1d."""
    import torch

    from trainer.data.schema import SparseField
    from trainer.job_config import EmbeddingConfig, ModelConfig
    from trainer.model import MultiEmbeddingCTR
    from trainer.model.global_batchnorm import GlobalBatchNorm1d

    fields = [SparseField(f"f{i}", 7) for i in range(3)]
    embedding = EmbeddingConfig("me", 2, 4)
    plain, synced = (
        MultiEmbeddingCTR.from_config(fields, ModelConfig("nfwfm", hidden=8, dropout=0.0, sync_batchnorm=s), embedding, seed=3)
        for s in (False, True)
    )
    kinds = [type(m) for m in synced.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert kinds and set(kinds) == {GlobalBatchNorm1d}
    assert len(kinds) == sum(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
    a, b = plain.state_dict(), synced.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    e = torch.randn(2, 6, 3, 4)
    for mode in (True, False):
        torch.testing.assert_close(synced.train(mode).forward_embeddings(e), plain.train(mode).forward_embeddings(e))


# --- global shuffle of the training split ---------------------------------------------------


def test_permutation_is_a_seeded_bijection_that_fills_every_bucket_exactly():
    from trainer.data.global_shuffle import Permutation

    for n in (1, 2, 5, 1000, 4097):
        pi = Permutation(n, seed=7)
        positions = pi(np.arange(n))
        assert np.array_equal(np.sort(positions), np.arange(n)), n
        assert np.array_equal(pi(np.arange(n)), positions)  # a function of (n, seed, index) only
    positions = Permutation(4097, seed=7)(np.arange(4097))
    # bucket b = positions [b * 300, (b + 1) * 300): exactly 300 rows each, 197 in the last
    assert np.bincount(positions // 300).tolist() == [300] * 13 + [197]
    assert not np.array_equal(Permutation(4097, seed=8)(np.arange(4097)), positions)
    # not close to the identity: the rank correlation of position and file order is small
    assert abs(np.corrcoef(np.arange(4097), positions)[0, 1]) < 0.05


def _split_rows(root: Path, files: list[str]) -> pa.Table:
    return pa.concat_tables(pq.read_table(root / f) for f in files)


def test_shuffle_split_keeps_the_rows_changes_their_order_and_is_seeded(tmp_path, monkeypatch):
    import trainer.data.global_shuffle as global_shuffle
    from tests.helpers import make_dataset
    from trainer.data.global_shuffle import shuffle_split

    monkeypatch.setattr(global_shuffle, "MAX_OPEN_BUCKETS", 3)  # 5 buckets: two reads of the split
    import shutil

    roots = [make_dataset(tmp_path / "d0", rows=3000)]
    roots += [Path(shutil.copytree(roots[0], tmp_path / f"d{k}")) for k in (1, 2)]  # 3 copies of the same data
    schema = read_schema(str(roots[0]))
    before = _split_rows(roots[0], schema.splits["train"].files)
    results = [shuffle_split(str(r), schema.splits["train"], "train", seed=s, bucket_rows=500) for r, s in zip(roots, (1, 1, 2))]
    (info, report), *_ = results
    assert info.rows == before.num_rows and len(info.files) == len(schema.splits["train"].files)
    assert report.buckets == 5 and report.reads == 2 and report.largest_bucket == 500 <= report.bucket_rows
    after = [_split_rows(r, i.files) for r, (i, _) in zip(roots, results)]
    key = [c for c in before.column_names if c != "dense"]

    def rows(t: pa.Table) -> list[tuple]:
        return list(zip(*(t[c].to_pylist() for c in key)))

    assert sorted(rows(after[0])) == sorted(rows(before))  # the same multiset of rows
    assert rows(after[0]) != rows(before) and rows(after[2]) != rows(after[0])
    assert after[0].equals(after[1])  # same seed, same rows in the same order
    files = sorted(str(p.relative_to(roots[0])) for p in roots[0].rglob("*") if p.is_file())
    assert not [f for f in files if "shuffle" in f or "unshuffled" in f]  # the scratch is gone
    for a, b in zip(sorted((roots[0]).rglob("train/*.parquet")), sorted((roots[1]).rglob("train/*.parquet"))):
        assert a.read_bytes() == b.read_bytes()  # same seed, same bytes


def test_failed_shuffle_leaves_the_split_as_it_was(tmp_path, monkeypatch):
    import trainer.data.global_shuffle as global_shuffle
    from tests.helpers import make_dataset

    root = make_dataset(tmp_path / "d", rows=2000)
    schema = read_schema(str(root))
    before = {p: p.read_bytes() for p in sorted(root.rglob("*.parquet"))}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(global_shuffle.DatasetWriter, "close", broken)
    with pytest.raises(OSError, match="disk full"):
        global_shuffle.shuffle_split(str(root), schema.splits["train"], "train", seed=0, bucket_rows=300)
    assert {p: p.read_bytes() for p in sorted(root.rglob("*.parquet"))} == before
    assert not list(root.glob("_shuffle*"))


def test_preprocess_shuffle_train_records_the_order(tmp_path):
    """--shuffle-train: train holds the same rows in another order, val and test are untouched,
    and the recipe says so; without it the recipe says "file"; synthetic parquet data says "iid"."""
    from trainer.data.preprocess import main

    raw = tmp_path / "raw.tsv"
    raw.write_text("".join("\t".join(r) + "\n" for r in _integer_rows(600)))
    outs = {flag: tmp_path / f"data{flag}" for flag in ("", "--shuffle-train")}
    for flag, out in outs.items():
        main(["--dataset", "criteo", "--input", str(raw), "--output", str(out), "--min-count", "1", "--no-progress"]
             + ([flag] if flag else []))  # fmt: skip
    plain, shuffled = (read_schema(str(o)) for o in outs.values())
    assert plain.recipe["train_order"] == "file" and shuffled.recipe["train_order"] == "global_shuffle"
    assert shuffled.recipe["train_shuffle"]["rows"] == plain.splits["train"].rows
    tables = {k: {s: _split_rows(o, read_schema(str(o)).splits[s].files) for s in SPLITS} for k, o in outs.items()}
    a, b = tables[""], tables["--shuffle-train"]
    assert a["val"].equals(b["val"]) and a["test"].equals(b["test"])
    assert not a["train"].equals(b["train"])
    assert sorted(a["train"].to_pylist(), key=str) == sorted(b["train"].to_pylist(), key=str)


def test_synthetic_parquet_rows_are_recorded_as_iid(tiny_dataset):
    assert read_schema(str(tiny_dataset)).recipe["train_order"] == "iid"
