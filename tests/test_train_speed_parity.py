"""The training step's fast paths compute what the straightforward ones did (issue 17):
DCNv2's row-wise cross layer, the fused ReLU + dropout, the one-gather assembly of the pooled
embeddings and the unbind of the sets. Each is compared with a reference written the old
way (TorchRec's ``CrossNet``, ``nn.ReLU`` + ``nn.Dropout``, stacking by key, ``embeddings[m]``)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torchrec.modules.crossnet import CrossNet
from torchrec.sparse.jagged_tensor import KeyedTensor

from trainer.data.schema import SparseField
from trainer.job_config import EmbeddingConfig, ModelConfig
from trainer.model.ctr_model import MultiEmbeddingCTR
from trainer.model.heads import ReLUDropout
from trainer.model.interactions.dcnv2 import RowCrossNet
from trainer.model.sparse_arch import MultiEmbeddingSparseArch
from trainer.table_layout import storage_dim

FIELDS = [SparseField("a", 5), SparseField("b", 7), SparseField("c", 3)]


def reference_stack(arch: MultiEmbeddingSparseArch, pooled: KeyedTensor) -> torch.Tensor:
    """The old assembly: split by key, drop the padding, stack set-major -> (M, B, F, K)."""
    by_key = pooled.to_dict()
    stacked = torch.stack([by_key[t.key][:, : arch.dim].float() for t in arch.tables], dim=1)
    return stacked.view(-1, arch.num_sets, len(arch.field_names), arch.dim).transpose(0, 1)


def test_row_cross_net_matches_torchrec_cross_net_forward_and_gradients():
    torch.manual_seed(0)
    reference = CrossNet(in_features=12, num_layers=3)
    torch.manual_seed(0)
    rows = RowCrossNet(in_features=12, num_layers=3)
    assert reference.state_dict().keys() == rows.state_dict().keys()  # checkpoints load either way
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), rows.state_dict().values()))
    with torch.no_grad():  # non-zero biases, so that the bias path is checked too
        for a, b in zip(reference.bias, rows.bias):
            a.normal_()
            b.copy_(a)
    wide = torch.randn(6, 24)
    x_ref = wide[:, 6:18].clone().requires_grad_()
    wide_x = wide.clone().requires_grad_()
    out_ref, out = reference(x_ref), rows(wide_x[:, 6:18])  # a strided input, as a set's view of the embeddings
    grad = torch.randn_like(out)
    out_ref.backward(grad)
    out.backward(grad)
    assert torch.equal(out, out_ref)  # the same operations in the same order
    assert_close(wide_x.grad[:, 6:18], x_ref.grad, rtol=1e-6, atol=1e-6)
    for a, b in zip([*reference.kernels, *reference.bias], [*rows.kernels, *rows.bias]):
        assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6)


def test_relu_dropout_is_relu_bit_for_bit_in_eval_and_at_p0():
    x = torch.randn(64, 32)
    reference = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.2)).eval()
    assert torch.equal(ReLUDropout(0.2).eval()(x), reference(x))
    assert torch.equal(ReLUDropout(0.0).train()(x), torch.relu(x))


def test_relu_dropout_training_keeps_scaled_positive_values_with_probability_1_minus_p():
    torch.manual_seed(0)
    p = 0.2
    x = torch.randn(400, 500, requires_grad=True)
    out = ReLUDropout(p).train()(x)
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * (1 / (1 - p)))  # exactly nn.Dropout's scaling of relu(x)
    assert not kept[x <= 0].any()
    share = kept[x > 0].float().mean().item()
    assert abs(share - (1 - p)) < 0.01  # ~100k positive draws: 0.01 is about 8 standard deviations
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * (1 / (1 - p)), torch.zeros(())))


@pytest.mark.parametrize("dim", [10, 12])  # padded storage (10 -> 12 columns) and unpadded
def test_assembly_matches_stacking_by_key_in_any_key_order(dim):
    arch = MultiEmbeddingSparseArch(FIELDS, num_sets=2, dim=dim, seed=0)
    keys = [t.key for t in arch.tables]
    shuffled = keys[3:][::-1] + keys[:3]  # as a sharded collection may return them
    width = storage_dim(dim)
    values = torch.randn(4, len(keys) * width)
    x_ref, x = values.clone().requires_grad_(), values.clone().requires_grad_()
    out_ref = reference_stack(arch, KeyedTensor(keys=shuffled, length_per_key=[width] * len(keys), values=x_ref))
    out = arch.stack(KeyedTensor(keys=shuffled, length_per_key=[width] * len(keys), values=x))
    assert out.shape == (2, 4, len(FIELDS), dim) and torch.equal(out, out_ref)
    grad = torch.randn_like(out)
    out_ref.backward(grad)
    out.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def reference_logits(model: MultiEmbeddingCTR, embeddings: torch.Tensor) -> torch.Tensor:
    """The dense forward the old way (same parameters): ``embeddings[m]``, TorchRec's cross
    layer, ``relu`` and (eval, or p = 0) no dropout."""

    def block(projection, x):
        linear, batch_norm = projection.layers[0], projection.layers[1]
        return torch.relu(batch_norm(linear(x)))

    per_set = []
    for m, (interaction, projection) in enumerate(zip(model.interactions, model.projections)):
        flat = embeddings[m].flatten(1)
        crossed = CrossNet.forward(interaction.cross_net, flat) if hasattr(interaction, "cross_net") else flat
        per_set.append(block(projection, crossed))
    fused = torch.stack(per_set).mean(dim=0)
    return model.tail[1](block(model.tail[0], fused)).squeeze(-1)


@pytest.mark.parametrize("name", ["dcnv2", "dnn"])
@pytest.mark.parametrize("train", [False, True])  # eval: running statistics; train (p = 0): batch statistics
def test_dense_forward_and_gradients_match_the_old_way(name, train):
    """In float64, so that the comparison sees the algebra, not float32 rounding amplified by
    batch norm over a tiny batch (in float32 they agree to ~1e-6)."""
    model = MultiEmbeddingCTR.from_config(
        FIELDS, ModelConfig(name=name, hidden=8, dropout=0.0 if train else 0.2, cross_layers=2),
        EmbeddingConfig(mode="me", scale=2), seed=0,
    )  # fmt: skip
    dense = [model.interactions, model.projections, model.tail]
    for module in dense:
        module.double().train(train)
    # (M, B, F, K) as the sparse arch returns it: a transposed view of (B, M, F, K) rows
    rows = torch.randn(6, 2, len(FIELDS), 10, dtype=torch.float64)
    x, x_ref = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    params = [p for module in dense for p in module.parameters()]
    logits = model.forward_embeddings(x.transpose(0, 1))
    grads = torch.autograd.grad(logits.sum(), [x, *params])
    ref_logits = reference_logits(model, x_ref.transpose(0, 1))
    ref_grads = torch.autograd.grad(ref_logits.sum(), [x_ref, *params])
    assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, rtol=1e-6, atol=1e-6)
