"""The authors' training recipe as an option: ``optim.embedding: dense_adam`` (whole tables,
every row every step), ``embedding.init: xavier_concat`` and the ``recipe: paper`` switch
that presets them; each part tested for its effect."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import yaml
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.helpers import ROOT, TINY, free_port
from trainer import typed_yaml
from trainer.data.schema import SparseField
from trainer.embedding_optim import apply_embedding_optimizer, combined_optimizer, embedding_optimizer
from trainer.errors import UserError
from trainer.job_config import (
    RECIPES,
    EmbeddingConfig,
    ModelConfig,
    ShardingConfig,
    check_recipe_data,
    load_config,
    recipe_departures,
    recipe_warnings,
)
from trainer.model import MultiEmbeddingCTR, MultiEmbeddingSparseArch, TrainModule, init_table_
from trainer.model.global_batchnorm import GlobalBatchNorm1d
from trainer.sharding import local_table_windows, plan_sharding, shard_model

CPU = torch.device("cpu")
FIELDS = [SparseField("a", 7), SparseField("b", 9), SparseField("c", 5)]
LOOKED_UP = 3  # the steps below look up ids 0..2 only: rows 3.. are idle


# ---- recipe: paper, resolved -----------------------------------------------------------


def test_paper_recipe_presets_every_key_and_an_explicit_key_wins(tmp_path):
    paper = load_config(None, ["data.path=d", "recipe=paper"])
    industrial = load_config(None, ["data.path=d"])
    assert RECIPES["paper"], "the paper recipe presets nothing"
    for key, preset in RECIPES["paper"].items():
        assert typed_yaml_value(paper, key) == preset, key
    assert paper.optim.embedding == "dense_adam" and paper.embedding.init == "xavier_concat"
    assert paper.model.sync_batchnorm is True and paper.model.nfwfm_pairs == "all" and paper.train.batch_size == 2048
    assert (industrial.optim.embedding, industrial.embedding.init) == ("rowwise_adagrad", "uniform")
    assert recipe_departures(paper) == []
    # a key set in the file, or with --set, wins over the recipe; the rest is still preset
    path = tmp_path / "paper.yaml"
    path.write_text("recipe: paper\ndata: {path: d}\noptim: {embedding_lr: 0.01}\nmodel:\n")
    mine = load_config(path, ["train.batch_size=256"])
    assert (mine.optim.embedding_lr, mine.train.batch_size) == (0.01, 256)
    assert (mine.optim.embedding, mine.embedding.init, mine.model.sync_batchnorm) == ("dense_adam", "xavier_concat", True)
    assert recipe_departures(mine) == [("optim.embedding_lr", 0.01, 1e-3), ("train.batch_size", 256, 2048)]
    # config.yaml records the resolved config: read back, it is the same config (no recipe re-applied on top)
    again = tmp_path / "config.yaml"
    again.write_text(yaml.safe_dump(typed_yaml.to_dict(mine), sort_keys=False))
    assert load_config(again) == mine
    with pytest.raises(UserError, match=r"recipe 'papers': expected one of \['industrial', 'paper'\]"):
        load_config(None, ["data.path=d", "recipe=papers"])


def test_every_shipped_paper_config_runs_the_paper_recipe():
    shipped = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
    assert shipped
    for path in shipped:
        config = load_config(path)
        assert config.recipe == "paper" and recipe_departures(config) == [], path.name


def typed_yaml_value(config, dotted: str):  # "optim.embedding" -> config.optim.embedding
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def test_paper_recipe_refuses_a_file_ordered_dataset_and_warns_off_its_batch():
    paper = load_config(None, ["data.path=d", "recipe=paper"])
    for order in ("global_shuffle", "iid"):
        check_recipe_data(paper, order, "d")
    with pytest.raises(UserError, match=r"d keeps its raw files' order.*'file'.*--shuffle-train"):
        check_recipe_data(paper, "file", "d")
    check_recipe_data(load_config(None, ["data.path=d"]), "file", "d")  # industrial: any order
    assert recipe_warnings(paper, 1) == []
    eight = recipe_warnings(paper, 8)
    assert len(eight) == 1 and "2048 x 8 rank(s) = 16384 rows" in eight[0]
    split = load_config(None, ["data.path=d", "recipe=paper", "train.batch_size=256", "model.sync_batchnorm=false"])
    (note,) = recipe_warnings(split, 8)
    assert "BatchNorm normalises over each rank's 256 rows, not the step's 2048" in note


@pytest.mark.parametrize(
    "override, message",
    [
        ("sharding.sharding_types=[row_wise]", r"sharding sharding_types \['row_wise'\] rules that out"),
        ("sharding.per_field={a: [table_wise]}", r"sharding per_field\['a'\] \['table_wise'\] rules that out"),
        ("sharding.compute_kernel=fused", r"sharding.compute_kernel 'fused' needs a sharded table"),
        ("embedding.data_type=fp16", r"use embedding.data_type fp32"),
    ],
)
def test_dense_adam_refuses_a_sharding_that_contradicts_it(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["data.path=d", "optim.embedding=dense_adam", override])
    load_config(None, ["data.path=d", "optim.embedding=rowwise_adagrad", override])  # fine with a fused optimizer
    load_config(None, ["data.path=d", "optim.embedding=dense_adam", "sharding.sharding_types=[data_parallel, table_wise]"])


# ---- embedding.init: xavier_concat -------------------------------------------------------


def test_xavier_concat_draws_every_table_within_one_bound_over_the_concatenated_vocabulary():
    arch = MultiEmbeddingSparseArch(FIELDS, num_sets=2, dim=6, seed=3, init="xavier_concat")
    bound = math.sqrt(6.0 / (7 + 9 + 5 + 6))  # nn.init.xavier_uniform_ of one set's (sum of cardinalities, dim) table
    uniform = MultiEmbeddingSparseArch(FIELDS, num_sets=2, dim=6, seed=3)
    bags, uniform_bags = arch.embedding_bag_collection.embedding_bags, uniform.embedding_bag_collection.embedding_bags
    for t, u in zip(arch.tables, uniform.tables):
        assert t.init_bound == pytest.approx(bound) and u.init_bound == pytest.approx(1 / math.sqrt(t.cardinality))
        weight = bags[t.table].weight.detach()
        used = weight[:, : t.dim]
        assert used.abs().max() <= bound and used.abs().max() > 0.5 * bound, t.table
        assert torch.equal(weight[:, t.dim :], torch.zeros_like(weight[:, t.dim :]))  # padding columns stay zero
        # the same seeded draws, only scaled: the blockwise, shard-local init is unchanged
        torch.testing.assert_close(used / bound, uniform_bags[u.table].weight.detach()[:, : t.dim] / u.init_bound)
        for rows, cols, row, col in [(3, 8, 2, 0), (t.cardinality, 3, 0, 3)]:  # a shard's window is a slice of the table
            window = init_table_(torch.empty(rows, cols), t, seed=3, row_offset=row, col_offset=col)
            assert torch.equal(window, weight[row : row + rows, col : col + cols])


# ---- optim.embedding: dense_adam -----------------------------------------------------------


def _build(dropout: float = 0.2, init: str = "uniform", sync_batchnorm: bool = False) -> MultiEmbeddingCTR:
    config = ModelConfig(name="dcnv2", hidden=8, cross_layers=2, dropout=dropout, sync_batchnorm=sync_batchnorm)
    return MultiEmbeddingCTR.from_config(FIELDS, config, EmbeddingConfig("me", 2, base_dim=6, init=init), seed=0)


def _batches(rank: int, steps: int = 4, batch: int = 8) -> list[tuple[KeyedJaggedTensor, torch.Tensor]]:
    """``steps`` batches of ids 0..LOOKED_UP-1 (rank 1 also looks up id LOOKED_UP), and labels."""
    g = torch.Generator().manual_seed(7 + rank)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, LOOKED_UP + rank, (batch * len(FIELDS),), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in FIELDS], values=ids, lengths=torch.ones(batch * len(FIELDS), dtype=torch.int32)
        )
        out.append((kjt, torch.randint(0, 2, (batch,), generator=g).float()))
    return out


def _train_sharded(name: str, placement: str, rank: int, lr: float, weight_decay: float, dropout: float = 0.2):
    """The model sharded with every table ``placement``, trained on ``_batches(rank)`` by the
    embedding optimizer ``name`` and a dense Adam with the same lr and weight decay.
    Returns (initial, trained) table windows and the sharded module."""
    emb_opt = embedding_optimizer(name, CPU, lr=lr, weight_decay=weight_decay)
    model = _build(dropout)
    apply_embedding_optimizer(model, emb_opt)
    plan = plan_sharding(
        model, ShardingConfig(sharding_types=(placement,)), dist.get_world_size(), CPU, pg=dist.group.WORLD,
        replicate_tables=emb_opt.dense,
    )  # fmt: skip
    sharded = shard_model(model, plan, CPU)
    optimizer = combined_optimizer(
        sharded, emb_opt, lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    )
    windows = lambda: {(t.table, row, col): w.detach().clone() for t, w, row, col in local_table_windows(sharded)}  # noqa: E731
    initial = windows()
    sharded.train()
    torch.manual_seed(rank)
    for kjt, labels in _batches(rank):
        torch.nn.functional.binary_cross_entropy_with_logits(sharded(kjt), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return initial, windows(), sharded


def test_dense_adam_runs_on_every_device_and_keeps_its_weight_decay():
    """No fused kernel, so no device limit, and torch's Adam applies the coupled L2 on CPU too
    (the fused CPU kernels drop it)."""
    for device in (CPU, torch.device("cuda")):  # only checked, nothing allocated
        dense = embedding_optimizer("dense_adam", device, lr=1e-3, eps=1e-7, weight_decay=1e-6)
        assert dense.dense and dense.optimizer_class is torch.optim.Adam and dense.dropped_weight_decay == 0.0
        assert dict(dense.kwargs) == {"lr": 1e-3, "eps": 1e-7, "weight_decay": 1e-6, "fused": True}
    assert not embedding_optimizer("rowwise_adagrad", CPU, lr=0.05).dense


@pytest.fixture
def one_rank():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "dense_adam"])
def test_an_idle_row_moves_under_dense_adam_only(name, one_rank):
    """Rows 3.. are never looked up: the lazy (fused) optimizers leave them exactly as drawn,
    weight decay asked for or not; dense Adam moves every row of every table, every step."""
    placement = "data_parallel" if name == "dense_adam" else "table_wise"  # the lazy ones: FBGEMM's fused kernels
    initial, trained, _ = _train_sharded(name, placement, 0, lr=0.05, weight_decay=0.05)
    assert initial.keys() == trained.keys() and initial
    for key, start in initial.items():
        now = trained[key]
        assert not torch.equal(now[:LOOKED_UP], start[:LOOKED_UP]), key
        idle_moved = (now[LOOKED_UP:, :6] != start[LOOKED_UP:, :6]).all(dim=1)  # the padding columns stay 0
        assert bool(idle_moved.all()) if name == "dense_adam" else not bool(idle_moved.any()), (name, key)


def test_dense_adam_is_the_authors_plain_adam_over_every_parameter(one_rank):
    """Sharded (replicated tables, DDP) dense_adam + dense Adam with the same lr and weight
    decay train exactly like ``torch.optim.Adam(model.parameters(), lr, weight_decay)`` on
    the unsharded model: the authors' training step (dropout off for a deterministic twin)."""
    lr, weight_decay = 0.01, 0.01
    _, trained, sharded = _train_sharded("dense_adam", "data_parallel", 0, lr, weight_decay, dropout=0.0)
    reference = _build(dropout=0.0)
    adam = torch.optim.Adam(reference.parameters(), lr=lr, weight_decay=weight_decay)
    reference.train()
    for kjt, labels in _batches(0):
        torch.nn.functional.binary_cross_entropy_with_logits(reference(kjt), labels).backward()
        adam.step()
        adam.zero_grad()
    state, keys = reference.state_dict(), reference.embedding_weight_keys()
    by_table = {table: keys[set_field] for set_field, table in reference.sparse_arch.table_names().items()}
    for (table, row, col), weight in trained.items():
        assert (row, col) == (0, 0) and weight.shape == state[by_table[table]].shape  # whole replicas
        torch.testing.assert_close(weight, state[by_table[table]], rtol=1e-5, atol=1e-6, msg=table)
    dense = {k.removeprefix("module."): v for k, v in sharded.state_dict().items() if "sparse_arch" not in k}
    for k, v in reference.state_dict().items():
        if "sparse_arch" not in k and v.is_floating_point():
            torch.testing.assert_close(dense[k], v, rtol=1e-5, atol=1e-6, msg=k)


