"""The paper's model zoo (DNN, DCNv2, IPNN, NFwFM, xDeepFM, FinalMLP, AutoInt), SE and ME:
shapes and parameter counts at scales 1/2/10, torch.export with a dynamic batch, the
appendix theory (a linear interaction makes ME an SE model; every shipped per-set part is
nonlinear), each interaction against its formula, NFwFM's memory bound, config errors,
and every model beating logistic regression on planted synthetic data."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.job_config import load_config
from trainer.data.loader import CTRDataLoader, LoaderConfig
from trainer.data.schema import SparseField
from trainer.data.synthetic import SyntheticConfig, generate
from trainer.errors import UserError
from trainer.eval_metrics import auc
from trainer.job_config import EmbeddingConfig, ModelConfig
from trainer.model import (
    INTERACTIONS,
    BilinearFusion,
    CINInteraction,
    DNNInteraction,
    ExplicitPlusDNNTail,
    IPNNInteraction,
    MultiEmbeddingCTR,
    MultiEmbeddingSparseArch,
    NFwFMInteraction,
    mlp_tail,
)
from trainer.model.interactions.nfwfm import peak_intermediate_elements

FIELDS = [SparseField("a", 5), SparseField("b", 7), SparseField("c", 3), SparseField("d", 4)]
MODELS = sorted(INTERACTIONS)
# small but complete: every model-specific key set below its paper value
SMALL = dict(hidden=8, cin_layers=(4, 3), tower_layers=2, attention_dim=4, attention_heads=2, attention_layers=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine's 2 cores are shared: with one intra-op thread these small ops run
    several times faster than with threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features(batch: int, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, f.cardinality, (batch,), generator=g) for f in FIELDS]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in FIELDS], values=torch.cat(ids), lengths=torch.ones(batch * len(FIELDS), dtype=torch.int32)
    )


def build(name: str, mode: str, scale: int, seed: int = 0, base_dim: int = 4) -> MultiEmbeddingCTR:
    config = ModelConfig(name=name, **SMALL)
    return MultiEmbeddingCTR.from_config(FIELDS, config, EmbeddingConfig(mode, scale, base_dim), seed=seed)


@pytest.mark.parametrize("scale", [1, 2, 10])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_shapes_and_equal_embedding_parameters(name, scale):
    kjt = features(batch=6)
    counts = {}
    for mode in ("se", "me"):
        model = build(name, mode, scale)
        num_sets, dim = (scale, 4) if mode == "me" else (1, 4 * scale)
        assert model.sparse_arch(kjt).shape == (num_sets, 6, len(FIELDS), dim)
        assert len(model.interactions) == len(model.projections) == num_sets
        logits = model(kjt)
        assert logits.shape == (6,) and torch.isfinite(logits).all()
        logits.sum().backward()
        assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in model.sparse_arch.parameters())
        dense = [p for n, p in model.named_parameters() if not n.startswith("sparse_arch.")]
        assert all(p.grad is not None for p in dense)
        counts[mode] = sum(p.numel() for p in model.sparse_arch.parameters())
    assert counts["se"] == counts["me"] == sum(f.cardinality for f in FIELDS) * 4 * scale


class _ForwardEmbeddings(nn.Module):
    """What a serving export traces: the dense part after the lookup."""

    def __init__(self, model: MultiEmbeddingCTR) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.forward_embeddings(embeddings)


@pytest.mark.parametrize("mode", ["se", "me"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_embeddings_exports_with_a_dynamic_batch(name, mode):
    model = build(name, mode, scale=2).eval()
    num_sets, dim = model.sparse_arch.num_sets, model.sparse_arch.dim
    example = torch.randn(num_sets, 5, len(FIELDS), dim)
    exported = torch.export.export(
        _ForwardEmbeddings(model), (example,), dynamic_shapes={"embeddings": {1: Dim("batch")}}
    )
    for batch in (3, 17):
        embeddings = torch.randn(num_sets, batch, len(FIELDS), dim, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(embeddings), model.forward_embeddings(embeddings))


# --- the appendix theory: ME needs a nonlinear per-set interaction ------------------------


def _linear_me_and_its_se(num_sets: int, dim: int, hidden: int) -> tuple[MultiEmbeddingCTR, MultiEmbeddingCTR]:
    """An ME model whose per-set part is linear (flatten -> Linear), and the SE model of dim
    ``M * K`` that the appendix says it equals: tables concatenated per field, projection
    weights stacked (over the concatenated layout) and divided by M, biases averaged, the
    same tail."""
    torch.manual_seed(0)
    num_fields = len(FIELDS)
    me = MultiEmbeddingCTR(
        MultiEmbeddingSparseArch(FIELDS, num_sets, dim, seed=1),
        [DNNInteraction(num_fields, dim) for _ in range(num_sets)],
        [nn.Linear(num_fields * dim, hidden) for _ in range(num_sets)],
        mlp_tail(hidden, dropout=0.0),
    )
    wide = num_sets * dim
    projection = nn.Linear(num_fields * wide, hidden)
    se = MultiEmbeddingCTR(
        MultiEmbeddingSparseArch(FIELDS, 1, wide, seed=2),
        [DNNInteraction(num_fields, wide)],
        [projection],
        mlp_tail(hidden, dropout=0.0),
    )
    me_bags = me.sparse_arch.embedding_bag_collection.embedding_bags
    se_bags = se.sparse_arch.embedding_bag_collection.embedding_bags
    me_tables, se_tables = me.sparse_arch.table_names(), se.sparse_arch.table_names()
    with torch.no_grad():
        for f, field in enumerate(FIELDS):
            for m in range(num_sets):
                cols = slice(m * dim, (m + 1) * dim)
                se_bags[se_tables[(0, field.name)]].weight[:, cols] = me_bags[me_tables[(m, field.name)]].weight[:, :dim]
                # SE input column f * M*K + m*K + k  <->  set m's input column f*K + k
                se_cols = slice(f * wide + m * dim, f * wide + (m + 1) * dim)
                projection.weight[:, se_cols] = me.projections[m].weight[:, f * dim : (f + 1) * dim] / num_sets
        projection.bias.copy_(torch.stack([p.bias for p in me.projections]).mean(dim=0))
        se.tail.load_state_dict(me.tail.state_dict())
    return me.eval(), se.eval()


def test_a_linear_interaction_makes_multi_embedding_a_single_embedding_model():
    me, se = _linear_me_and_its_se(num_sets=3, dim=2, hidden=6)
    kjt = features(batch=32, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(se(kjt), me(kjt), rtol=1e-5, atol=1e-6)
        # and the equality is not vacuous: the sets differ, and so do other inputs' outputs
        assert not torch.allclose(me(kjt), me(features(batch=32, seed=5)))


@pytest.mark.parametrize("name", MODELS)
def test_every_shipped_per_set_part_is_nonlinear(name):
    """An affine g has g(a + b) + g(0) == g(a) + g(b); the shipped per-set parts
    (projection after interaction) must not, or ME collapses to SE."""
    model = build(name, "me", scale=2).eval()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(8, len(FIELDS), 4, generator=g) for _ in range(2))
    zero = torch.zeros_like(a)
    with torch.no_grad():
        for interaction, projection in zip(model.interactions, model.projections):
            part = lambda e: projection(interaction(e))  # noqa: E731
            gap = (part(a + b) + part(zero) - part(a) - part(b)).abs().max()
            assert gap > 1e-3, f"{name}: the per-set part is affine (gap {gap})"


# --- each interaction against its formula ------------------------------------------------


def test_ipnn_inner_products_and_what_se_and_me_feed_on():
    e = torch.randn(3, len(FIELDS), 5)
    pairs = torch.stack([(e[:, i] * e[:, j]).sum(-1) for i, j in itertools.combinations(range(len(FIELDS)), 2)], 1)
    torch.testing.assert_close(IPNNInteraction(len(FIELDS), 5, include_embeddings=False)(e), pairs)
    with_flat = IPNNInteraction(len(FIELDS), 5, include_embeddings=True)(e)
    torch.testing.assert_close(with_flat, torch.cat([e.flatten(1), pairs], 1))
    # SE-IPNN at scale k uses its k * base_dim embeddings (the reference silently used 10)
    se, me = build("ipnn", "se", 10), build("ipnn", "me", 10)
    num_pairs = len(FIELDS) * (len(FIELDS) - 1) // 2
    assert se.interactions[0].output_dim == len(FIELDS) * 40 + num_pairs
    assert se.projections[0].layers[0].in_features == len(FIELDS) * 40 + num_pairs
    assert all(i.output_dim == num_pairs for i in me.interactions)
    # ME at scale 1 is SE at scale 1
    assert build("ipnn", "me", 1).interactions[0].include_embeddings


def test_nfwfm_is_the_field_weighted_sum_of_pairwise_products():
    interaction = NFwFMInteraction(len(FIELDS), 3, dropout=0.0, pairs="upper")  # "all": test_paper_fidelity.py
    e = torch.randn(5, len(FIELDS), 3)
    w = interaction.field_weights.detach()
    expected = sum(w[i, j] * e[:, i] * e[:, j] for i, j in itertools.combinations(range(len(FIELDS)), 2))
    torch.testing.assert_close(interaction.pooled(e), expected)
    assert interaction(e).shape == (5, 3)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_nfwfm_never_materialises_batch_by_dim_by_field_pairs():
    """The reference built B x K x F x F; here forward and backward peak at B x F x K,
    which at SE 10x (K = 500, F = 39, B = 2048) is 159.7 MB of float32 (6.2 GB before)."""
    batch, num_fields, dim = 64, 12, 10
    interaction = NFwFMInteraction(num_fields, dim, dropout=0.2).train()
    e = torch.randn(batch, num_fields, dim, requires_grad=True)
    with _LargestTensor() as probe:
        interaction(e).sum().backward()
    assert probe.largest == peak_intermediate_elements(batch, num_fields, dim) == batch * num_fields * dim
    assert peak_intermediate_elements(2048, 39, 500) * 4 == 159_744_000


def test_cin_matches_the_reference_conv_over_outer_products():
    torch.manual_seed(0)
    cin = CINInteraction(num_fields=5, dim=3, layer_sizes=(4, 2))
    e = torch.randn(7, 5, 3)
    x0, h, maps = e.unsqueeze(2), e, []
    for layer in cin.layers:  # the reference: Conv1d(F * C, C', 1) on (B, F * C, K)
        z = (x0 * h.unsqueeze(1)).flatten(1, 2)
        h = torch.relu(nn.functional.conv1d(z, layer.weight.unsqueeze(-1), layer.bias))
        maps.append(h)
    with torch.no_grad():
        torch.testing.assert_close(cin.cin(e), torch.cat(maps, 1).sum(2))
        torch.testing.assert_close(cin(e), torch.cat([torch.cat(maps, 1).sum(2), e.flatten(1)], 1))


def test_xdeepfm_averages_cin_features_before_one_shared_linear_and_adds_the_dnn_logit():
    model = build("xdeepfm", "me", scale=3).eval()
    assert isinstance(model.tail, ExplicitPlusDNNTail)
    e = torch.randn(3, 6, len(FIELDS), 4)
    with torch.no_grad():
        cin = torch.stack([i.cin(e[m]) for m, i in enumerate(model.interactions)]).mean(0)
        dnn = torch.stack([p.dnn(e[m].flatten(1)) for m, p in enumerate(model.projections)]).mean(0)
        expected = model.tail.explicit(cin) + model.tail.dnn(dnn)
        torch.testing.assert_close(model.forward_embeddings(e), expected.squeeze(-1))
    assert model.tail.explicit.in_features == 4 + 3  # sum(cin_layers)


def test_finalmlp_averages_both_towers_then_fuses_bilinearly():
    model = build("finalmlp", "me", scale=2).eval()
    assert isinstance(model.tail, BilinearFusion)
    assert torch.count_nonzero(model.tail.w_xy) == 0  # zero-initialised, as the reference
    with torch.no_grad():
        model.tail.w_xy.normal_()
    e = torch.randn(2, 5, len(FIELDS), 4)
    with torch.no_grad():
        streams = [torch.stack([i.towers[t](e[m].flatten(1)) for m, i in enumerate(model.interactions)]).mean(0) for t in (0, 1)]
        x, y = streams
        fusion = model.tail
        expected = fusion.w_x(x) + fusion.w_y(y) + torch.einsum("bi,ij,bj->b", x, fusion.w_xy, y).unsqueeze(1)
        torch.testing.assert_close(model.forward_embeddings(e), expected.squeeze(-1))


# --- config errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ModelConfig("xdeepfm", cin_layers=()), "cin_layers \\(\\): expected a non-empty list"),
        (lambda: ModelConfig("xdeepfm", cin_layers=(16, 0)), "cin_layers \\(16, 0\\)"),
        (lambda: ModelConfig("xdeepfm", cin_layers=(16, True)), "cin_layers"),
        (lambda: ModelConfig("xdeepfm", cin_layers=16), "cin_layers 16"),
        (lambda: ModelConfig("finalmlp", tower_layers=0), "tower_layers 0"),
        (lambda: ModelConfig("autoint", attention_heads=0), "attention_heads 0"),
        (lambda: ModelConfig("autoint", attention_layers=-1), "attention_layers -1"),
        (lambda: ModelConfig("autoint", attention_dim=10, attention_heads=3), "attention_dim 10 is not divisible by attention_heads 3"),
        (lambda: load_config(None, ["data.path=x", "model.cin_layers=16"]), "model.cin_layers: expected a list"),
        (lambda: load_config(None, ["data.path=x", "model.cin_layers=[8, a]"]), "model.cin_layers\\[1\\]: expected an integer"),
        (lambda: load_config(None, ["data.path=x", "model.heads=2"]), "unknown key\\(s\\) \\['heads'\\]"),
        (
            lambda: MultiEmbeddingCTR.from_config([SparseField("a", 3)], ModelConfig("ipnn"), EmbeddingConfig("me", 2), 0),
            "ipnn with several embedding sets needs at least 2 sparse fields",
        ),
        (
            lambda: MultiEmbeddingCTR.from_config([SparseField("a", 3)], ModelConfig("nfwfm"), EmbeddingConfig("se", 1), 0),
            "nfwfm needs at least 2 sparse fields",
        ),
    ],
)
def test_bad_model_configs_are_user_errors(make, message):
    with pytest.raises(UserError, match=message):
        make()


def test_model_keys_load_from_yaml_overrides():
    config = load_config(None, ["data.path=x", "model.name=xdeepfm", "model.cin_layers=[8, 4]", "model.attention_heads=4"])
    assert config.model.cin_layers == (8, 4) and config.model.attention_heads == 4
    assert ModelConfig("xdeepfm", cin_layers=[8, 4]).cin_layers == (8, 4)


# --- every model learns what logistic regression cannot --------------------------------
#
# Planted data (trainer.data.synthetic, the generator behind ``python -m trainer.data.synthetic``)
# with the planted pair interactions at 0.5 instead of the default 0.22, so that one CPU epoch
# over 64k rows can find them; at the default strength the gap over LR needs far more rows
# than a unit test can afford. Same budget for every model: one epoch, batch 1024, Adam.
# LR (one weight per id + bias) gets the best of three learning rates; the models get fixed
# ones (dense 1e-2, embeddings 3e-2, the middle of LR's grid).

LEARN_ROWS = 80_000
LEARN_BATCH = 1024
LR_GRID = (1e-2, 3e-2, 1e-1)
LEARN_KEYS = dict(
    hidden=32, dropout=0.0, cin_layers=(8, 8), attention_dim=8, attention_heads=1, attention_layers=1, tower_layers=2
)


class _LogisticRegression(nn.Module):
    def __init__(self, fields: list[SparseField]) -> None:
        super().__init__()
        self.sparse_arch = MultiEmbeddingSparseArch(fields, num_sets=1, dim=1, seed=0)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.sparse_arch(kjt)[0].sum(dim=(1, 2)) + self.bias


def _train_and_test(model: nn.Module, data: dict, dense_lr: float, embedding_lr: float) -> float:
    torch.manual_seed(0)
    embedding = list(model.sparse_arch.parameters())
    ids = {id(p) for p in embedding}
    optimizer = torch.optim.Adam(
        [{"params": embedding, "lr": embedding_lr}, {"params": [p for p in model.parameters() if id(p) not in ids]}],
        lr=dense_lr,
    )
    model.train()
    for kjt, labels in data["train"]:
        loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(kjt) for kjt, _ in data["test"]])
    return auc(scores.numpy(), torch.cat([y for _, y in data["test"]]).numpy())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("planted") / "data")
    config = SyntheticConfig(rows=LEARN_ROWS, cardinality_scale=0.0001, interaction_scale=0.5)
    report = generate(config, path, "parquet", progress=False)

    def batches(split: str, shuffle: bool) -> list:
        loader = CTRDataLoader(path, split, LoaderConfig(batch_size=LEARN_BATCH, shuffle=shuffle, prefetch=False))
        return [(b.sparse_features, b.labels) for b in loader]

    data = {"train": batches("train", True), "test": batches("test", False)}
    data["fields"] = CTRDataLoader(path, "test", LoaderConfig(batch_size=LEARN_BATCH)).schema.sparse_fields
    data["lr_auc"] = max(_train_and_test(_LogisticRegression(data["fields"]), data, lr, lr) for lr in LR_GRID)
    data["oracle_auc"] = report["oracle"]["test"]["auc"]
    return data


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_every_model_beats_logistic_regression_on_planted_interactions(planted, name):
    # ME at scale 2; NFwFM pools to K numbers per set, so it gets its larger base dim (50 in the paper)
    embedding = EmbeddingConfig("me", scale=2, base_dim=16 if name == "nfwfm" else 4)
    model = MultiEmbeddingCTR.from_config(planted["fields"], ModelConfig(name, **LEARN_KEYS), embedding, seed=0)
    model_auc = _train_and_test(model, planted, dense_lr=1e-2, embedding_lr=3e-2)
    assert planted["lr_auc"] > 0.65  # a working baseline, well below the oracle
    print(f"{name}: test AUC {model_auc:.4f}, LR {planted['lr_auc']:.4f}, oracle {planted['oracle_auc']:.4f}")
    assert planted["lr_auc"] + 0.005 < model_auc < planted["oracle_auc"], (name, model_auc, planted["lr_auc"])


def test_a_checkpoint_identity_from_before_nfwfm_pairs_builds_the_upper_pairs_it_trained():
    """Checkpoints written before ``model.nfwfm_pairs`` existed trained NFwFM on i < j pairs;
    export and the collapse monitor rebuild that model, not today's default (all pairs)."""
    import dataclasses

    from trainer.export.trained_model import build_model

    config = ModelConfig(name="nfwfm", hidden=8)
    identity = {
        "model": {k: v for k, v in dataclasses.asdict(config).items() if k != "nfwfm_pairs"},
        "embedding": dataclasses.asdict(EmbeddingConfig(mode="se", scale=1, base_dim=4)),
        "fields": [["a", 5], ["b", 6], ["c", 7]],
    }
    masks = {}
    for pairs in (None, "all"):
        if pairs:
            identity["model"]["nfwfm_pairs"] = pairs
        model = build_model(identity, "ckpt")
        (mask,) = [b for name, b in model.named_buffers() if name.endswith("pair_mask")]
        masks[pairs] = mask
    assert torch.equal(masks[None], torch.ones(3, 3, dtype=torch.bool).triu(1))
    assert bool(masks["all"].all())
