"""The collapse report a person reads at a glance: PNG plots and one self-contained HTML.

Written into one output directory (atomically: a temporary sibling renamed at the end)::

    collapse.json     {"format": "trainer.collapse/1", "reports": [CollapseReport.to_dict(), ...]}
    spectra.png       normalised singular values per field (the paper's Figure 1b)
    ia.png            IA per field against the random baseline (Figure 2)
    diversity.png     set diversity, fields x set pairs (when any model has several sets)
    comparison.png    the models side by side (when given two or more, e.g. SE vs ME)
    training.png      the training curves of the analysed runs (when a checkpoint lies in a run
                      directory with metrics.jsonl / collapse.jsonl; ``trainer.run_report``)
    report.html       the summary table and every PNG embedded (base64)
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from trainer.atomic_output import atomic_directory
from trainer.checkpoint import RUN_CHECKPOINTS
from trainer.collapse.analysis import CollapseReport
from trainer.errors import UserError
from trainer.run_dir import RunDir
from trainer.run_report import RunCurves, training_comparison_png
from trainer.storage import filesystem, join

FORMAT = "trainer.collapse/1"
JSON_NAME = "collapse.json"
HTML_NAME = "report.html"
TRAINING_PNG = "training.png"


def reports_to_json(reports: Sequence[CollapseReport]) -> str:
    return json.dumps({"format": FORMAT, "reports": [r.to_dict() for r in reports]}, indent=2, allow_nan=False)


def reports_from_json(text: str) -> list[CollapseReport]:
    data = json.loads(text)
    if data.get("format") != FORMAT:
        raise UserError(f"not a {FORMAT} file (format {data.get('format')!r})")
    return [CollapseReport.from_dict(r) for r in data["reports"]]


def distinct_labels(reports: Sequence[CollapseReport]) -> None:
    """Give reports that share a label (two runs of the same config) their run's name too."""
    counts: dict[str, int] = {}
    for r in reports:
        counts[r.label] = counts.get(r.label, 0) + 1
    for i, r in enumerate(reports):
        if counts[r.label] > 1:
            parts = [p for p in r.source.replace("://", "/").split("/") if p]
            name = parts[parts.index(RUN_CHECKPOINTS) - 1] if RUN_CHECKPOINTS in parts[1:] else (parts[-1] if parts else str(i))
            r.label = f"{r.label} [{name}]"
    seen: set[str] = set()
    for i, r in enumerate(reports):  # still equal (the same run twice): number them
        if r.label in seen:
            r.label = f"{r.label} #{i + 1}"
        seen.add(r.label)


def write_report(reports: Sequence[CollapseReport], output: str, overwrite: bool = False, plots: bool = True) -> list[str]:
    """Write collapse.json, the PNGs and report.html into the directory ``output`` (a path or
    fsspec URL), atomically. Returns the names written."""
    if not reports:
        raise UserError("no collapse reports to write")
    distinct_labels(reports)
    figures = render_figures(reports) if plots else {}
    page = render_html(reports, figures)
    written = [JSON_NAME, *figures, HTML_NAME]
    with atomic_directory(output, overwrite=overwrite, marker=JSON_NAME, what="collapse report") as tmp:
        fs, path = filesystem(tmp)
        fs.pipe(join(path, JSON_NAME), reports_to_json(reports).encode())
        for name, png in figures.items():
            fs.pipe(join(path, name), png)
        fs.pipe(join(path, HTML_NAME), page.encode())
    return written


# ---- figures ----------------------------------------------------------------------------


def _figure_module() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the collapse plots need matplotlib (pip install matplotlib), or pass --no-plots") from None
    return Figure


def render_figures(reports: Sequence[CollapseReport]) -> dict[str, bytes]:
    """name -> PNG bytes."""
    figures = {"spectra.png": _spectra_figure, "ia.png": _ia_figure}
    out = {name: _png(fn, reports) for name, fn in figures.items()}
    if any(f.pairs for r in reports for f in r.fields):
        out["diversity.png"] = _png(_diversity_figure, reports)
    if len(reports) > 1:
        out["comparison.png"] = _png(_comparison_figure, reports)
    runs = training_runs(reports)
    if runs:
        _figure_module()  # the same clear error without matplotlib
        out[TRAINING_PNG] = training_comparison_png(runs)
    return out


