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
"""

from __future__ import annotations

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tables of (100, 10): a second thread only adds synchronisation
    try:
        return _train(partner_rows, rows, dim, steps, lr, init_std, seed)
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
