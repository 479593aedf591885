"""See your training: the curves of one run as PNGs and one self-contained ``report.html``.

Written by rank 0 at the end of a run (``Trainer.finish``), into the run directory, each file
under a temporary name and renamed (``RunDir.write_bytes`` / ``write_text``)::

    RUN/curves_loss.png        train loss per log window, with the validation logloss
    RUN/curves_validation.png  validation AUC, logloss and NE (when recorded) over steps
    RUN/curves_throughput.png  training examples/s per log window
    RUN/curves_ia.png          IA / random-init IA of every field over steps, and set
                               diversity (from collapse.jsonl; only when it has records)
    RUN/report.html            summary.json as a table, the PNGs (embedded as base64, and
                               linked by name), config.yaml and plan.txt

Every curve marks the best checkpoint's step (the one the summary's metrics are from).
``python -m trainer.collapse`` draws ``training_comparison_png`` (the analysed runs' curves
side by side) into its own report. Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from trainer.run_dir import CONFIG, PLAN, REPORT, RunDir

log = logging.getLogger("trainer")

LOSS_PNG = "curves_loss.png"
VALIDATION_PNG = "curves_validation.png"
THROUGHPUT_PNG = "curves_throughput.png"
IA_PNG = "curves_ia.png"
CURVES = (LOSS_PNG, VALIDATION_PNG, THROUGHPUT_PNG, IA_PNG)
CAPTIONS = {
    LOSS_PNG: "Training loss (mean per log window) and validation logloss",
    VALIDATION_PNG: "Validation metrics at each evaluation",
    THROUGHPUT_PNG: "Training throughput (examples/s per log window, all ranks)",
    IA_PNG: "Embedding collapse over training: information abundance per field (collapse.jsonl)",
}
HIGHLIGHTED_FIELDS = 3  # the fields with the lowest IA / random IA at the last measurement, named in the legend


@dataclass
class RunCurves:
    """What the curves of one run are drawn from."""

    label: str
    metrics: list[dict[str, Any]]  # metrics.jsonl records
    collapse: list[dict[str, Any]] = field(default_factory=list)  # collapse.jsonl records
    mark_step: int | None = None  # the step to mark: the best checkpoint's, or the analysed one's
    mark_label: str = "best checkpoint"

    @classmethod
    def read(cls, run_dir: RunDir, label: str | None = None, mark_step: int | None = None,
             mark_label: str = "best checkpoint") -> RunCurves:
        """The curves of ``run_dir``; ``mark_step`` defaults to its summary's best step."""
        if mark_step is None:
            mark_step = (run_dir.read_summary() or {}).get("best_step")
        return cls(label or run_dir.name, run_dir.read_metrics(), run_dir.read_collapse_records(), mark_step, mark_label)

    def series(self, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``key`` in the ``kind`` ("train" or "val") records that have it, by
        step; an undefined value (null, NaN) is NaN, a gap in the curve."""
        points = sorted(
            (r["step"], _number(r[key])) for r in self.metrics
            if r.get("kind") == kind and key in r and isinstance(r.get("step"), (int, float))
        )
        return np.array([s for s, _ in points], dtype=np.float64), np.array([v for _, v in points], dtype=np.float64)

    def has(self, kind: str, key: str) -> bool:
        """Whether any ``kind`` record has a finite ``key`` (e.g. NE, which older runs lack)."""
        return bool(np.isfinite(self.series(kind, key)[1]).any())

    def epoch_ends(self) -> list[int]:
        """The last logged step of each epoch but the last (the next record is the next epoch's)."""
        train = sorted((r["step"], r.get("epoch")) for r in self.metrics if r.get("kind") == "train" and "step" in r)
        return [prev[0] for prev, cur in zip(train, train[1:]) if cur[1] != prev[1]]

    def field_series(self, value: Callable[[dict[str, Any]], float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(steps, {field: values}) of ``value(field record)`` over the collapse records (NaN where
        a record lacks the field)."""
        records = sorted((r for r in self.collapse if isinstance(r.get("step"), (int, float))), key=lambda r: r["step"])
        names: list[str] = []
        for r in records:
            names += [n for n in r["fields"] if n not in names]
        steps = np.array([r["step"] for r in records], dtype=np.float64)
        out = {n: np.array([value(r["fields"][n]) if n in r["fields"] else math.nan for r in records]) for n in names}
        return steps, out


def ia_ratio(f: dict[str, Any]) -> float:
    """A field's IA over a random-init table's (all sets together; one set's when there is one)."""
    overall = _number(f.get("overall_ia_ratio"))
    if math.isfinite(overall):
        return overall
    per_set = [_number(v) for v in f.get("set_ia_ratio") or []]
    return float(np.mean(per_set)) if per_set else math.nan


def diversity(f: dict[str, Any]) -> float:
    return _number(f.get("diversity"))


# ---- the run report ---------------------------------------------------------------------


def write_run_report(run_dir: RunDir) -> list[str]:
    """Draw the curves of ``run_dir`` and write them and ``report.html`` into it (rank 0, at the
    end of a run; every file atomically). Returns the names written. Without matplotlib the
    report has no curves (logged); a curve without records (e.g. no collapse.jsonl) is left out."""
    curves = RunCurves.read(run_dir)
    try:
        figures = render_curves(curves)
    except ImportError as e:
        log.warning("the run report has no curves: %s (pip install matplotlib)", e)
        figures = {}
    for name, png in figures.items():
        run_dir.write_bytes(name, png)
    for name in CURVES:  # a curve drawn by an earlier finish of this run that has no records now
        if name not in figures:
            run_dir.remove(name)
    page = render_run_html(
        run_dir.url, run_dir.read_summary() or {}, run_dir.read_text(CONFIG), run_dir.read_text(PLAN), figures, curves
    )
    run_dir.write_text(REPORT, page)
    log.info("run report %s (%s)", run_dir.file(REPORT), ", ".join(figures) or "no curves")
    return [*figures, REPORT]


def render_curves(curves: RunCurves) -> dict[str, bytes]:
    """name -> PNG bytes of every curve that has records. A figure that fails to draw is left
    out with a warning (the run's outcome is already written; its report should not fail it);
    ImportError (no matplotlib) is raised."""
    wanted = {
        LOSS_PNG: (_loss_figure, curves.has("train", "loss")),
        VALIDATION_PNG: (_validation_figure, any(curves.has("val", k) for k in ("auc", "logloss"))),
        THROUGHPUT_PNG: (_throughput_figure, curves.has("train", "examples_per_sec")),
        IA_PNG: (_ia_figure, bool(curves.collapse)),
    }
    out = {}
    for name, (draw, has_records) in wanted.items():
        if not has_records:
            continue
        try:
            out[name] = _png(draw, curves)
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 (a plotting bug on odd data must not fail a finished run)
            log.warning("run report: could not draw %s: %s: %s", name, type(e).__name__, e)
    return out


def training_comparison_png(runs: Sequence[RunCurves]) -> bytes:
    """One PNG of several runs' curves side by side (one line per run): train loss, validation
    AUC, validation NE (logloss where a run lacks NE), and the median over fields of IA /
    random IA. Each run's ``mark_step`` is marked."""
    return _png(_comparison_figure, runs)


# ---- figures ----------------------------------------------------------------------------


def _png(draw: Callable[[Any, Any], Any], what: Any) -> bytes:
    from matplotlib.figure import Figure  # only here: the trainer's start-up stays light

    fig = draw(Figure, what)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _style(n_points: int) -> dict[str, Any]:
    """Markers where the points are few enough to see (a single evaluation is a dot, not nothing)."""
    return {"marker": "o", "ms": 3.5} if n_points <= 40 else {}


def _mark(ax: Any, curves: RunCurves, legend: bool = True, color: str = "tab:red") -> None:
    for i, step in enumerate(curves.epoch_ends()):
        ax.axvline(step, color="grey", ls=":", lw=0.8, label="epoch end" if legend and i == 0 else None)
    if curves.mark_step is not None and curves.mark_step >= 0:
        ax.axvline(curves.mark_step, color=color, ls="--", lw=1.2,
                   label=f"{curves.mark_label} (step {curves.mark_step})" if legend else None)


def _finish_axes(ax: Any, ylabel: str, legend: bool = True) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _loss_figure(Figure: Any, curves: RunCurves) -> Any:
    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    steps, loss = curves.series("train", "loss")
    ax.plot(steps, loss, color="tab:blue", lw=1.2, label="train loss (window mean)", **_style(len(steps)))
    vsteps, vloss = curves.series("val", "logloss")
    if len(vsteps):
        ax.plot(vsteps, vloss, color="tab:orange", lw=1.5, marker="o", ms=4, label="validation logloss")
    _mark(ax, curves)
    _finish_axes(ax, "binary cross-entropy (nats)")
    ax.set_title(f"{curves.label}: training loss", fontsize=10)
    fig.tight_layout()
    return fig


def _validation_figure(Figure: Any, curves: RunCurves) -> Any:
    panels = [(k, label) for k, label in (("auc", "AUC"), ("logloss", "logloss"), ("ne", "NE (logloss / base-rate entropy)"))
              if curves.has("val", k)]
    fig = Figure(figsize=(4.6 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, (ax, (key, label)) in enumerate(zip(axes, panels)):
        steps, values = curves.series("val", key)
        ax.plot(steps, values, color="tab:green", lw=1.5, marker="o", ms=4, label=f"validation {key}")
        if curves.mark_step in steps:
            at = values[list(steps).index(curves.mark_step)]
            ax.plot([curves.mark_step], [at], "*", color="tab:red", ms=12, label=f"best: {_fmt(at)}")
        if key == "ne":
            ax.axhline(1.0, color="grey", lw=0.8, ls="-", label="1 = predicting the base rate")
        _mark(ax, curves, legend=i == 0)
        _finish_axes(ax, label)
        ax.set_title(f"validation {label.split(' ')[0]}", fontsize=10)
    fig.suptitle(f"{curves.label}: validation at each evaluation", fontsize=11)
    fig.tight_layout()
    return fig


def _throughput_figure(Figure: Any, curves: RunCurves) -> Any:
    fig = Figure(figsize=(8, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    steps, rate = curves.series("train", "examples_per_sec")
    ax.plot(steps, rate, color="tab:purple", lw=1.2, label="examples/s (window)", **_style(len(steps)))
    finite = rate[np.isfinite(rate)]
    if finite.size:
        ax.axhline(float(np.median(finite)), color="grey", lw=1, ls="--", label=f"median {np.median(finite):,.0f}/s")
    ax.set_ylim(bottom=0)
    _mark(ax, curves)
    _finish_axes(ax, "training examples per second")
    ax.set_title(f"{curves.label}: training throughput per log window, all ranks", fontsize=10)
    fig.tight_layout()
    return fig


def _ia_figure(Figure: Any, curves: RunCurves) -> Any:
    steps, ratios = curves.field_series(ia_ratio)
    _, diversities = curves.field_series(diversity)
    with_diversity = any(np.isfinite(v).any() for v in diversities.values())
    fig = Figure(figsize=(13 if with_diversity else 8.5, 4.6))
    axes = fig.subplots(1, 2 if with_diversity else 1, squeeze=False)[0]
    ax = axes[0]
    style = _style(len(steps))
    for values in ratios.values():  # every field, thin: the spread
        ax.plot(steps, values, color="0.75", lw=0.7, **{**style, "ms": 2})
    grid = np.array(list(ratios.values()))
    last = {n: v[np.isfinite(v)][-1] for n, v in ratios.items() if np.isfinite(v).any()}
    lowest = sorted(last, key=last.get)[:HIGHLIGHTED_FIELDS]
    for i, name in enumerate(lowest):
        ax.plot(steps, ratios[name], lw=1.6, color=f"C{i + 1}", label=f"{name}: {last[name]:.3f} (lowest at the end)", **style)
    ax.plot(steps, _nan_quantile(grid, 0.5), color="black", lw=2.2, label=f"median of {len(ratios)} fields", **style)
    ax.plot([], [], color="0.75", lw=0.7, label="one field each")
    _mark(ax, curves, legend=True)
    _finish_axes(ax, "IA / random-init IA (1 = as spread as a random table)")
    ax.set_title("information abundance per field (all sets together)", fontsize=10)
    if with_diversity:
        ax = axes[1]
        grid = np.array(list(diversities.values()))
        lo, mid, hi = (_nan_quantile(grid, q) for q in (0.0, 0.5, 1.0))
        q1, q3 = _nan_quantile(grid, 0.25), _nan_quantile(grid, 0.75)
        ax.fill_between(steps, lo, hi, color="tab:blue", alpha=0.12, label="min - max over fields")
        ax.fill_between(steps, q1, q3, color="tab:blue", alpha=0.3, label="25% - 75%")
        ax.plot(steps, mid, color="tab:blue", lw=2, label="median", **style)
        ax.set_ylim(0, 1)
        _mark(ax, curves, legend=False)
        _finish_axes(ax, "set diversity (0 = same subspace, 1 = orthogonal)")
        ax.set_title("set diversity per field", fontsize=10)
    fig.suptitle(f"{curves.label}: embedding collapse over training", fontsize=11)
    fig.tight_layout()
    return fig


def _comparison_figure(Figure: Any, runs: Sequence[RunCurves]) -> Any:
    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2).ravel()
    use_ne = all(r.has("val", "ne") for r in runs)
    panels = [
        ("train", "loss", "train loss (window mean)"),
        ("val", "auc", "validation AUC"),
        ("val", "ne", "validation NE") if use_ne else ("val", "logloss", "validation logloss"),
    ]
    for i, r in enumerate(runs):
        color = f"C{i}"
        for ax, (kind, key, _) in zip(axes, panels):
            steps, values = r.series(kind, key)
            ax.plot(steps, values, color=color, lw=1.4, label=r.label, **_style(len(steps)))
        steps, ratios = r.field_series(ia_ratio)
        if ratios:
            axes[3].plot(steps, _nan_quantile(np.array(list(ratios.values())), 0.5), color=color, lw=1.6,
                         label=r.label, **_style(len(steps)))
        if r.mark_step is not None and r.mark_step >= 0:
            for ax in axes:
                ax.axvline(r.mark_step, color=color, ls="--", lw=1)
    for ax, (_, _, title) in zip(axes, [*panels, (None, None, "median over fields of IA / random-init IA")]):
        _finish_axes(ax, title.split(" (")[0], legend=bool(ax.get_lines()))
        ax.set_title(title, fontsize=10)
    if not any(r.collapse for r in runs):
        axes[3].text(0.5, 0.5, "no collapse.jsonl records", ha="center", va="center", transform=axes[3].transAxes)
    fig.suptitle(f"Training curves from each run's metrics.jsonl and collapse.jsonl (dashed: the {runs[0].mark_label})",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _nan_quantile(grid: np.ndarray, q: float) -> np.ndarray:
    """Quantile over fields (axis 0) ignoring NaN; NaN where a step has no finite value."""
    out = np.full(grid.shape[1] if grid.ndim == 2 else 0, math.nan)
    for j in range(out.size):
        column = grid[:, j][np.isfinite(grid[:, j])]
        if column.size:
            out[j] = np.quantile(column, q)
    return out


# ---- HTML -------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:6px 0}details{margin:8px 0}summary{cursor:pointer;font-weight:600}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}.note{color:#555;font-size:13px;max-width:1000px}
"""


def render_run_html(
    url: str,
    summary: dict[str, Any],
    config_text: str | None,
    plan_text: str | None,
    figures: dict[str, bytes],
    curves: RunCurves | None = None,
) -> str:
    """The self-contained page: summary table, every PNG (embedded, and linked by file name),
    config.yaml and plan.txt."""
    e = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = url.rstrip("/").rsplit("/", 1)[-1]
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>Run report: {e(name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Run report: {e(name)}</h1>",
        f"<p class=note>{e(url)} &mdash; generated {e(now)}. The curves mark the best checkpoint's step "
        "(dashed red; the metrics of the summary are from it) and the ends of epochs (dotted grey).</p>",
    ]
    if summary:
        parts += ["<h2>Summary (summary.json)</h2>", _summary_table(summary)]
    else:
        parts.append("<p class=note>No summary.json: the run has not finished.</p>")
    for png in CURVES:
        if png in figures:
            data = base64.b64encode(figures[png]).decode()
            parts.append(
                f"<h2>{e(CAPTIONS[png])}</h2><p class=note><a href='{e(png)}'>{e(png)}</a></p>"
                f"<img alt='{e(png)}' src='data:image/png;base64,{data}'>"
            )
    if not figures:
        parts.append("<p class=note>No curves: no metrics.jsonl records, or matplotlib is not installed.</p>")
    elif IA_PNG not in figures:
        parts.append("<p class=note>No collapse curves: the run has no collapse.jsonl records.</p>")
    for title, text in ((CONFIG, config_text), (PLAN, plan_text)):
        if text:
            parts.append(f"<details><summary>{e(title)}</summary><pre>{e(text)}</pre></details>")
    if curves is not None and curves.metrics:
        vals = [r for r in curves.metrics if r.get("kind") == "val"]
        parts.append(f"<p class=note>{len(curves.metrics)} metrics.jsonl records ({len(vals)} evaluations), "
                     f"{len(curves.collapse)} collapse.jsonl records.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(summary: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for key, value in summary.items():
        if key.endswith("_reason"):
            continue
        reason = summary.get(f"{key}_reason")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is None:
            shown = "n/a"
        elif isinstance(value, float):
            shown = _fmt(value)
        else:
            shown = f"{value:,}" if number else str(value)
        note = f" <span class=note>({e(str(reason))})</span>" if reason else ""
        rows.append(f"<tr><th>{e(key)}</th><td{' class=n' if number else ''}>{e(shown)}{note}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


# ---- small helpers ----------------------------------------------------------------------


def _number(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any) -> str:
    v = _number(value)
    if not math.isfinite(v):
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.5g}"