def check_dense_adam_replicas(rank: int, world_size: int) -> None:
    """On every rank of a gloo group (called by ``tests/test_sharding.py``'s two-rank worker,
    which pays for the process start-up once): each rank trains on its own batches the way
    ``recipe: paper`` does, dense_adam and ``model.sync_batchnorm``, through TorchRec's
    ``TrainPipelineSparseDist`` as the trainer does (it fx-traces the model; the one-rank
    paper recipe once crashed there). The table replicas, the dense weights and the
    BatchNorm running statistics (TorchRec's DDP does not broadcast buffers: a per-rank
    BatchNorm leaves each rank its own) stay identical on all ranks, and every row moved
    (id LOOKED_UP is looked up by rank 1 only, the ids above by nobody)."""
    emb_opt = embedding_optimizer("dense_adam", CPU, lr=0.01, weight_decay=1e-6)
    module = TrainModule(_build(sync_batchnorm=True))
    apply_embedding_optimizer(module, emb_opt)
    plan = plan_sharding(
        module, ShardingConfig(sharding_types=("data_parallel",)), world_size, CPU, pg=dist.group.WORLD,
        replicate_tables=True,
    )  # fmt: skip
    sharded = shard_model(module, plan, CPU)
    optimizer = combined_optimizer(sharded, emb_opt, lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=1e-6))
    windows = lambda: {(t.table, row, col): w.detach().clone() for t, w, row, col in local_table_windows(sharded)}  # noqa: E731
    initial = windows()
    norms = [m for m in sharded.modules() if isinstance(m, GlobalBatchNorm1d)]
    running = lambda: torch.cat([b.reshape(-1) for m in norms for b in (m.running_mean, m.running_var)])  # noqa: E731
    assert norms
    initial_stats = running()
    pipeline = TrainPipelineSparseDist(sharded, optimizer, CPU)
    torch.manual_seed(rank)
    batches = iter([Batch(torch.empty(len(labels), 0), kjt, labels) for kjt, labels in _batches(rank)])
    steps = 0
    with pytest.raises(StopIteration):
        while True:
            pipeline.progress(batches)
            steps += 1
    assert steps == 4
    trained = windows()
    flat = torch.cat([trained[k].reshape(-1) for k in sorted(trained)])
    dense = torch.cat([p.detach().reshape(-1) for n, p in sorted(sharded.named_parameters()) if "sparse_arch" not in n])
    stats = running()
    assert not torch.equal(stats, initial_stats)
    for what, mine in (("table replicas", flat), ("dense weights", dense), ("BatchNorm running statistics", stats)):
        gathered = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"the {what} drifted apart"
    for key, start in initial.items():
        assert bool((trained[key][:, :6] != start[:, :6]).all(dim=1).all()), key