def training_runs(reports: Sequence[CollapseReport]) -> list[RunCurves]:
    """The curves of the runs whose checkpoints the reports analysed (``RUN/checkpoints/step-N``
    with records in ``RUN/metrics.jsonl`` or ``collapse.jsonl``), the analysed step marked."""
    runs = []
    for r in reports:
        run_dir = RunDir.of_checkpoint(r.source)
        if run_dir is None:
            continue
        mark = "analysed checkpoint" if r.step is not None else "best checkpoint"
        curves = RunCurves.read(run_dir, label=r.label, mark_step=r.step, mark_label=mark)
        if curves.metrics or curves.collapse:
            runs.append(curves)
    return runs


def _png(draw: Callable[[Any, Sequence[CollapseReport]], Any], reports: Sequence[CollapseReport]) -> bytes:
    Figure = _figure_module()
    fig = draw(Figure, reports)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _overall_spectrum(f: Any) -> list[float]:
    """The overall (all sets) spectrum, cut at min(rows, columns): past that every singular
    value is zero by shape (a 6-id field has 6 directions at most), not by collapse."""
    s = f.overall_spectrum if f.overall_spectrum is not None else f.set_spectra[0]
    return s[: f.rows]


def _random_spectrum(f: Any) -> list[float]:
    return f.overall_random_spectrum[: f.rows]


