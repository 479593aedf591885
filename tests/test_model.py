"""The multi-embedding CTR model, single process: shapes, parameter counts, seeded init,
output built by key, the DCNv2 cross layer, config errors."""

from __future__ import annotations

import pytest
import torch
import torchrec.fx
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import trainer.model.sparse_arch as sparse_arch_module
from trainer.data.schema import SparseField
from trainer.errors import UserError
from trainer.job_config import EmbeddingConfig, ModelConfig
from trainer.model import (
    INTERACTIONS,
    DCNv2Interaction,
    DNNInteraction,
    MultiEmbeddingCTR,
    MultiEmbeddingSparseArch,
    init_table_,
)

FIELDS = [SparseField("a", 5), SparseField("b", 7), SparseField("c", 3)]


def features(fields: list[SparseField], batch: int, seed: int = 0, order: list[str] | None = None) -> KeyedJaggedTensor:
    """A KJT with one id per field per row, keys in ``order`` (default: the fields' order)."""
    g = torch.Generator().manual_seed(seed)
    ids = {f.name: torch.randint(0, f.cardinality, (batch,), generator=g) for f in fields}
    keys = order or [f.name for f in fields]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([ids[k] for k in keys]),
        lengths=torch.ones(batch * len(keys), dtype=torch.int32),
    )


def build(name: str = "dcnv2", mode: str = "me", scale: int = 2, seed: int = 0, **kw) -> MultiEmbeddingCTR:
    config = ModelConfig(name=name, hidden=8, **kw)
    return MultiEmbeddingCTR.from_config(FIELDS, config, EmbeddingConfig(mode, scale, base_dim=4), seed=seed)


@pytest.mark.parametrize("scale", [1, 2, 10])
@pytest.mark.parametrize("mode", ["se", "me"])
@pytest.mark.parametrize("name", ["dnn", "dcnv2"])
def test_forward_backward_shapes(name, mode, scale):
    model = build(name, mode, scale)
    num_sets = scale if mode == "me" else 1
    dim = 4 if mode == "me" else 4 * scale
    kjt = features(FIELDS, batch=6)
    embeddings = model.sparse_arch(kjt)
    assert embeddings.shape == (num_sets, 6, len(FIELDS), dim)
    logits = model(kjt)
    assert logits.shape == (6,)
    logits.sum().backward()
    for weight in model.sparse_arch.parameters():
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.tail.parameters())


def test_single_embedding_is_the_reference_mlp():
    model = build("dnn", "se", scale=3)
    assert len(model.interactions) == len(model.projections) == 1
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(len(FIELDS) * 12, 8), (8, 8), (8, 1)]


@pytest.mark.parametrize("scale", [1, 2, 3, 4, 10])
def test_se_and_me_hold_the_same_number_of_embedding_parameters(scale):
    se, me = EmbeddingConfig("se", scale), EmbeddingConfig("me", scale)
    assert (se.num_sets, se.dim) == (1, 10 * scale)
    assert (me.num_sets, me.dim) == (scale, 10)
    archs = [MultiEmbeddingSparseArch(FIELDS, c.num_sets, c.dim, seed=0) for c in (se, me)]
    used = [sum(t.cardinality * t.dim for t in arch.tables) for arch in archs]
    assert used[0] == used[1] == sum(f.cardinality for f in FIELDS) * 10 * scale
    # stored tables are padded to a multiple of 4 columns for FBGEMM, never narrower
    stored = [sum(p.numel() for p in arch.parameters()) for arch in archs]
    assert all(s >= u for s, u in zip(stored, used))


def test_padding_columns_are_zero_and_never_reach_the_model():
    arch = MultiEmbeddingSparseArch(FIELDS, num_sets=2, dim=10, seed=0)
    weights = [arch.embedding_bag_collection.embedding_bags[t.table].weight for t in arch.tables]
    assert all(w.shape[1] == 12 and torch.count_nonzero(w[:, 10:]) == 0 for w in weights)
    arch(features(FIELDS, 4, seed=0)).sum().backward()
    assert all(torch.count_nonzero(w.grad[:, 10:]) == 0 and torch.count_nonzero(w.grad[:, :10]) > 0 for w in weights)