# ---- a tiny run with recipe: paper ------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_paper_recipe_run_trains_the_authors_way_and_resumes_bit_identically(tiny_dataset, tmp_path):
    """In one process: ``recipe: paper`` (TINY's model, without its optimizer keys) plans every
    table data_parallel, draws the tables within the Xavier bound of the concatenated vocabulary,
    moves every row of every table, and a run stopped at step 2 and resumed to step 4 ends
    bit-identical to the uninterrupted one (model and optimizer state, DCP). A dataset in its
    raw files' order is refused before anything is built."""
    from trainer.dist_context import init_distributed, shutdown
    from trainer.run_dir import RunDir
    from trainer.train import Trainer

    # recipe paper keeps model.sync_batchnorm on: on one rank its BatchNorm is the local one, and it
    # must pass TorchRec's fx trace of the model (trainer/model/global_batchnorm.py)
    tiny = [a for a in TINY if not a.startswith("optim.")]
    schema = json.loads((tiny_dataset / "schema.json").read_text())
    cardinalities = [f["cardinality"] for f in schema["sparse_fields"]]

    def trainer(run: str, max_steps: int, data=tiny_dataset) -> Trainer:
        config = load_config(None, [*tiny, "recipe=paper", f"data.path={data}", f"run.dir={tmp_path / run}",
                                    f"train.max_steps={max_steps}"])  # fmt: skip
        run_dir = RunDir(config.run.dir)
        made = Trainer(config, ctx, run_dir)
        run_dir.create()
        return made

    owned = not dist.is_initialized()
    ctx = init_distributed("cpu")
    try:
        whole = trainer("whole", 4)
        assert whole.config.optim.embedding == "dense_adam" and whole.config.embedding.init == "xavier_concat"
        assert whole.config.model.sync_batchnorm
        rows = whole.plan_text.splitlines()[2:]
        assert rows and all(" data_parallel " in r for r in rows)
        bound = math.sqrt(6 / (sum(cardinalities) + whole.config.embedding.dim))
        start = {t.table: w[:, : t.dim].clone() for t, w, _, _ in local_table_windows(whole.model)}
        assert max(float(w.abs().max()) for w in start.values()) <= bound
        assert min(float(w.abs().max()) for w in start.values()) > 0.5 * bound
        whole.fit()
        for t, w, _, _ in local_table_windows(whole.model):
            assert bool((w[:, : t.dim] != start[t.table]).all(dim=1).all()), t.table  # every row moved

        first = trainer("resumed", 2)
        first.fit()
        resumed = trainer("resumed", 4)
        resumed.restore(str(tmp_path / "resumed" / "checkpoints" / "step-00000002"))
        resumed.fit()
        for name, state in (("model", lambda t: t.model.state_dict()), ("optimizer", lambda t: t.optimizer.state_dict()["state"])):
            a, b = state(whole), state(resumed)
            assert a.keys() == b.keys(), name
            pairs = [(k, x, y) for k in a for x, y in zip(_tensors(a[k]), _tensors(b[k]), strict=True)]
            assert len(pairs) >= len(rows), name  # every table at least
            for k, x, y in pairs:
                assert torch.equal(x, y), (name, k)

        file_ordered = shutil.copytree(tiny_dataset, tmp_path / "file_ordered")
        del schema["recipe"]["train_order"]  # written before the key: the raw files' order
        (file_ordered / "schema.json").write_text(json.dumps(schema))
        with pytest.raises(UserError, match="keeps its raw files' order.*--shuffle-train"):
            trainer("refused", 4, data=file_ordered)
    finally:
        if owned:
            shutdown()


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a state-dict value (a tensor, or an optimizer's per-parameter dict)."""
    if isinstance(value, dict):
        return [v for _, v in sorted(value.items()) if isinstance(v, torch.Tensor)]
    return [value] if isinstance(value, torch.Tensor) else []
