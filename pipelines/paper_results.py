"""The paper's own numbers, as data: test AUC of Table 1.

Source: Xingzhuo Guo, Junwei Pan, Ximei Wang, Baixu Chen, Jie Jiang, Mingsheng Long,
"On the Embedding Collapse When Scaling Up Recommendation Models", ICML 2024
(arXiv:2310.04400), Table 1: test AUC of single-embedding (SE) and multi-embedding (ME)
models at scales 1x ("base"), 2x, 3x, 4x and 10x on Criteo and Avazu, each the mean of 3
runs with different random initialisations. Transcribed from the copy in
``shared/seeds/`` (``tests/test_sweep.py`` compares every number with it when present).

The paper prints separate 1x ("base") numbers for SE and ME, kept here as printed. Its
standard deviations (appendix Tables 5 and 6) and the AutoInt results (Table 7, Criteo up
to 4x only) are not in that copy, so they are not here either.
"""

from __future__ import annotations

CITATION = (
    "Guo et al., On the Embedding Collapse When Scaling Up Recommendation Models, "
    "ICML 2024, Table 1 (test AUC, mean of 3 runs)"
)

PAPER_DATASETS = ("criteo", "avazu")
PAPER_SCALES = (1, 2, 3, 4, 10)

# model -> mode -> (criteo 1x, 2x, 3x, 4x, 10x, avazu 1x, 2x, 3x, 4x, 10x), the rows of Table 1
_TABLE1: dict[str, dict[str, tuple[float, ...]]] = {
    "dnn": {
        "se": (0.81228, 0.81222, 0.81207, 0.81213, 0.81142, 0.78744, 0.78759, 0.78752, 0.78728, 0.78648),
        "me": (0.81261, 0.81288, 0.81289, 0.81289, 0.81287, 0.78805, 0.78805, 0.78826, 0.78862, 0.78884),
    },
    "ipnn": {
        "se": (0.81272, 0.81273, 0.81272, 0.81271, 0.81262, 0.78732, 0.78741, 0.78738, 0.78750, 0.78745),
        "me": (0.81268, 0.81268, 0.81270, 0.81273, 0.81311, 0.78806, 0.78806, 0.78868, 0.78902, 0.78949),
    },
    "nfwfm": {
        "se": (0.81059, 0.81087, 0.81090, 0.81112, 0.81113, 0.78684, 0.78757, 0.78783, 0.78794, 0.78799),
        "me": (0.81128, 0.81153, 0.81153, 0.81171, 0.81210, 0.78868, 0.78868, 0.78901, 0.78932, 0.78974),
    },
    "xdeepfm": {
        "se": (0.81217, 0.81180, 0.81167, 0.81137, 0.81116, 0.78743, 0.78750, 0.78714, 0.78735, 0.78693),
        "me": (0.81236, 0.81239, 0.81255, 0.81255, 0.81299, 0.78848, 0.78848, 0.78886, 0.78894, 0.78927),
    },
    "dcnv2": {
        "se": (0.81341, 0.81341, 0.81345, 0.81346, 0.81357, 0.78786, 0.78835, 0.78854, 0.78852, 0.78856),
        "me": (0.81348, 0.81361, 0.81382, 0.81382, 0.81385, 0.78862, 0.78862, 0.78882, 0.78907, 0.78942),
    },
    "finalmlp": {
        "se": (0.81259, 0.81262, 0.81248, 0.81240, 0.81175, 0.78751, 0.78797, 0.78795, 0.78742, 0.78662),
        "me": (0.81290, 0.81302, 0.81303, 0.81303, 0.81303, 0.78821, 0.78821, 0.78831, 0.78836, 0.78830),
    },
}

# The paper's model names as printed, for tables.
DISPLAY_NAMES = {
    "dnn": "DNN",
    "ipnn": "IPNN",
    "nfwfm": "NFwFM",
    "xdeepfm": "xDeepFM",
    "dcnv2": "DCNv2",
    "finalmlp": "FinalMLP",
    "autoint": "AutoInt",
}


def _build() -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    out: dict[str, dict[str, dict[str, dict[int, float]]]] = {d: {} for d in PAPER_DATASETS}
    n = len(PAPER_SCALES)
    for model, modes in _TABLE1.items():
        for mode, row in modes.items():
            for i, dataset in enumerate(PAPER_DATASETS):
                out[dataset].setdefault(model, {})[mode] = dict(zip(PAPER_SCALES, row[i * n : (i + 1) * n]))
    return out


# dataset -> model -> mode -> scale -> test AUC
TABLE1_TEST_AUC = _build()


def paper_test_auc(dataset: str, model: str, mode: str, scale: int) -> float | None:
    """The paper's test AUC for one cell of Table 1, or None where the paper has none."""
    return TABLE1_TEST_AUC.get(dataset.lower(), {}).get(model, {}).get(mode, {}).get(scale)


def display_name(model: str) -> str:
    return DISPLAY_NAMES.get(model, model)
