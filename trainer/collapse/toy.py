"""The paper's interaction-collapse toy experiment (Section 4, Evidence II, Figure 4).

Two fields interact FM-style, ``logit = <E1[i], E2[j]>``. E2 is fixed: either
low-information-abundance (rank ``low_rank``) or random full rank. E1 is trained
by full-batch gradient descent on labels from a random full-rank ground truth.
Every gradient of E1 is a combination of E2's rows, so when E2 spans few
directions E1's updates do too: E1 ends up collapsed. The finding: interacting
with a low-IA field lowers a field's IA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.collapse.analysis import information_abundance


@dataclass(frozen=True)
class ToyResult:
    fixed_rank: int  # rank of the fixed partner E2 (= dim for full rank)
    partner_ia: float  # IA of E2
    trained_ia: float  # IA of E1 after training
    initial_ia: float  # IA of E1 at initialisation
    trained: torch.Tensor  # E1 after training, (rows, dim)


def interaction_collapse_toy(
    fixed_rank: int | None,
    rows: int = 100,
    dim: int = 10,
    steps: int = 300,
    lr: float = 1.0,
    init_scale: float = 0.1,
    seed: int = 0,
) -> ToyResult:
    """Train E1 (rows x dim) against a fixed E2 of rank ``fixed_rank`` (None: full rank).

    The ground truth is a random full-rank FM over the same rows, the data every
    (i, j) pair once (full batch), the loss logistic. E1 starts small
    (``init_scale`` times the model's U(+-sqrt(1/rows)) init), so what it holds
    after training is what it learned.
    """
    g = torch.Generator().manual_seed(seed)
    truth1, truth2 = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    labels = torch.bernoulli(torch.sigmoid(truth1 @ truth2.T / dim**0.5), generator=g)  # (rows, rows)
    partner = torch.randn(rows, dim, generator=g)
    if fixed_rank is not None and fixed_rank < dim:
        u, s, vh = torch.linalg.svd(partner, full_matrices=False)
        partner = (u[:, :fixed_rank] * s[:fixed_rank]) @ vh[:fixed_rank]
    partner = partner / partner.norm(dim=1, keepdim=True).mean()
    bound = init_scale * (1.0 / rows) ** 0.5
    e1 = (torch.rand(rows, dim, generator=g) * 2 - 1) * bound
    initial_ia = information_abundance(e1.numpy())
    e1.requires_grad_(True)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(e1 @ partner.T, labels)
        (grad,) = torch.autograd.grad(loss, e1)
        with torch.no_grad():
            e1 -= lr * rows * grad  # full-batch GD, the gradient per row not diluted by the table size
    trained = e1.detach()
    return ToyResult(
        fixed_rank=fixed_rank or dim,
        partner_ia=information_abundance(partner.numpy()),
        trained_ia=information_abundance(trained.numpy()),
        initial_ia=initial_ia,
        trained=trained,
    )
