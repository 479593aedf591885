"""Embedding-collapse monitoring (``trainer.collapse``).

- the metrics against ``numpy.linalg.svd`` / explicit QR on matrices with known spectra;
- streaming: chunked, memory-mapped and padded tables give the one-shot result;
- a live job: 2 real gloo ranks (spawned) with row-, column- and table-wise split tables and
  replicas, against the single-process result; the same ranks write a 2-rank DCP checkpoint
  with column- and row-sharded DTensors that is then read offline;
- real checkpoints of the trainer (one process ME, and a 2-rank torchrun SE run, trained
  once per session in the background) read offline, from a local path and ``memory://``;
- the CLI writes collapse.json, PNGs and a self-contained report.html; clear errors.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from tests.helpers import PYTHON, ROOT, VENV_BIN, cli_env, free_port
from trainer.collapse.analysis import (
    CollapseReport,
    analyze_field,
    ia_of_singular_values,
    information_abundance,
    principal_cosines,
    random_baseline_ia,
    set_diversity,
    singular_values,
)
from trainer.collapse.gram import (
    BASELINE_BLOCK_ROWS,
    clear_baseline_cache,
    field_gram,
    random_block_seed,
    random_gram,
    random_gram_part,
)
from trainer.collapse.sharded_tables import FieldSpec, TableWindow, analyze_windows, distributed_field_grams
from trainer.checkpoint import DIGEST_KEY
from trainer.collapse.stored_tables import CheckpointTables, analyze_checkpoint
from trainer.table_layout import checkpoint_weight_key, embedding_shape
from trainer.errors import UserError


# ---- matrices with known spectra --------------------------------------------------------


def known_matrix(rows: int, s: list[float], seed: int = 0, dtype=np.float64) -> np.ndarray:
    """U diag(s) V^T with random orthonormal U (rows x k), V (k x k)."""
    rng = np.random.default_rng(seed)
    k = len(s)
    u = np.linalg.qr(rng.standard_normal((rows, min(rows, k))))[0]
    v = np.linalg.qr(rng.standard_normal((k, k)))[0]
    m = min(rows, k)
    return ((u[:, :m] * np.asarray(s[:m])) @ v[:, :m].T).astype(dtype)


CASES = {
    "full_rank": (400, [5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.01]),
    "rank_deficient": (300, [4.0, 2.0, 1.0, 0.0, 0.0, 0.0]),
    "rows_fewer_than_cols": (3, [2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]),
    "huge_norm": (250, [3e6, 2e6, 1e6, 5e5, 1e3]),
    "one_column": (50, [7.0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_rows", [7, 1 << 16])
def test_ia_and_spectrum_match_numpy_svd(case, chunk_rows):
    rows, s = CASES[case]
    m = known_matrix(rows, s, seed=len(case))
    ref = np.linalg.svd(m, compute_uv=False)
    ours = singular_values(m, chunk_rows=chunk_rows)
    top = ref.max()
    np.testing.assert_allclose(ours[: len(ref)], ref, rtol=1e-7, atol=1e-7 * top)
    assert np.all(ours[len(ref):] <= 1e-7 * top)
    assert information_abundance(m, chunk_rows=chunk_rows) == pytest.approx(ref.sum() / top, rel=1e-6)
    assert information_abundance(torch.from_numpy(m), chunk_rows=chunk_rows) == pytest.approx(ref.sum() / top, rel=1e-6)


def test_float32_tables_are_summed_in_float64():
    # a collapsed float32 table: three directions at 1, 1e-3 and 1e-5 of the largest
    m = known_matrix(20000, [1.0, 1e-3, 1e-5, 0.0], seed=3, dtype=np.float32)
    ref = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    ours = singular_values(torch.from_numpy(m), chunk_rows=1000)
    np.testing.assert_allclose(ours[:3], ref[:3], rtol=1e-5)
    assert information_abundance(m) == pytest.approx(ref.sum() / ref[0], rel=1e-6)


def test_ia_bounds_and_zero_matrix():
    assert information_abundance(np.ones((10, 4))) == pytest.approx(1.0)  # rank 1
    assert information_abundance(np.eye(6)) == pytest.approx(6.0)  # all directions equal
    assert math.isnan(ia_of_singular_values([0.0, 0.0]))


def test_padding_columns_are_excluded_and_memmap_streams(tmp_path):
    rng = np.random.default_rng(1)
    used = rng.standard_normal((1000, 10)).astype(np.float32)
    stored = np.concatenate([used, np.full((1000, 2), 1e3, np.float32)], axis=1)  # 12 wide, 2 padding
    path = tmp_path / "table.f32"
    stored.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(1000, 12))
    g_mm = field_gram([mm], dim=10, chunk_rows=64)
    g_ref = used.astype(np.float64).T @ used.astype(np.float64)
    np.testing.assert_allclose(g_mm.gram, g_ref, rtol=1e-12)
    g_t = field_gram([torch.from_numpy(stored)], dim=10, chunk_rows=333)
    np.testing.assert_allclose(g_t.gram, g_ref, rtol=1e-12)


# ---- principal angles and diversity -------------------------------------------------------


def qr_svd_cosines(a: np.ndarray, b: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """The reference: orthonormal bases of the column spaces (QR; SVD when rank-deficient)."""

    def basis(x):
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        rank = int((s > rtol * s.max()).sum())
        q = np.linalg.qr(x)[0]
        return q if rank == x.shape[1] else u[:, :rank]

    return np.linalg.svd(basis(a).T @ basis(b), compute_uv=False)


def gram_of(*mats: np.ndarray) -> np.ndarray:
    e = np.concatenate(mats, axis=1)
    return e.T @ e


def test_principal_cosines_match_qr_and_svd():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 6))
    a = base[:, :4] + 0.1 * rng.standard_normal((200, 4))
    b = base[:, 2:] + 0.1 * rng.standard_normal((200, 4))  # shares two directions with a
    ours = principal_cosines(gram_of(a, b), slice(0, 4), slice(4, 8))
    np.testing.assert_allclose(ours, qr_svd_cosines(a, b), atol=1e-9)
    pairs = set_diversity([a, b])
    assert pairs[0].similarity == pytest.approx(qr_svd_cosines(a, b).mean(), abs=1e-9)
    assert pairs[0].diversity == pytest.approx(1 - pairs[0].similarity)


def test_principal_cosines_of_rank_deficient_and_huge_sets():
    rng = np.random.default_rng(1)
    a = 1e6 * rng.standard_normal((150, 4))
    b = np.concatenate([a[:, :2] @ rng.standard_normal((2, 2)), np.zeros((150, 2))], axis=1)  # rank 2, inside a
    b = b + 1e3 * np.outer(rng.standard_normal(150), rng.standard_normal(4))  # a third direction, 1e-3 of the others
    ours = principal_cosines(gram_of(a, b), slice(0, 4), slice(4, 8))
    np.testing.assert_allclose(ours, qr_svd_cosines(a, b), atol=1e-6)
    assert len(ours) == 3  # min(rank 4, rank 3) principal angles


def test_identical_sets_have_diversity_0_and_orthogonal_sets_1():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((100, 5))
    rotated = a @ rng.standard_normal((5, 5))  # the same column space in another basis
    assert set_diversity([a, a])[0].diversity == pytest.approx(0.0, abs=1e-7)
    assert set_diversity([a, rotated])[0].diversity == pytest.approx(0.0, abs=1e-7)
    top = np.concatenate([a[:50], np.zeros((50, 5))])
    bottom = np.concatenate([np.zeros((50, 5)), a[50:]])  # disjoint rows: orthogonal column spaces
    assert set_diversity([top, bottom])[0].diversity == pytest.approx(1.0, abs=1e-12)


def test_one_gram_gives_per_set_overall_and_pairs():
    rng = np.random.default_rng(3)
    sets = [rng.standard_normal((500, 6)) @ np.diag([4, 2, 1, 1, 0.5, 0.1]) for _ in range(3)]
    fc = analyze_field(field_gram(sets, field="f"))
    for i, s in enumerate(sets):
        assert fc.set_ia[i] == pytest.approx(information_abundance(s), rel=1e-9)
    assert fc.overall_ia == pytest.approx(information_abundance(np.concatenate(sets, axis=1)), rel=1e-9)
    assert [(p.i, p.j) for p in fc.pairs] == [(0, 1), (0, 2), (1, 2)]
    assert fc.pairs[1].diversity == pytest.approx(set_diversity([sets[0], sets[2]])[0].diversity, abs=1e-9)
    assert fc.set_ia_normalized[0] == pytest.approx(fc.set_ia[0] / fc.set_random_ia)
    assert fc.overall_ia_normalized == pytest.approx(fc.overall_ia / fc.overall_random_ia)
    assert fc.diversity_groups == "sets" and 0.0 < fc.random_mean_diversity <= 1.0


def test_single_set_is_split_into_column_groups_like_the_paper():
    rng = np.random.default_rng(4)
    fc = analyze_field(field_gram([rng.standard_normal((300, 8))]), column_groups=2)
    assert fc.diversity_groups == "column_groups" and len(fc.pairs) == 1
    assert analyze_field(field_gram([rng.standard_normal((300, 8))])).pairs == []


def test_random_baseline_is_the_exact_gram_of_the_model_init_and_cached():
    clear_baseline_cache()
    rows, cols = BASELINE_BLOCK_ROWS + 1000, 6  # two row blocks
    bound = math.sqrt(1.0 / rows)

    def column(j):
        return torch.cat([
            torch.empty(min(BASELINE_BLOCK_ROWS, rows - b * BASELINE_BLOCK_ROWS)).uniform_(
                -bound, bound, generator=torch.Generator().manual_seed(random_block_seed(0, rows, j, b)))
            for b in range(2)
        ])

    drawn = torch.stack([column(j) for j in range(cols)], dim=1)
    assert drawn.abs().max() <= bound
    np.testing.assert_allclose(random_gram(rows, cols), field_gram([drawn]).gram, rtol=1e-12)
    wide = random_gram(rows, 12)  # leading columns of a wider draw are the narrower table
    np.testing.assert_allclose(wide[:cols, :cols], random_gram(rows, cols), rtol=1e-12)
    parts = random_gram_part(rows, cols, 0, [0]) + random_gram_part(rows, cols, 0, [1])  # drawn anywhere
    np.testing.assert_allclose(parts, random_gram(rows, cols), rtol=1e-12)
    assert 0.8 * cols < random_baseline_ia(rows, cols) < cols  # a random table is far from collapsed
    assert not np.allclose(random_gram(rows, cols, seed=1), random_gram(rows, cols))


def test_report_json_round_trip_writes_nan_as_null():
    rng = np.random.default_rng(5)
    fc = analyze_field(field_gram([rng.standard_normal((40, 4)), np.zeros((40, 4))], field="z"))
    assert math.isnan(fc.set_ia[1]) and math.isnan(fc.pairs[0].diversity)
    report = CollapseReport(source="x", label="t", fields=[fc], num_sets=2, dim=4, step=3)
    text = report.to_json()
    data = json.loads(text)
    assert data["fields"][0]["set_ia"][1] is None and data["summary"]["fields"] == 1
    back = CollapseReport.from_dict(data)
    assert back.fields[0].set_ia[0] == pytest.approx(fc.set_ia[0]) and math.isnan(back.fields[0].set_ia[1])
    assert back.to_json() == text


def test_embedding_shape_mirrors_the_model_config():
    from trainer.job_config import EmbeddingConfig

    for mode in ("se", "me"):
        for scale in (1, 2, 10):
            c = EmbeddingConfig(mode=mode, scale=scale, base_dim=10)
            assert embedding_shape(mode, scale, 10) == (c.num_sets, c.dim)


# ---- 2 real gloo ranks ----------------------------------------------------------------------

D_ROWS, D_DIM, D_STORAGE = 37, 6, 8


def dist_tables() -> dict[tuple[str, int], torch.Tensor]:
    """Fields a..e, 2 sets each, 37 x 8 stored (6 used, padding full of garbage)."""
    g = torch.Generator().manual_seed(0)
    tables = {}
    for name in "abcde":
        for s in range(2):
            t = torch.randn(D_ROWS, D_STORAGE, generator=g) * (1 + s)
            t[:, D_DIM:] = 1e4
            tables[(name, s)] = t
    return tables


def rank_windows(rank: int, tables) -> list[TableWindow]:
    """a: set0 column-split over the ranks, set1 on rank 1 (table-wise);
    b: both sets row-split (rank 0 rows < 20); c: replicated on both ranks;
    d: set0 a 2x2 grid (rows x cols) over the ranks, set1 on rank 0;
    e: both sets on rank 0 (nothing moves)."""
    w = []
    a0, a1 = tables[("a", 0)], tables[("a", 1)]
    if rank == 0:
        w.append(TableWindow(0, "a", 0, 0, a0[:, :4]))
    else:
        w += [TableWindow(0, "a", 0, 4, a0[:, 4:]), TableWindow(1, "a", 0, 0, a1)]
    for s in range(2):
        b = tables[("b", s)]
        w.append(TableWindow(s, "b", 0, 0, b[:20]) if rank == 0 else TableWindow(s, "b", 20, 0, b[20:]))
        w.append(TableWindow(s, "c", 0, 0, tables[("c", s)]))
    d0 = tables[("d", 0)]
    if rank == 0:
        w += [TableWindow(0, "d", 0, 0, d0[:15, :3]), TableWindow(0, "d", 15, 3, d0[15:, 3:]),
              TableWindow(1, "d", 0, 0, tables[("d", 1)])]
        w += [TableWindow(s, "e", 0, 0, tables[("e", s)]) for s in range(2)]
    else:
        w += [TableWindow(0, "d", 0, 3, d0[:15, 3:]), TableWindow(0, "d", 15, 0, d0[15:, :3])]
    return w


DIST_FIELDS = [FieldSpec(name, D_ROWS, 2, D_DIM) for name in "abcde"]


def _dist_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tables = dist_tables()
        windows = rank_windows(rank, tables)
        grams = distributed_field_grams(windows, DIST_FIELDS, chunk_rows=7)
        per_set = distributed_field_grams(windows, DIST_FIELDS, chunk_rows=7, cross_sets=False)
        clear_baseline_cache()
        report = analyze_windows(windows, DIST_FIELDS, dst=0, label="live", step=5, chunk_rows=5)
        from trainer.collapse.gram import cached_random_gram

        from trainer.collapse.sharded_tables import distributed_baselines

        distributed_baselines([FieldSpec("big", BASELINE_BLOCK_ROWS + 9, 2, 3)])  # 2 blocks: one per rank
        baseline = {"small": cached_random_gram(D_ROWS, 2 * D_DIM), "big": cached_random_gram(BASELINE_BLOCK_ROWS + 9, 6)}
        try:
            distributed_field_grams(windows[1:] if rank == 0 else windows, DIST_FIELDS)
            missing = "no error"
        except ValueError as e:
            missing = str(e)
        torch.save(
            {"grams": {k: g.gram for k, g in grams.items()}, "per_set": {k: g.gram for k, g in per_set.items()},
             "report": report.to_dict() if report else None, "missing": missing,
             "baseline": baseline},
            os.path.join(out, f"rank{rank}.pt"),
        )
        _save_sharded_checkpoint(rank, tables, os.path.join(out, "ckpt"))
    finally:
        dist.destroy_process_group()


def _save_sharded_checkpoint(rank: int, tables, path: str) -> None:
    """A DCP checkpoint written by 2 ranks: field a set0 column-sharded, set1 row-sharded
    (DTensors), field b replicated plain tensors; plus the trainer's meta.json."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    state = {
        checkpoint_weight_key(0, "a"): distribute_tensor(tables[("a", 0)], mesh, [Shard(1)]),
        checkpoint_weight_key(1, "a"): distribute_tensor(tables[("a", 1)], mesh, [Shard(0)]),
        checkpoint_weight_key(0, "b"): tables[("b", 0)].clone(),
        checkpoint_weight_key(1, "b"): tables[("b", 1)].clone(),
    }
    dcp.save(state, checkpoint_id=path)
    dist.barrier()
    if rank == 0:
        meta = {"progress": {"step": 7, "world_size": 2},
                "identity": {"model": {"name": "toy"}, "embedding": {"mode": "me", "scale": 2, "base_dim": D_DIM},
                             "fields": [["a", D_ROWS], ["b", D_ROWS]]}}
        Path(path, "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(_dist_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def single_process_gram(name: str) -> np.ndarray:
    tables = dist_tables()
    return field_gram([tables[(name, 0)], tables[(name, 1)]], dim=D_DIM).gram


@pytest.mark.slow
def test_two_ranks_give_the_single_process_grams(two_ranks):
    _, results = two_ranks
    for name in "abcde":
        ref = single_process_gram(name)
        for r in results:  # every rank gets every field's full Gram
            np.testing.assert_allclose(r["grams"][name], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_two_ranks_report_equals_the_single_process_analysis(two_ranks):
    _, results = two_ranks
    assert results[1]["report"] is None
    report = CollapseReport.from_dict(results[0]["report"])
    assert report.world_size == 2 and report.step == 5
    tables = dist_tables()
    for name in "abcde":
        ours = report.get_field(name)
        ref = analyze_field(field_gram([tables[(name, 0)], tables[(name, 1)]], dim=D_DIM, field=name))
        assert ours.set_ia == pytest.approx(ref.set_ia, rel=1e-9)
        assert ours.overall_ia == pytest.approx(ref.overall_ia, rel=1e-9)
        assert ours.mean_diversity == pytest.approx(ref.mean_diversity, abs=1e-9)


@pytest.mark.slow
def test_two_ranks_share_the_random_baseline(two_ranks):
    _, results = two_ranks
    clear_baseline_cache()
    for r in results:
        np.testing.assert_allclose(r["baseline"]["small"], random_gram(D_ROWS, 2 * D_DIM), rtol=1e-12)
        np.testing.assert_allclose(r["baseline"]["big"], random_gram(BASELINE_BLOCK_ROWS + 9, 6), rtol=1e-12)


@pytest.mark.slow
def test_two_ranks_without_cross_sets_give_the_per_set_blocks(two_ranks):
    _, results = two_ranks
    for name in "abcde":
        ref = single_process_gram(name)
        got = results[0]["per_set"][name]
        np.testing.assert_allclose(got[:D_DIM, :D_DIM], ref[:D_DIM, :D_DIM], rtol=1e-12)
        np.testing.assert_allclose(got[D_DIM:, D_DIM:], ref[D_DIM:, D_DIM:], rtol=1e-12)
        assert np.isnan(got[:D_DIM, D_DIM:]).all()


@pytest.mark.slow
def test_two_ranks_refuse_windows_that_do_not_cover_a_table(two_ranks):
    _, results = two_ranks
    for r in results:
        assert "set0__a" in r["missing"] and "cover" in r["missing"]


@pytest.mark.slow
def test_checkpoint_written_by_two_ranks_with_column_shards_reads_offline(two_ranks):
    out, _ = two_ranks
    ckpt = CheckpointTables(str(out / "ckpt"), band_rows=1)
    assert ckpt.world_size == 2 and ckpt.num_sets == 2 and ckpt.dim == D_DIM
    assert ckpt.field_row_bands("a") == [(0, 19), (19, 37)]  # set1 was row-split at 19
    tables = dist_tables()
    for name in "ab":
        for s, t in enumerate(ckpt.load_field(name)):
            assert t.shape == (D_ROWS, D_DIM)
            assert torch.equal(t, tables[(name, s)][:, :D_DIM])  # no padding read
    report = analyze_checkpoint(str(out / "ckpt"), band_rows=1, chunk_rows=4, progress=False)
    for name in "ab":
        ref = analyze_field(field_gram([tables[(name, 0)], tables[(name, 1)]], dim=D_DIM, field=name))
        assert report.get_field(name).overall_ia == pytest.approx(ref.overall_ia, rel=1e-9)
        assert report.get_field(name).pairs[0].cosines == pytest.approx(ref.pairs[0].cosines, abs=1e-9)


# ---- real trainer checkpoints ----------------------------------------------------------------

# ME 2x with base_dim 5 (tables stored 8 wide: 3 padding columns) and SE 2x (one set of 10, stored 12 wide)
TRAIN = ["model.hidden=8", "model.cross_layers=1", "embedding.scale=2", "embedding.base_dim=5",
         "train.batch_size=256", "train.max_steps=4", "train.epochs=1"]


def _finish(proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A one-process ME run and a 2-rank torchrun SE run of the real trainer, trained side by side."""
    root = tmp_path_factory.mktemp("collapse_runs")
    data = root / "data"
    subprocess.run(
        [PYTHON, "-m", "trainer.data.synthetic", "--rows", "3000", "--output", str(data), "--format", "parquet",
         "--cardinality-scale", "0.0005"],
        cwd=ROOT, env=cli_env(), check=True, capture_output=True, timeout=120,
    )
    me = subprocess.Popen(
        [PYTHON, "-m", "trainer.main", "--set", f"data.path={data}", f"run.dir={root / 'me'}", "embedding.mode=me", *TRAIN],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    se = subprocess.Popen(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "trainer/main.py",
         "--set", f"data.path={data}", f"run.dir={root / 'se'}", "embedding.mode=se", *TRAIN],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _finish(me, "one-process ME training")
    _finish(se, "2-rank SE training")
    return root


def full_tables(ckpt_dir: Path, num_sets: int, field: str, rows: int, storage: int) -> list[torch.Tensor]:
    """The reference read: whole tables through plain ``dcp.load`` (no process group)."""
    import torch.distributed.checkpoint as dcp

    state = {checkpoint_weight_key(m, field): torch.empty(rows, storage) for m in range(num_sets)}
    dcp.load(state, checkpoint_id=str(ckpt_dir))
    return list(state.values())


def latest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


@pytest.mark.parametrize("mode, num_sets, dim, storage, world", [("me", 2, 5, 8, 1), ("se", 1, 10, 12, 2)])
@pytest.mark.slow
def test_trainer_checkpoint_metrics_match_numpy(trained, mode, num_sets, dim, storage, world):
    run = trained / mode
    report = analyze_checkpoint(str(run), progress=False)  # a run dir: its latest checkpoint
    assert report.source == str(latest(run)) and report.world_size == world
    assert report.embedding == {"mode": mode, "scale": 2, "base_dim": 5} and (report.num_sets, report.dim) == (num_sets, dim)
    meta = json.loads((latest(run) / "meta.json").read_text())
    assert [f.field for f in report.fields] == [name for name, _ in meta["identity"]["fields"]]
    cards = dict(meta["identity"]["fields"])
    for field in ("C1", "C3", "C10"):
        tables = full_tables(latest(run), num_sets, field, cards[field], storage)
        assert all(bool((t[:, dim:] == 0).all()) for t in tables)  # the padding columns really are padding
        used = [t[:, :dim].double().numpy() for t in tables]
        fc = report.get_field(field)
        for i, u in enumerate(used):
            s = np.linalg.svd(u, compute_uv=False)
            assert fc.set_ia[i] == pytest.approx(s.sum() / s.max(), rel=1e-6)
        s = np.linalg.svd(np.concatenate(used, axis=1), compute_uv=False)
        assert fc.overall_ia == pytest.approx(s.sum() / s.max(), rel=1e-6)
        assert fc.overall_random_ia == pytest.approx(random_baseline_ia(cards[field], num_sets * dim), rel=1e-12)
        if mode == "me":
            assert fc.pairs[0].cosines == pytest.approx(list(qr_svd_cosines(*used)), abs=1e-5)
        else:  # SE 2x: its 10 columns split into 2 groups of 5, as the paper compares it with ME
            assert fc.diversity_groups == "column_groups"
            assert fc.pairs[0].cosines == pytest.approx(list(qr_svd_cosines(used[0][:, :5], used[0][:, 5:])), abs=1e-5)


@pytest.mark.slow
def test_checkpoint_reads_the_same_through_fsspec_memory(trained):
    ckpt = latest(trained / "se")
    fs = fsspec.filesystem("memory")
    for f in ckpt.iterdir():
        fs.pipe(f"/collapse-test/se/checkpoints/{ckpt.name}/{f.name}", f.read_bytes())
    try:
        remote = analyze_checkpoint("memory://collapse-test/se", fields=["C3", "C1"], progress=False)
        local = analyze_checkpoint(str(ckpt), fields=["C1", "C3"], progress=False)
        assert remote.source == f"memory://collapse-test/se/checkpoints/{ckpt.name}"
        assert [f.field for f in remote.fields] == ["C1", "C3"]
        assert remote.to_dict()["fields"] == local.to_dict()["fields"]
    finally:
        fs.rm("/collapse-test", recursive=True)


@pytest.mark.slow
def test_cli_writes_json_plots_and_a_self_contained_html(trained, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [PYTHON, "-m", "trainer.collapse", "--checkpoint", str(trained / "se"), "--checkpoint", str(trained / "me"),
         "--output", str(out)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["collapse.json", "spectra.png", "ia.png", "diversity.png", "comparison.png", "training.png", "report.html"]
    )
    assert not list(tmp_path.glob("report.tmp-*"))  # the temporary directory was renamed away
    data = json.loads((out / "collapse.json").read_text())
    assert data["format"] == "trainer.collapse/1" and len(data["reports"]) == 2
    se, me = data["reports"]
    assert se["embedding"]["mode"] == "se" and me["embedding"]["mode"] == "me"
    assert len(me["fields"]) == 39 and me["fields"][0]["overall_spectrum"] and me["summary"]["mean_overall_ia"] > 1
    for name in ("spectra.png", "ia.png", "diversity.png", "comparison.png", "training.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    images = [chunk.split("'")[0] for chunk in page.split("data:image/png;base64,")[1:]]
    assert len(images) == 5 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert "src='http" not in page and "<link" not in page  # self-contained
    assert me["label"] in page and se["label"] in page



@pytest.mark.slow
def test_report_to_memory_url_without_plots(trained):
    from trainer.collapse.__main__ import main

    main(["--checkpoint", str(trained / "me"), "--output", "memory://collapse-out/r1", "--fields", "C1,C3", "--no-plots"])
    fs = fsspec.filesystem("memory")
    try:
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/collapse-out/r1", detail=False)) == ["collapse.json", "report.html"]
        data = json.loads(fs.cat("/collapse-out/r1/collapse.json"))
        assert [f["field"] for f in data["reports"][0]["fields"]] == ["C1", "C3"]
    finally:
        fs.rm("/collapse-out", recursive=True)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_clear_errors_for_what_is_not_a_usable_checkpoint(trained, tmp_path):
    good = latest(trained / "me")
    with pytest.raises(UserError, match="checkpoint not found"):
        analyze_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a checkpoint"):
        analyze_checkpoint(str(tmp_path / "empty"))
    no_meta = _copy(good, tmp_path / "no_meta")
    (no_meta / "meta.json").unlink()
    with pytest.raises(UserError, match="incomplete.*meta.json"):
        analyze_checkpoint(str(no_meta))
    no_dcp = _copy(good, tmp_path / "no_dcp")
    (no_dcp / ".metadata").unlink()
    with pytest.raises(UserError, match="not a DCP checkpoint"):
        analyze_checkpoint(str(no_dcp))

    bad_metadata = _copy(good, tmp_path / "bad_metadata")
    (bad_metadata / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read its DCP metadata"):
        analyze_checkpoint(str(bad_metadata))
    truncated = _copy(good, tmp_path / "truncated")
    shard = next(truncated.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot read field"):
        analyze_checkpoint(str(truncated), progress=False)

    def with_identity(name, change):
        d = _copy(good, tmp_path / name)
        meta = json.loads((d / "meta.json").read_text())
        change(meta["identity"])
        del meta[DIGEST_KEY]  # an unsealed meta.json (as older trainers wrote) is read, with a warning
        (d / "meta.json").write_text(json.dumps(meta))
        return str(d)

    with pytest.raises(UserError, match="no embedding mode/scale/base_dim"):
        analyze_checkpoint(with_identity("no_emb", lambda i: i.pop("embedding")))
    with pytest.raises(UserError, match="no embedding table set0__Z9"):
        analyze_checkpoint(with_identity("other_fields", lambda i: i["fields"].append(["Z9", 10])))
    with pytest.raises(UserError, match="set0__C1 is 6 x 8.*7 rows"):
        analyze_checkpoint(with_identity("other_card", lambda i: i["fields"].__setitem__(13, ["C1", 7])))
    with pytest.raises(UserError, match="embedding table set2__"):
        analyze_checkpoint(with_identity("more_sets", lambda i: i["embedding"].update(scale=3)))
    with pytest.raises(UserError, match="no fields"):
        analyze_checkpoint(str(good), fields=["nope"])

    from trainer.collapse.__main__ import main

    with pytest.raises(UserError, match="already exists"):
        out = tmp_path / "exists"
        out.mkdir()
        main(["--checkpoint", str(good), "--output", str(out)])
