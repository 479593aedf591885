"""Sharding plans, the embedding optimizer check, and one real 2-rank gloo run of the
DMP-sharded model against the unsharded one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.datasets.utils import Batch
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.helpers import free_port
from tests.test_paper_recipe import check_dense_adam_replicas
from trainer.data.schema import SparseField
from trainer.errors import UserError
from trainer.job_config import EmbeddingConfig, ModelConfig
from trainer.model import MultiEmbeddingCTR
from trainer.embedding_optim import apply_embedding_optimizer, combined_optimizer, embedding_optimizer, row_sparse_optimizer
from trainer.job_config import ShardingConfig
from trainer.plan_table import plan_placements, render_plan
from trainer.sharding import check_sharding_config, local_table_windows, plan_sharding, shard_model

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only passed to checks; nothing is allocated on it
FIELDS = [SparseField("a", 7), SparseField("b", 9), SparseField("c", 5)]


def build(scale: int = 2, table_device: torch.device | None = None) -> MultiEmbeddingCTR:
    config = ModelConfig(name="dcnv2", hidden=8, cross_layers=2)
    return MultiEmbeddingCTR.from_config(FIELDS, config, EmbeddingConfig("me", scale, base_dim=8), seed=0, table_device=table_device)


def features(batch: int, seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, f.cardinality, (batch,), generator=g) for f in FIELDS]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in FIELDS], values=torch.cat(ids), lengths=torch.ones(batch * len(FIELDS), dtype=torch.int32)
    )


def placements(config: ShardingConfig, model: MultiEmbeddingCTR | None = None, world_size: int = 2):
    model = model or build()
    plan = plan_sharding(model, config, world_size, CPU)
    return {p.table: p for p in plan_placements(plan, model.sparse_arch.tables, world_size)}


def test_cpu_plan_for_two_ranks_uses_both_ranks():
    model = build(scale=3)
    by_table = placements(ShardingConfig(), model)
    assert set(by_table) == {t.table for t in model.sparse_arch.tables}
    assert {rank for p in by_table.values() for rank in p.ranks} == {0, 1}
    assert all(p.sharding_type in ("data_parallel", "table_wise", "column_wise", "table_column_wise") for p in by_table.values())


def test_constraints_are_honoured_with_table_over_field_over_global_precedence():
    config = ShardingConfig(
        sharding_types=("table_wise",),
        per_field={"a": ("data_parallel",)},
        per_table={"set1__a": ("column_wise",), "set*__c": ("table_column_wise",)},
    )
    by_table = placements(config)
    assert by_table["set0__a"].sharding_type == "data_parallel"
    assert by_table["set0__a"].ranks == [0, 1]
    assert by_table["set1__a"].sharding_type == "column_wise"
    assert by_table["set0__c"].sharding_type == by_table["set1__c"].sharding_type == "table_column_wise"
    for table in ("set0__b", "set1__b"):
        assert by_table[table].sharding_type == "table_wise"
        assert len(by_table[table].ranks) == 1
        assert by_table[table].shard_sizes == [[9, 8]]


@pytest.mark.parametrize("types", [("row_wise",), ("table_row_wise",)])
def test_row_wise_on_cpu_names_the_usable_sharding_types(types):
    with pytest.raises(UserError) as info:
        plan_sharding(build(), ShardingConfig(sharding_types=types), 2, CPU)
    message = str(info.value)
    assert types[0] in message and "cpu" in message
    for usable in ("data_parallel", "table_wise", "column_wise", "table_column_wise"):
        assert usable in message
    check_sharding_config(ShardingConfig(sharding_types=types), build().sparse_arch.tables, CUDA)  # fine on CUDA


def test_row_wise_per_field_on_cpu_is_refused_too():
    with pytest.raises(UserError, match=r"per_field\['b'\].*row_wise.*cannot run on cpu"):
        plan_sharding(build(), ShardingConfig(per_field={"b": ("row_wise",)}), 2, CPU)


def test_a_plan_over_the_storage_cap_is_a_user_error():
    with pytest.raises(UserError, match="does not fit.*6 embedding tables.*2 cpu ranks with 4096 bytes of DDR each"):
        plan_sharding(build(), ShardingConfig(storage_cap_bytes=4096), 2, CPU)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ShardingConfig(sharding_types=("diagonal",)), "unknown sharding types \\['diagonal'\\]"),
        (lambda: ShardingConfig(per_field={"a": ()}), "per_field\\['a'\\]: empty list"),
        (lambda: ShardingConfig(storage_cap_bytes=0), "storage_cap_bytes 0"),
    ],
)
def test_bad_sharding_configs(make, message):
    with pytest.raises(UserError, match=message):
        make()


@pytest.mark.parametrize(
    "config, message",
    [
        (ShardingConfig(per_field={"zz": ("table_wise",)}), "unknown fields \\['zz'\\]"),
        (ShardingConfig(per_table={"set7__*": ("table_wise",)}), "matches no table"),
    ],
)
def test_constraints_that_name_nothing_are_user_errors(config, message):
    with pytest.raises(UserError, match=message):
        plan_sharding(build(), config, 2, CPU)


def test_rendered_plan_lists_every_set_and_field():
    model = build(scale=3)
    plan = plan_sharding(model, ShardingConfig(per_field={"b": ("data_parallel",)}), 2, CPU)
    text = render_plan(plan, model.sparse_arch.tables, 2)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["set", "field", "table", "sharding"]
    rows = [line.split() for line in lines[2:]]
    assert {(int(r[0]), r[1]) for r in rows} == {(m, f.name) for m in range(3) for f in FIELDS}
    for r in rows:
        assert r[2] == f"set{r[0]}__{r[1]}"
    dp_rows = [r for r in rows if r[1] == "b"]
    assert all(r[3] == "data_parallel" and r[5] == "0,1" and r[6:] == ["9x8", "9x8"] for r in dp_rows)


def test_embedding_optimizer_check_by_device():
    for name in ("sgd", "adagrad", "rowwise_adagrad"):
        assert embedding_optimizer(name, CPU, lr=0.1).name == name
    with pytest.raises(UserError) as info:
        embedding_optimizer("adam", CPU, lr=0.1)
    assert "'adam'" in str(info.value) and "['sgd', 'adagrad', 'rowwise_adagrad', 'dense_adam']" in str(info.value)
    adam = embedding_optimizer("adam", CUDA, lr=0.1)
    assert adam.emb_opt_type.value == "adam"
    with pytest.raises(UserError, match="expected one of"):
        embedding_optimizer("lamb", CUDA, lr=0.1)
    with pytest.raises(UserError, match="lr 0"):
        embedding_optimizer("sgd", CPU, lr=0)
    rowwise = embedding_optimizer("rowwise_adagrad", CPU, lr=0.05, eps=1e-6)
    assert rowwise.emb_opt_type.value == "exact_row_wise_adagrad"
    assert (rowwise.kwargs["lr"], rowwise.kwargs["eps"]) == (0.05, 1e-6)
    assert "eps" not in embedding_optimizer("sgd", CPU, lr=0.1).kwargs
    # weight decay: kept where FBGEMM's kernels apply it (CUDA), dropped and reported on CPU
    cuda = embedding_optimizer("rowwise_adagrad", CUDA, lr=0.05, weight_decay=1e-6)
    assert (cuda.kwargs["weight_decay"], cuda.dropped_weight_decay) == (1e-6, 0.0)
    cpu = embedding_optimizer("rowwise_adagrad", CPU, lr=0.05, weight_decay=1e-6)
    assert (cpu.kwargs["weight_decay"], cpu.dropped_weight_decay) == (0.0, 1e-6)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad"])
def test_embedding_optimizer_runs_in_backward_on_the_unsharded_model(name):
    model = build(scale=1)
    apply_embedding_optimizer(model, embedding_optimizer(name, CPU, lr=0.5))
    table = model.sparse_arch.embedding_bag_collection.embedding_bags["set0__a"].weight
    before = table.detach().clone()
    model(features(4, seed=0)).sum().backward()
    assert not torch.equal(before, table.detach())
    assert table.grad is None  # consumed by the in-backward optimizer


# ---- a real 2-rank run ---------------------------------------------------------------


class _TrainWrapper(torch.nn.Module):
    """What a training loop shards: model + loss, fed a torchrec ``Batch``."""

    def __init__(self, model: MultiEmbeddingCTR) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch):
        logits = self.model(batch.sparse_features)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _same_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return all(torch.equal(gathered[0], t) for t in gathered[1:])


def _windows(sharded) -> dict[tuple[str, int, int], torch.Tensor]:
    return {(t.table, row, col): w.detach().clone() for t, w, row, col in local_table_windows(sharded)}


# tables placed by the planner with every CPU sharding type in play
MIXED = ShardingConfig(
    sharding_types=("table_wise",),
    per_field={"a": ("data_parallel",)},
    per_table={"set1__c": ("column_wise",), "set0__b": ("table_column_wise",)},
)


def _check_forward(rank: int, world_size: int) -> None:
    """Sharded forward == unsharded forward, for a planner plan over meta tables and a
    hand-made plan that splits columns across ranks."""
    reference = build()
    reference.eval()
    full, keys = reference.state_dict(), reference.embedding_weight_keys()
    key_of = {table: keys[set_field] for set_field, table in reference.sparse_arch.table_names().items()}
    batch = features(8, seed=11)  # the same batch on both ranks
    emb_opt = embedding_optimizer("rowwise_adagrad", CPU, lr=0.5)

    planned = build(table_device=torch.device("meta"))  # no rank allocates whole tables
    apply_embedding_optimizer(planned, emb_opt)
    plan = plan_sharding(planned, MIXED, world_size, CPU, pg=dist.group.WORLD)
    manual = build()
    apply_embedding_optimizer(manual, emb_opt)
    split = {"set0__a": column_wise(ranks=[0, 1]), "set1__b": column_wise(ranks=[1, 0])}
    manual_plan = ShardingPlan(
        {
            "sparse_arch.embedding_bag_collection": construct_module_sharding_plan(
                manual.sparse_arch.embedding_bag_collection,
                {t.table: split.get(t.table, table_wise(rank=t.set_index)) for t in manual.sparse_arch.tables},
                local_size=world_size,
                world_size=world_size,
                device_type="cpu",
            )
        }
    )
    for model, model_plan in ((planned, plan), (manual, manual_plan)):
        sharded = shard_model(model, model_plan, CPU)
        # every local shard holds its window of the seeded full table ...
        windows = _windows(sharded)
        for (table, row, col), weight in windows.items():
            expected = full[key_of[table]][row : row + weight.shape[0], col : col + weight.shape[1]]
            assert torch.equal(weight, expected), (rank, table, row, col)
        if model is manual:  # set0__a's columns really are split: 0-3 on rank 0, 4-7 on rank 1
            assert [(w.shape[1], c) for (t, _, c), w in windows.items() if t == "set0__a"] == [(4, 4 * rank)]
        # ... so the sharded model computes the unsharded one's function
        sharded.eval()
        with torch.no_grad():
            torch.testing.assert_close(sharded(batch), reference(batch), rtol=0, atol=1e-6)


def _check_training_step(rank: int, world_size: int) -> None:
    """One step: fused tables, replicated (data-parallel) tables and dense layers all move."""
    emb_opt = embedding_optimizer("rowwise_adagrad", CPU, lr=0.5)
    model = build()
    apply_embedding_optimizer(model, emb_opt)
    sharded = shard_model(model, plan_sharding(model, MIXED, world_size, CPU, pg=dist.group.WORLD), CPU)
    optimizer = combined_optimizer(sharded, emb_opt, _adam)
    before, dense_before = _windows(sharded), sharded.module.tail[1].weight.detach().clone()
    sharded.train()
    local = features(8, seed=100 + rank)  # each rank its own batch
    torch.nn.functional.binary_cross_entropy_with_logits(sharded(local), torch.ones(8)).backward()
    optimizer.step()
    optimizer.zero_grad()
    after = _windows(sharded)
    assert [k for k in before if torch.equal(before[k], after[k])] == [], rank
    assert not torch.equal(dense_before, sharded.module.tail[1].weight)
    state = optimizer.state_dict()["state"]
    assert any(k.startswith("fused.") and any("momentum1" in s for s in v) for k, v in state.items())
    assert state[f"replicated_tables.{model.embedding_weight_keys()[(0, 'a')]}"]
    # replicas and dense weights stay identical across ranks
    assert _same_on_all_ranks(after[("set0__a", 0, 0)])
    assert _same_on_all_ranks(sharded.module.tail[1].weight)


def _check_pipeline(rank: int, world_size: int) -> None:
    """The model inside a training wrapper, trained through TrainPipelineSparseDist (which
    fx-traces it)."""
    emb_opt = embedding_optimizer("rowwise_adagrad", CPU, lr=0.5)
    wrapper = _TrainWrapper(build())
    apply_embedding_optimizer(wrapper, emb_opt)
    sharded = shard_model(wrapper, plan_sharding(wrapper, MIXED, world_size, CPU, pg=dist.group.WORLD), CPU)
    table_keys = {k for k in sharded.state_dict() if "embedding_bags" in k}
    assert table_keys == {f"model.{k}" for k in wrapper.model.embedding_weight_keys().values()}
    before = _windows(sharded)
    pipeline = TrainPipelineSparseDist(sharded, combined_optimizer(sharded, emb_opt, _adam), CPU)
    g = torch.Generator().manual_seed(rank)
    labels = torch.randint(0, 2, (3, 8), generator=g)
    batches = iter([Batch(torch.empty(8, 0), features(8, seed=200 + 10 * i + rank), labels[i]) for i in range(3)])
    losses = []
    with pytest.raises(StopIteration):
        while True:
            losses.append(pipeline.progress(batches)[0])
    assert len(losses) == 3 and all(torch.isfinite(loss) for loss in losses)
    after = _windows(sharded)
    assert [k for k in before if torch.equal(before[k], after[k])] == [], rank


def _two_rank_worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # a plan that fails on rank 0 fails on every rank, nobody is left waiting
        with pytest.raises(UserError, match="does not fit"):
            plan_sharding(build(), ShardingConfig(storage_cap_bytes=4096), world_size, CPU, pg=dist.group.WORLD)
        _check_forward(rank, world_size)
        _check_training_step(rank, world_size)
        _check_pipeline(rank, world_size)
        # different batches per rank: a fused table's gradient (all-to-all, divided by the
        # world size) and a replica's (DDP's mean) are the same, so plain SGD agrees too
        _check_placements_agree(_train_in_both_placements("sgd", rank, world_size))
        check_dense_adam_replicas(rank, world_size)  # dense_adam: every table replicated, stepped whole
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_model_on_two_gloo_ranks_matches_unsharded_and_trains():
    mp.spawn(_two_rank_worker, args=(2, free_port()), nprocs=2, join=True)


# ---- replicated tables train like fused ones ----------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_row_sparse_optimizer_changes_only_looked_up_rows_and_their_state(name, weight_decay):
    """Rows without a gradient keep their weights and optimizer state, also for Adam,
    whose momentum would otherwise keep moving a row after it was last looked up, and
    weight decay reaches only the rows looked up."""
    optimizer_class = embedding_optimizer(name, CUDA, lr=0.1).optimizer_class  # CUDA: every name, adam included
    table = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    opt = row_sparse_optimizer(optimizer_class, [table], {"lr": 0.1, "weight_decay": weight_decay})
    for rows in ([0, 2], [1, 2], [5]):
        before = table.detach().clone()
        state_before = {k: v.clone() for k, v in opt.state[table].items() if torch.is_tensor(v)}
        table.grad = torch.zeros_like(table)
        table.grad[rows] = 1.0
        opt.step()
        idle = [r for r in range(6) if r not in rows]
        assert torch.equal(table[idle], before[idle]), (name, rows)
        assert not torch.equal(table[rows], before[rows])
        for k, v in opt.state[table].items():
            if torch.is_tensor(v) and v.dim() and k in state_before:
                assert torch.equal(v[idle], state_before[k][idle]), (name, k)
    # weight decay only where there is a gradient: a zero-gradient step changes nothing
    before = table.detach().clone()
    table.grad = torch.zeros_like(table)
    opt.step()
    assert torch.equal(table, before)


def _train_in_both_placements(name: str, rank: int, world_size: int) -> dict[str, dict]:
    """The same model trained six steps with every table ``table_wise`` (fused), then with
    every table ``data_parallel`` (replicated); each rank its own batches of ids 0..2 (the
    other rows are never looked up), the embedding optimizer asked for weight decay.
    Returns placement -> this rank's table windows."""
    g = torch.Generator().manual_seed(5 + rank)
    steps = [
        KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in FIELDS],
            values=torch.randint(0, 3, (8 * len(FIELDS),), generator=g),
            lengths=torch.ones(8 * len(FIELDS), dtype=torch.int32),
        )
        for _ in range(6)
    ]
    labels = torch.randint(0, 2, (6, 8), generator=g).float()
    out = {}
    for placement in ("table_wise", "data_parallel"):
        emb_opt = embedding_optimizer(name, CPU, lr=0.1, weight_decay=0.05)
        model = build()
        apply_embedding_optimizer(model, emb_opt)
        plan = plan_sharding(model, ShardingConfig(sharding_types=(placement,)), world_size, CPU, pg=dist.group.WORLD)
        sharded = shard_model(model, plan, CPU)
        optimizer = combined_optimizer(sharded, emb_opt, _adam)
        sharded.train()
        torch.manual_seed(rank)  # the same dropout masks for both placements
        for kjt, y in zip(steps, labels):
            torch.nn.functional.binary_cross_entropy_with_logits(sharded(kjt), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        out[placement] = _windows(sharded)
    return out


def _check_placements_agree(out: dict[str, dict]) -> None:
    """Every table this rank holds fused has the weights of its replica, and rows never
    looked up are still at their initial value in both."""
    reference = build()
    init, keys = reference.state_dict(), reference.embedding_weight_keys()
    key_of = {table: keys[set_field] for set_field, table in reference.sparse_arch.table_names().items()}
    fused, replicated = out["table_wise"], out["data_parallel"]
    assert fused and set(fused) <= set(replicated)
    for (table, row, col), weight in fused.items():
        twin = replicated[(table, row, col)]
        torch.testing.assert_close(twin, weight, rtol=1e-5, atol=1e-6, msg=table)
        start = init[key_of[table]]
        assert torch.equal(weight[3:], start[3:]) and torch.equal(twin[3:], start[3:]), table
        assert not torch.equal(weight[:3], start[:3]), table


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad"])
def test_a_table_trains_the_same_fused_or_replicated(name):
    """The planner's placement is not a training hyper-parameter: the same tables, batches
    and embedding optimizer (weight decay asked for, which CPU kernels lack) give the same
    weights whether the tables are fused (table_wise) or replicated (data_parallel), and
    rows never looked up keep their initial value in both. (Before: replicated tables were
    stepped densely with weight decay and every idle row shrank.) Two ranks: see
    ``_two_rank_worker``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        _check_placements_agree(_train_in_both_placements(name, 0, 1))
    finally:
        dist.destroy_process_group()


def test_grouped_rowwise_adagrad_steps_blocks_of_replicated_tables_like_rowwise_adagrad():
    """Replicated tables of one flat FBGEMM weight (TorchRec's per-table views) are stepped as
    one block, bit for bit as TorchRec's RowWiseAdagrad steps them one by one: weights, the
    per-table state (same keys and shapes), idle rows untouched, in-place state loading."""
    from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from trainer.embedding_optim import GroupedRowWiseAdagrad

    shapes = [(5, 4), (7, 4), (3, 8), (4, 4)]  # a 4-wide block, an 8-wide table, a lone 4-wide table

    def tables(flat):
        out, offset = {}, 0
        for i, (rows, cols) in enumerate(shapes):
            out[f"t{i}"] = TableBatchedEmbeddingSlice(flat, offset, offset + rows * cols, rows, cols)
            offset += rows * cols
        return out

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(sum(r * c for r, c in shapes), generator=generator)
    flats = [start.clone().requires_grad_() for _ in range(2)]
    params = [tables(f) for f in flats]
    optims = [
        KeyedOptimizerWrapper(params[0], lambda p: RowWiseAdagrad(p, lr=0.1, eps=1e-8)),
        KeyedOptimizerWrapper(params[1], lambda p: GroupedRowWiseAdagrad(p, lr=0.1, eps=1e-8)),
    ]
    grouped = optims[1]._optimizer
    assert [[t.shape for t in block] for block, _ in grouped._blocks] == [[(5, 4), (7, 4)]]
    for step in range(4):
        grad = torch.randn(start.shape, generator=generator)
        grad[:4] = 0  # rows 0 of t0 never looked up
        for flat, optim in zip(flats, optims):
            flat.grad = grad.clone()
            optim.step()
        if step == 1:  # a checkpoint round trip, loaded in place as DCP does
            saved = optims[0].state_dict()
            optims[1].load_state_dict(saved)
    assert torch.equal(flats[0], flats[1])
    assert torch.equal(flats[1][:4], start[:4])
    reference, ours = optims[0].state_dict()["state"], optims[1].state_dict()["state"]
    assert reference.keys() == ours.keys()
    for key in reference:
        for name in ("sum", "step"):
            assert reference[key][name].shape == ours[key][name].shape
            assert torch.equal(reference[key][name], ours[key][name]), (key, name)
