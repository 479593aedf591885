"""The paper's interaction-collapse toy experiment (Section 4, Evidence II, Figure 4).

Three fields interact FM-style, ``logit = <E1[x1], E2[x2]> + <E1[x1], E3[x3]> + <E2[x2], E3[x3]>``.
The data: every (x1, x2) of ``rows x rows`` once, each with a random x3 of field 3 and a
random label (the appendix: full-batch SGD, learning rate 1, 5000 iterations; the sizes,
labels and start are this module's choices). All three tables are learned jointly from a
small random start. Field 3 has either fewer ids than
the embedding dim (``partner_rows < dim``: its table has at most that rank) or as many as
field 1. Nothing bounds E1: its gradient combines E2's rows (full rank) with E3's, so
whether a low-cardinality partner leaves E1 with a lower information abundance is an
outcome of the training, the paper's Finding 1 if it holds.

``fixed_partner_toy`` is the bounded variant, a known-collapsed trained table rather than a
finding: one field learned against one fixed partner table of rank ``partner_rank`` that is
not learned. Every gradient of E1 is a combination of the partner's rows, so from a small
start E1 spans little more than the partner's ``partner_rank`` directions (the collapse
alerts' tests push it as the trained collapsed table, and its full-rank twin as the healthy one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from trainer.collapse.analysis import information_abundance

PAPER_STEPS = 5000  # the paper's iteration count (its appendix)


@dataclass(frozen=True)
class ToyResult:
    partner_rows: int  # cardinality of field 3
    initial_ia: float  # IA of E1 at initialisation
    trained_ia: float  # IA of E1 after training
    partner_ia: float  # IA of E3 after training
    curve: tuple[tuple[int, float], ...]  # (step, IA of E1), every ``steps // 10`` steps
    final_loss: float
    trained: torch.Tensor  # E1 after training, (rows, dim)


def interaction_collapse_toy(
    partner_rows: int,
    rows: int = 100,
    dim: int = 10,
    steps: int = PAPER_STEPS,
    lr: float = 1.0,
    init_std: float = 0.01,
    seed: int = 0,
) -> ToyResult:
    """Train E1, E2 (``rows`` x ``dim``) and E3 (``partner_rows`` x ``dim``) jointly by
    full-batch SGD on the mean logistic loss; E1's IA before, during and after.

    The data and the start (N(0, ``init_std``) tables) depend only on ``seed`` and the
    sizes, so two ``partner_rows`` with the same seed share E1's and E2's start and labels.
    """
    with _one_thread():
        return _train(partner_rows, rows, dim, steps, lr, init_std, seed)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tables of (100, 10): a second torch thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(partner_rows: int, rows: int, dim: int, steps: int, lr: float, init_std: float, seed: int) -> ToyResult:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows, rows), generator=g).float()  # (x1, x2) -> y
    x3 = torch.randint(0, partner_rows, (rows, rows), generator=g)  # (x1, x2) -> x3
    e1, e2 = (torch.randn(rows, dim, generator=g) * init_std for _ in range(2))
    e3 = torch.randn(partner_rows, dim, generator=torch.Generator().manual_seed(seed + 1)) * init_std
    initial_ia = information_abundance(e1.numpy())
    tables = [t.requires_grad_(True) for t in (e1, e2, e3)]
    curve = []
    for step in range(steps + 1):
        if step % max(1, steps // 10) == 0 or step == steps:
            curve.append((step, information_abundance(e1.detach().numpy())))
        if step == steps:
            break
        # (rows, rows): <E1[x1], E2[x2]> + <E1[x1], E3[x3]> + <E2[x2], E3[x3]>, the last two
        # gathered from the (rows, partner_rows) products at each pair's x3
        logits = e1 @ e2.T + (e1 @ e3.T).gather(1, x3) + (e2 @ e3.T).gather(1, x3.T).T
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        grads = torch.autograd.grad(loss, tables)
        with torch.no_grad():
            for t, grad in zip(tables, grads):
                t -= lr * grad
    return ToyResult(
        partner_rows=partner_rows,
        initial_ia=initial_ia,
        trained_ia=curve[-1][1],
        partner_ia=information_abundance(e3.detach().numpy()),
        curve=tuple(curve),
        final_loss=loss.item(),
        trained=e1.detach(),
    )


@dataclass(frozen=True)
class FixedPartnerResult:
    partner_rank: int  # rank of the fixed partner table
    initial_ia: float  # IA of E1 at initialisation
    trained_ia: float  # IA of E1 after training
    partner_ia: float  # IA of the partner (fixed)
    final_loss: float
    trained: torch.Tensor  # E1 after training, (rows, dim)


def fixed_partner_toy(
    partner_rank: int, rows: int = 100, dim: int = 10, steps: int = 300, lr: float = 1.0, seed: int = 0
) -> FixedPartnerResult:
    """Train E1 (``rows`` x ``dim``) by full-batch gradient descent on ``logit = <E1[i], E2[j]>``
    over every (i, j) pair once, E2 a fixed random table truncated to rank ``partner_rank``
    (``dim``: full rank). The labels come from a random full-rank FM over the same ids, so a
    full-rank partner lets E1 learn a full-rank table. E1 starts at a tenth of the model's
    U(+-sqrt(1/rows)) init, so what it holds after training is what it learned.
    """
    if not 1 <= partner_rank <= dim:
        raise ValueError(f"partner_rank must be in 1..{dim} (dim), got {partner_rank}")
    with _one_thread():
        g = torch.Generator().manual_seed(seed)
        truth1, truth2 = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
        labels = torch.bernoulli(torch.sigmoid(truth1 @ truth2.T / dim**0.5), generator=g)  # (rows, rows)
        u, s, vh = torch.linalg.svd(torch.randn(rows, dim, generator=g), full_matrices=False)
        partner = (u[:, :partner_rank] * s[:partner_rank]) @ vh[:partner_rank]
        partner = partner / partner.norm(dim=1, keepdim=True).mean()
        e1 = (torch.rand(rows, dim, generator=g) * 2 - 1) * 0.1 / rows**0.5
        initial_ia = information_abundance(e1.numpy())
        e1.requires_grad_(True)
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(e1 @ partner.T, labels)
            (grad,) = torch.autograd.grad(loss, e1)
            with torch.no_grad():
                e1 -= lr * rows * grad  # the gradient per row, not diluted by the table size
    trained = e1.detach()
    return FixedPartnerResult(
        partner_rank=partner_rank,
        initial_ia=initial_ia,
        trained_ia=information_abundance(trained.numpy()),
        partner_ia=information_abundance(partner.numpy()),
        final_loss=loss.item(),
        trained=trained,
    )