def test_seeded_init_is_reproducible_and_sets_differ():
    first, again, other = build(seed=3).state_dict(), build(seed=3).state_dict(), build(seed=4).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    model = build(seed=3)
    keys = model.embedding_weight_keys()
    for field in ("a", "b", "c"):
        set0, set1 = first[keys[(0, field)]], first[keys[(1, field)]]
        assert not torch.equal(set0, set1)
        assert not torch.equal(set0, other[keys[(0, field)]])
        bound = (1.0 / set0.shape[0]) ** 0.5
        assert set0.abs().max() <= bound
    assert not torch.equal(first["tail.1.weight"], other["tail.1.weight"])


def test_table_windows_are_slices_of_the_full_table(monkeypatch):
    monkeypatch.setattr(sparse_arch_module, "INIT_BLOCK_ROWS", 4)  # several row blocks
    arch = MultiEmbeddingSparseArch([SparseField("a", 11)], num_sets=2, dim=6, seed=5)
    table = arch.tables[1]
    assert table.storage_dim == 8
    full = init_table_(torch.empty(11, 8), table, seed=5)
    assert torch.equal(full, arch.embedding_bag_collection.embedding_bags[table.table].weight.detach())
    for rows, cols, row, col in [(5, 8, 3, 0), (11, 2, 0, 4), (7, 3, 4, 3), (0, 6, 4, 0), (3, 4, 0, 4)]:
        window = init_table_(torch.empty(rows, cols), table, seed=5, row_offset=row, col_offset=col)
        assert torch.equal(window, full[row : row + rows, col : col + cols])


def test_table_names_and_weight_keys_cover_every_set_and_field():
    model = build(scale=3)
    expected = {(m, f.name) for m in range(3) for f in FIELDS}
    assert set(model.sparse_arch.table_names()) == expected
    assert model.sparse_arch.table_names()[(2, "b")] == "set2__b"
    keys = model.embedding_weight_keys()
    assert set(keys) == expected
    state = model.state_dict()
    assert all(state[keys[(m, f)]].shape == (dict((x.name, x.cardinality) for x in FIELDS)[f], 4) for m, f in expected)


def test_embeddings_are_assembled_by_key_not_position():
    model = build(scale=2)
    model.eval()
    kjt = features(FIELDS, batch=5, seed=1)
    permuted = features(FIELDS, batch=5, seed=1, order=["c", "a", "b"])
    with torch.no_grad():
        assert torch.equal(model(kjt), model(permuted))
        pooled = model.sparse_arch.embedding_bag_collection(kjt)
        by_key = pooled.to_dict()
        reordered_keys = list(reversed(pooled.keys()))
        reordered = KeyedTensor.from_tensor_list(reordered_keys, [by_key[k] for k in reordered_keys])
        stacked = model.sparse_arch.stack(reordered)
        assert torch.equal(stacked, model.sparse_arch.stack(pooled))
    # set 1 of field "b" is exactly the lookup of set1__b
    table = model.sparse_arch.embedding_bag_collection.embedding_bags["set1__b"].weight
    ids_b = kjt.to_dict()["b"].values()
    assert torch.equal(stacked[1, :, 1], table[ids_b].detach())


@pytest.mark.parametrize("mode", ["se", "me"])
@pytest.mark.parametrize("name", sorted(INTERACTIONS))
def test_model_is_fx_traceable(name, mode):
    """TrainPipelineSparseDist fx-traces the model to find its embedding lookups."""
    model = build(name, mode, scale=3, **({"attention_dim": 8} if name == "autoint" else {}))
    model.eval()
    traced = torchrec.fx.symbolic_trace(model)
    kjt = features(FIELDS, batch=4, seed=2)
    with torch.no_grad():
        assert torch.equal(traced(kjt), model(kjt))