def _mean_curve(curves: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over the full-length curves (fields with at least as many ids as columns; the
    shorter ones would make the mean jump where they end), else over all."""
    width = max(len(c) for c in curves)
    curves = [c for c in curves if len(c) == width] or list(curves)
    padded = np.full((len(curves), width), np.nan)
    for i, c in enumerate(curves):
        padded[i, : len(c)] = c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (all-zero tables)
        return np.nanmean(padded, axis=0)


def _normalised(s: Sequence[float]) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    top = s.max() if s.size else 0.0
    return s / top if top > 0 else np.full_like(s, np.nan)


def _floor(values: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    return np.maximum(values, floor)  # zero singular values still show on a log axis


def _spectra_figure(Figure: Any, reports: Sequence[CollapseReport]) -> Any:
    n = len(reports)
    fig = Figure(figsize=(5.5 * n, 4.4))
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    for ax, r in zip(axes, reports):
        curves = [_normalised(_overall_spectrum(f)) for f in r.fields]
        randoms = [_normalised(_random_spectrum(f)) for f in r.fields]
        cmap = _cmap(len(curves))
        for i, c in enumerate(curves):
            ax.plot(np.arange(1, len(c) + 1), _floor(c), color=cmap(i), lw=0.8, alpha=0.6)
        mean, rand = _mean_curve(curves), _mean_curve(randoms)
        ax.plot(np.arange(1, len(mean) + 1), _floor(mean), color="black", lw=2.2, label="mean over fields (rows >= columns)")
        ax.plot(np.arange(1, len(rand) + 1), _floor(rand), color="grey", lw=2.0, ls="--", label="random init (mean)")
        ax.set_yscale("log")
        ax.set_xlabel("singular value index")
        ax.set_title(f"{r.label}\n{_what_overall(r)}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("normalised singular value s / max(s)")
    fig.suptitle("Singular spectra per field, one thin line each (Figure 1b)", fontsize=11)
    fig.tight_layout()
    return fig


def _what_overall(r: CollapseReport) -> str:
    if r.num_sets > 1:
        return f"{r.num_sets} sets x {r.dim} dims concatenated ({r.num_sets * r.dim} columns)"
    return f"one set of {r.dim} dims"


def _sorted_by_random(r: CollapseReport) -> list[Any]:
    return sorted(r.fields, key=lambda f: -f.overall_random_ia if not math.isnan(f.overall_random_ia) else 0)


def _ia_figure(Figure: Any, reports: Sequence[CollapseReport]) -> Any:
    n = len(reports)
    width = max(6.0, 0.22 * max(len(r.fields) for r in reports) + 2)
    fig = Figure(figsize=(width, 3.6 * n))
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, reports):
        fields = _sorted_by_random(r)
        x = np.arange(len(fields))
        overall = [_nan(f.overall_ia if f.overall_ia is not None else f.set_ia[0]) for f in fields]
        ax.bar(x, [f.overall_random_ia for f in fields], width=0.8, color="none", edgecolor="grey", label="random init")
        ax.bar(x, overall, width=0.55, color="tab:blue", label="learned (all sets)" if r.num_sets > 1 else "learned")
        if r.num_sets > 1:
            ax.plot(x, [f.mean_set_ia for f in fields], "o", ms=3.5, color="tab:orange", label="learned, mean per set")
            ax.plot(x, [f.set_random_ia for f in fields], "_", ms=8, color="tab:red", label="random init, one set")
        ax.set_xticks(x)
        ax.set_xticklabels([f.field for f in fields], rotation=90, fontsize=7)
        ax.set_ylabel("information abundance")
        s = r.summary()
        ax.set_title(
            f"{r.label}: IA per field (fields sorted by the random baseline); "
            f"mean normalised IA {_fmt(s['mean_overall_ia_normalized'])}",
            fontsize=9,
        )
        ax.legend(fontsize=7, ncol=4, loc="upper right")
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_xlim(-0.7, len(fields) - 0.3)
    fig.tight_layout()
    return fig


def _diversity_figure(Figure: Any, reports: Sequence[CollapseReport]) -> Any:
    shown = [r for r in reports if any(f.pairs for f in r.fields)]
    height = max(3.0, 0.18 * max(len(r.fields) for r in shown) + 1.5)
    widths = [max(3.0, 0.45 * (len(_pair_labels(r)) + 2) + 2) for r in shown]
    fig = Figure(figsize=(sum(widths), height))
    axes = fig.subplots(1, len(shown), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    image = None
    for ax, r in zip(axes, shown):
        labels = _pair_labels(r)
        grid = np.full((len(r.fields), len(labels) + 2), np.nan)
        for i, f in enumerate(r.fields):
            for p in f.pairs:
                grid[i, labels.index(f"{p.i}-{p.j}")] = _nan(p.diversity)
            grid[i, -2] = _nan(f.mean_diversity)
            grid[i, -1] = _nan(f.random_mean_diversity)
        image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_xticks(np.arange(len(labels) + 2))
        ax.set_xticklabels([*labels, "mean", "random"], rotation=90, fontsize=7)
        ax.axvline(len(labels) - 0.5, color="white", lw=1.5)
        ax.set_yticks(np.arange(len(r.fields)))
        ax.set_yticklabels([f.field for f in r.fields], fontsize=6)
        kind = "set pairs" if r.num_sets > 1 else "column-group pairs\n(one set split, as the paper does)"
        ax.set_title(f"{r.label}\ndiversity of {kind}\nmean {_fmt(r.summary()['mean_diversity'])}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="diversity = 1 - mean cos(principal angles)")
    return fig


def _pair_labels(r: CollapseReport) -> list[str]:
    seen: list[str] = []
    for f in r.fields:
        for p in f.pairs:
            label = f"{p.i}-{p.j}"
            if label not in seen:
                seen.append(label)
    return seen


def _comparison_figure(Figure: Any, reports: Sequence[CollapseReport]) -> Any:
    # fields by cardinality, largest first, as the paper's Figure 8b: ME's gain is largest there
    names = [f.field for f in sorted(reports[0].fields, key=lambda f: -f.rows)]
    common = [n for n in names if all(any(f.field == n for f in r.fields) for r in reports[1:])]
    fig = Figure(figsize=(min(18.0, max(10.0, 0.2 * len(common) * len(reports) + 4)), 7.5))
    top = fig.add_subplot(2, 1, 1)
    x = np.arange(len(common))
    w = 0.8 / len(reports)
    for k, r in enumerate(reports):
        vals = [_nan(r.get_field(n).overall_ia_normalized) for n in common]
        top.bar(x + (k - (len(reports) - 1) / 2) * w, vals, width=w, label=r.label)
    top.axhline(1.0, color="grey", ls="--", lw=1)
    top.set_xticks(x)
    top.set_xticklabels(common, rotation=90, fontsize=7)
    top.set_ylabel("IA / random-init IA")
    top.set_title("Normalised information abundance per field (all sets together), largest fields first", fontsize=10)
    top.legend(fontsize=8)
    top.grid(True, axis="y", alpha=0.3)
    left = fig.add_subplot(2, 2, 3)
    for r in reports:
        mean = _mean_curve([_normalised(_overall_spectrum(f)) for f in r.fields])
        left.plot(np.arange(1, len(mean) + 1), _floor(mean), lw=2, label=r.label)
    left.set_yscale("log")
    left.set_xlabel("singular value index")
    left.set_ylabel("mean normalised singular value")
    left.set_title("Mean singular spectrum over fields", fontsize=10)
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    right = fig.add_subplot(2, 2, 4)
    xs = np.arange(len(reports))
    sums = [r.summary() for r in reports]
    right.bar(xs - 0.2, [_nan(s["mean_diversity"]) for s in sums], width=0.4, label="learned")
    right.bar(xs + 0.2, [_nan(s["mean_random_diversity"]) for s in sums], width=0.4, color="grey", label="random init")
    right.set_xticks(xs)
    right.set_xticklabels([r.label for r in reports], fontsize=8)
    right.set_ylim(0, 1)
    right.set_ylabel("mean set diversity")
    right.set_title("Set diversity, mean over fields and pairs", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _cmap(n: int) -> Any:
    from matplotlib import colormaps

    base = colormaps["viridis"]
    return lambda i: base(i / max(1, n - 1))


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# ---- HTML -------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th{background:#f3f3f3}td.l,th.l{text-align:left}.bad{background:#fde2e1}.ok{background:#e6f4ea}
img{max-width:100%;border:1px solid #eee;margin:6px 0}details{margin:8px 0}summary{cursor:pointer;font-weight:600}
p.note{color:#555;font-size:13px;max-width:1000px}
"""

# normalised IA below this (learned IA under 60% of a random table's) is flagged red
COLLAPSED_BELOW = 0.6


def render_html(reports: Sequence[CollapseReport], figures: dict[str, bytes]) -> str:
    e = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for r in reports:
        s = r.summary()
        norm = s["mean_overall_ia_normalized"]
        cls = "bad" if not math.isnan(norm) and norm < COLLAPSED_BELOW else "ok"
        rows.append(
            "<tr>"
            f"<td class=l>{e(r.label)}</td><td class=l>{e(r.source)}</td><td>{r.num_sets} x {r.dim}</td><td>{s['fields']}</td>"
            f"<td>{_fmt(s['mean_overall_ia'], '.2f')}</td><td>{_fmt(s['mean_overall_random_ia'], '.2f')}</td>"
            f"<td class={cls}>{_fmt(norm)}</td><td>{_fmt(s['mean_set_ia_normalized'])}</td>"
            f"<td>{_fmt(s['mean_diversity'])}</td><td>{_fmt(s['mean_random_diversity'])}</td>"
            "</tr>"
        )
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><title>Embedding collapse report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Embedding collapse report</h1>",
        f"<p class=note>Generated {e(now)}. Information abundance IA = sum(s)/max(s) of a table's singular values "
        "(1 = fully collapsed, K = all K directions equally used), compared with a random-initialised table of "
        "the same shape (normalised IA = IA / random IA; below "
        f"{COLLAPSED_BELOW} is flagged). Diversity = 1 - mean cosine of the principal angles between two "
        "embedding sets of a field (0 = same subspace, 1 = orthogonal). Means are over fields.</p>",
        "<table><tr><th class=l>model</th><th class=l>source</th><th>sets x dim</th><th>fields</th>"
        "<th>mean IA</th><th>random IA</th><th>normalised IA</th><th>per-set normalised IA</th>"
        "<th>diversity</th><th>random diversity</th></tr>",
        *rows,
        "</table>",
    ]
    captions = {
        "comparison.png": "Models side by side",
        "spectra.png": "Singular spectra (Figure 1b of the paper)",
        "ia.png": "Information abundance per field against the random baseline (Figure 2 of the paper)",
        "diversity.png": "Set diversity per field and set pair",
        TRAINING_PNG: "Training curves of the analysed runs (their run directories' metrics.jsonl and collapse.jsonl)",
    }
    for name in ("comparison.png", "spectra.png", "ia.png", "diversity.png", TRAINING_PNG):
        if name in figures:
            data = base64.b64encode(figures[name]).decode()
            parts.append(f"<h2>{e(captions[name])}</h2><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
    if not figures:
        parts.append("<p class=note>Plots were not rendered (--no-plots).</p>")
    for r in reports:
        parts.append(f"<details><summary>Per field: {e(r.label)}</summary>{_field_table(r)}</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _field_table(r: CollapseReport) -> str:
    e = html.escape
    head = (
        "<table><tr><th class=l>field</th><th>rows</th><th>IA (all sets)</th><th>random IA</th><th>normalised</th>"
        "<th>IA per set</th><th>random IA (one set)</th><th>diversity</th><th>random diversity</th></tr>"
    )
    body = []
    for f in r.fields:
        norm = f.overall_ia_normalized
        cls = "bad" if norm is not None and not math.isnan(norm) and norm < COLLAPSED_BELOW else ""
        per_set = ", ".join(_fmt(v, ".2f") for v in f.set_ia)
        body.append(
            f"<tr><td class=l>{e(f.field)}</td><td>{f.rows:,}</td><td>{_fmt(f.overall_ia, '.2f')}</td>"
            f"<td>{_fmt(f.overall_random_ia, '.2f')}</td><td class='{cls}'>{_fmt(norm)}</td><td>{per_set}</td>"
            f"<td>{_fmt(f.set_random_ia, '.2f')}</td><td>{_fmt(f.mean_diversity)}</td><td>{_fmt(f.random_mean_diversity)}</td></tr>"
        )
    return head + "".join(body) + "</table>"
