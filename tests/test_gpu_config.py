"""The GPU-cluster choices (config keys): refused where the device cannot run them, planned
by TorchRec's planner on a CUDA topology (plans are made on CPU: nothing is allocated on
the GPU), and fp16 tables / bf16 dense autocast on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import train, user_error
from trainer.data.schema import SparseField
from trainer.embedding_optim import apply_embedding_optimizer, embedding_optimizer
from trainer.errors import UserError
from trainer.job_config import EmbeddingConfig, ModelConfig, ShardingConfig, TrainConfig, load_config
from trainer.model import MultiEmbeddingCTR
from trainer.sharding import check_device_support, memory_caps, plan_sharding
from trainer.train import autocast_dense

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only planned for; nothing is allocated on it
FIELDS = [SparseField("a", 100_000), SparseField("b", 50_000)]  # 150k rows of dim 16: 9.6 MB of fp32


def config(*overrides: str) -> TrainConfig:
    return load_config(None, ["data.path=unused", *overrides])


def build(data_type: str = "fp32", device: torch.device = CUDA) -> MultiEmbeddingCTR:
    model = MultiEmbeddingCTR.from_config(
        FIELDS, ModelConfig(name="dcnv2", hidden=8, cross_layers=1), EmbeddingConfig("me", 1, 16, data_type=data_type),
        seed=0, table_device=torch.device("meta"),
    )
    apply_embedding_optimizer(model, embedding_optimizer("rowwise_adagrad", device, lr=0.1))
    return model


def placements(model, sharding: ShardingConfig, world_size: int = 2, device: torch.device = CUDA):
    plan = plan_sharding(model, sharding, world_size, device)
    return plan.plan["sparse_arch.embedding_bag_collection"]


# ---- device checks -----------------------------------------------------------------

@pytest.mark.parametrize(
    "override, needles",
    [
        ("sharding.compute_kernel=fused_uvm_caching", ["sharding.compute_kernel", "fused_uvm_caching", "cuda", "cpu"]),
        ("optim.embedding=adam", ["optim.embedding", "'adam'", "cuda", "cpu"]),
        ("sharding.sharding_types=[row_wise]", ["sharding_types", "row_wise", "cannot run on cpu"]),
    ],
)
def test_cuda_only_choices_are_refused_on_cpu_naming_key_and_device(override, needles):
    c = config(override)
    check_device_support(c, CUDA)  # fine on CUDA
    with pytest.raises(UserError) as info:
        check_device_support(c, CPU)
        plan_sharding(build(device=CPU) if "adam" not in override else None, c.sharding, 2, CPU)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("override", ["embedding.data_type=fp16", "train.dense_autocast=bf16", "sharding.compute_kernel=fused"])
def test_choices_cpu_runs_pass_the_device_check(override):
    check_device_support(config(override), CPU)
    check_device_support(config(override), CUDA)


def test_a_memory_cap_set_twice_is_refused_for_the_device_own_memory():
    both_hbm = config("sharding.storage_cap_bytes=1000", "sharding.hbm_cap_bytes=2000")
    with pytest.raises(UserError, match="storage_cap_bytes and sharding.hbm_cap_bytes both cap the HBM"):
        check_device_support(both_hbm, CUDA)
    check_device_support(both_hbm, CPU)  # on CPU storage_cap_bytes is DDR
    assert memory_caps(both_hbm.sharding, CPU) == (2000, 1000)
    both_ddr = config("sharding.storage_cap_bytes=1000", "sharding.ddr_cap_bytes=2000")
    with pytest.raises(UserError, match="both cap the DDR"):
        check_device_support(both_ddr, CPU)
    assert memory_caps(both_ddr.sharding, CUDA) == (1000, 2000)


@pytest.mark.parametrize(
    "override, message",
    [
        ("sharding.compute_kernel=uvm", "sharding.compute_kernel 'uvm'"),
        ("sharding.uvm_cache_load_factor=0", "uvm_cache_load_factor 0"),
        ("sharding.hbm_cap_bytes=0", "hbm_cap_bytes 0"),
        ("embedding.data_type=bf16", "embedding.data_type 'bf16'"),
        ("train.dense_autocast=fp16", "train.dense_autocast 'fp16'"),
    ],
)
def test_bad_values_are_refused_at_load(override, message):
    with pytest.raises(UserError, match=message):
        config(override)


@pytest.mark.slow
def test_cli_refuses_uvm_caching_on_cpu_before_writing_anything(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(f"data.path={tiny_dataset}", f"run.dir={run_dir}", "run.device=cpu",
                 "sharding.compute_kernel=fused_uvm_caching")
    user_error(proc, "sharding.compute_kernel", "fused_uvm_caching", "cuda", "cpu")
    assert not run_dir.exists()


# ---- planning on a CUDA topology ----------------------------------------------------

def test_uvm_caching_is_planned_with_its_cache_when_asked():
    by_table = placements(build(), ShardingConfig(compute_kernel="fused_uvm_caching", uvm_cache_load_factor=0.3))
    assert {p.compute_kernel for p in by_table.values()} == {"fused_uvm_caching"}
    assert {p.cache_params.load_factor for p in by_table.values()} == {0.3}
    fused = placements(build(), ShardingConfig(compute_kernel="fused"))
    assert {p.compute_kernel for p in fused.values()} == {"fused"}
    assert all(p.sharding_type != "data_parallel" for p in fused.values())


def test_hbm_cap_too_small_for_fused_but_enough_for_the_cache():
    small = 3_000_000  # < the fused tables' 9.6 MB over 2 ranks, > a 20% cache
    with pytest.raises(UserError, match="does not fit.*with 3000000 bytes of HBM.*fused_uvm_caching keeps tables in host"):
        placements(build(), ShardingConfig(compute_kernel="fused", hbm_cap_bytes=small))
    by_table = placements(build(), ShardingConfig(compute_kernel="fused_uvm_caching", hbm_cap_bytes=small))
    assert {p.compute_kernel for p in by_table.values()} == {"fused_uvm_caching"}
    with pytest.raises(UserError) as info:
        placements(build(), ShardingConfig(compute_kernel="fused_uvm_caching", hbm_cap_bytes=20_000, ddr_cap_bytes=10**9))
    message = str(info.value)
    assert "sharding plan does not fit" in message and "fused_uvm_caching kernel" in message
    assert "20000 bytes of HBM and 1000000000 bytes of DDR" in message and "hbm_cap_bytes" in message


def row_shards(param) -> list[tuple[int, int, str]]:
    """(rank, rows, device) of each shard of a row-split table, in row order; checks that the
    shards tile the table: contiguous rows, every column."""
    shards = sorted(param.sharding_spec.shards, key=lambda s: s.shard_offsets[0])
    assert all(s.shard_offsets[1] == 0 for s in shards), shards
    ends = [s.shard_offsets[0] + s.shard_sizes[0] for s in shards]
    assert [s.shard_offsets[0] for s in shards] == [0, *ends[:-1]], shards
    return [(s.placement.rank(), s.shard_sizes[0], str(s.placement.device())) for s in shards]


def test_row_wise_splits_every_table_by_rows_across_all_ranks():
    model = build()
    cardinality = {t.table: t.cardinality for t in model.sparse_arch.tables}
    by_table = placements(model, ShardingConfig(sharding_types=("row_wise",)), world_size=4)
    assert set(by_table) == set(cardinality)
    for table, p in by_table.items():
        assert p.sharding_type == "row_wise" and p.ranks == [0, 1, 2, 3], (table, p)
        shards = row_shards(p)
        assert [rank for rank, _, _ in shards] == [0, 1, 2, 3]
        assert sum(rows for _, rows, _ in shards) == cardinality[table]
        assert [device for _, _, device in shards] == [f"cuda:{r}" for r in range(4)]


def test_table_row_wise_keeps_each_table_within_one_host():
    """2 hosts of 2 GPUs: a table's rows are split over the ranks of one host (its all-to-all
    stays on the host's NVLink), and the tables are spread over both hosts."""
    model = build()
    cardinality = {t.table: t.cardinality for t in model.sparse_arch.tables}
    config = ShardingConfig(sharding_types=("table_row_wise",))
    by_table = plan_sharding(model, config, 4, CUDA, local_world_size=2).plan["sparse_arch.embedding_bag_collection"]
    assert set(by_table) == set(cardinality)
    hosts = set()
    for table, p in by_table.items():
        assert p.sharding_type == "table_row_wise", (table, p)
        shards = row_shards(p)
        ranks = [rank for rank, _, _ in shards]
        assert sorted(ranks) == p.ranks and len(ranks) == 2 and len({r // 2 for r in ranks}) == 1, (table, ranks)
        assert sum(rows for _, rows, _ in shards) == cardinality[table]
        assert [device for _, _, device in shards] == [f"cuda:{r % 2}" for r in ranks]  # the device index on its host
        hosts.add(ranks[0] // 2)
    assert hosts == {0, 1}
    # one host of 4: the same config splits each table over all four ranks
    one_host = placements(model, config, world_size=4)
    assert all(p.ranks == [0, 1, 2, 3] for p in one_host.values())


def test_fp16_tables_take_half_the_planned_memory():
    cap = ShardingConfig(compute_kernel="fused", hbm_cap_bytes=9_000_000)  # fp32 needs ~12.3 MB, fp16 ~6.3 MB
    with pytest.raises(UserError, match="9600000 bytes of fp32 weights"):
        placements(build("fp32"), cap, world_size=1)
    placements(build("fp16"), cap, world_size=1)
    with pytest.raises(UserError, match="4800000 bytes of fp16 weights"):
        placements(build("fp16"), ShardingConfig(compute_kernel="fused", hbm_cap_bytes=4_000_000), world_size=1)


# ---- fp16 tables and bf16 autocast on CPU -------------------------------------------

def small_model(data_type: str) -> MultiEmbeddingCTR:
    fields = [SparseField("a", 7), SparseField("b", 9)]
    return MultiEmbeddingCTR.from_config(fields, ModelConfig(name="dcnv2", hidden=8, cross_layers=1),
                                         EmbeddingConfig("me", 2, 4, data_type=data_type), seed=0)


def test_fp16_tables_hold_the_seeded_values_and_look_up_as_float32():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    fp32, fp16 = small_model("fp32"), small_model("fp16")
    bags32 = fp32.sparse_arch.embedding_bag_collection.embedding_bags
    bags16 = fp16.sparse_arch.embedding_bag_collection.embedding_bags
    for name, bag in bags16.items():
        assert bag.weight.dtype == torch.float16
        torch.testing.assert_close(bag.weight.float(), bags32[name].weight.detach(), atol=1e-3, rtol=1e-3)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([0, 6, 8, 1]),
                                              lengths=torch.ones(4, dtype=torch.int32))
    emb = fp16.sparse_arch(kjt)
    assert emb.dtype == torch.float32 and emb.shape == (2, 2, 2, 4)
    assert fp16(kjt).dtype == torch.float32


def test_bf16_dense_autocast_on_cpu_returns_float32_logits_and_trains():
    model = small_model("fp32")
    autocast_dense(model, CPU)
    emb = torch.randn(2, 16, 2, 4)
    logits = model.forward_embeddings(emb)
    assert logits.dtype == torch.float32 and logits.shape == (16,)
    F.binary_cross_entropy_with_logits(logits, torch.ones(16)).backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    grads = [p.grad for n, p in model.named_parameters() if "sparse_arch" not in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_fp16_tables_are_never_replicated():
    by_table = placements(small_model("fp16"), ShardingConfig(), device=CPU)
    assert by_table and all(p.sharding_type != "data_parallel" for p in by_table.values())
    with pytest.raises(UserError, match="embedding.data_type 'fp16' cannot be data_parallel"):
        placements(small_model("fp16"), ShardingConfig(per_field={"a": ("data_parallel",)}), device=CPU)