def test_dcnv2_cross_layers_match_a_hand_computation():
    interaction = DCNv2Interaction(num_fields=1, dim=2, num_layers=2)
    w0, b0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([0.5, -0.5])
    w1, b1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0])
    with torch.no_grad():
        for layer, (w, b) in enumerate([(w0, b0), (w1, b1)]):
            interaction.cross_net.kernels[layer].copy_(w)
            interaction.cross_net.bias[layer].copy_(b.unsqueeze(1))
    x0 = torch.tensor([2.0, 3.0])
    # x1 = x0 * (W0 x0 + b0) + x0 = [2, 3] * ([8, -3] + [.5, -.5]) + [2, 3] = [19, -7.5]
    x1 = x0 * (w0 @ x0 + b0) + x0
    assert torch.equal(x1, torch.tensor([19.0, -7.5]))
    # x2 = x0 * (W1 x1 + b1) + x1 = [2, 3] * ([-7.5, 19] + [1, 0]) + [19, -7.5] = [6, 49.5]
    x2 = x0 * (w1 @ x1 + b1) + x1
    assert torch.equal(x2, torch.tensor([6.0, 49.5]))
    out = interaction(x0.view(1, 1, 2))
    assert torch.equal(out, x2.view(1, 2))


def test_dnn_interaction_flattens():
    x = torch.randn(4, 3, 5)
    interaction = DNNInteraction(num_fields=3, dim=5)
    assert interaction.output_dim == 15
    assert torch.equal(interaction(x), x.reshape(4, 15))


def test_each_set_has_its_own_interaction_and_projection():
    model = build("dcnv2", "me", scale=3, cross_layers=2)
    assert len(model.interactions) == len(model.projections) == 3
    kernels = [i.cross_net.kernels[0] for i in model.interactions]
    assert len({id(k) for k in kernels}) == 3
    assert not torch.equal(kernels[0], kernels[1])
    assert len(model.interactions[0].cross_net.kernels) == 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: EmbeddingConfig("mixed", 2), "embedding mode 'mixed': expected one of \\['se', 'me'\\]"),
        (lambda: EmbeddingConfig("me", 0), "embedding scale 0"),
        (lambda: EmbeddingConfig("me", "2"), "embedding scale '2'"),
        (lambda: EmbeddingConfig("me", 2, base_dim=-1), "embedding base_dim -1"),
        (lambda: ModelConfig("fm"), "model 'fm': expected one of \\['autoint', 'dcnv2', 'dnn', 'finalmlp', 'ipnn', 'nfwfm', 'xdeepfm'\\]"),
        (lambda: ModelConfig("dnn", dropout=1.0), "dropout 1.0"),
        (lambda: ModelConfig("dnn", hidden=0), "hidden 0"),
        (lambda: ModelConfig("dcnv2", cross_layers=0), "cross_layers 0"),
        (lambda: MultiEmbeddingSparseArch([], 1, 4, seed=0), "at least one sparse field"),
        (lambda: MultiEmbeddingSparseArch([SparseField("a", 3)] * 2, 1, 4, seed=0), "duplicate sparse field names"),
        (lambda: MultiEmbeddingSparseArch([SparseField("a", 0)], 1, 4, seed=0), "cardinality < 1"),
    ],
)
def test_bad_configs_are_user_errors(make, message):
    with pytest.raises(UserError, match=message):
        make()


def test_tables_on_meta_leave_the_dense_init_and_the_callers_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    config, embedding = ModelConfig("dcnv2", hidden=8), EmbeddingConfig("me", 2, base_dim=4)
    on_cpu = MultiEmbeddingCTR.from_config(FIELDS, config, embedding, seed=1)
    on_meta = MultiEmbeddingCTR.from_config(FIELDS, config, embedding, seed=1, table_device=torch.device("meta"))
    assert torch.equal(torch.rand(1), expected_next)
    assert all(p.is_meta for p in on_meta.sparse_arch.parameters())
    dense = {k: v for k, v in on_cpu.state_dict().items() if not k.startswith("sparse_arch.")}
    meta_state = on_meta.state_dict()
    assert all(torch.equal(v, meta_state[k]) for k, v in dense.items())
