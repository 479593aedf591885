"""The sweep's report: the paper's Table 1 for our runs, and its plots.

From the records of ``pipelines.sweep`` (one per cell), written into the output directory,
each file atomically (temporary name, then rename)::

    results.jsonl       the records, one line per cell
    table.md            per dataset: test AUC, test logloss and test NE (normalized entropy),
                        one table each, rows model x SE/ME, columns
                        scales, mean ± std over seeds, best per column in bold; the paper's
                        own numbers beside them where the dataset is mapped to one of its
                        datasets; failed cells listed with their logs
    table.csv           the same numbers, machine-readable
    auc_vs_scale.png    test AUC against scale, one subplot per model (rows: datasets)
    ia_vs_scale.png     mean information abundance over fields against scale, the same way

A cell trained once at 1x for both curves (SE 1x is ME 1x) counts in both rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from pipelines.paper_results import CITATION, display_name, paper_test_auc
from pipelines.sweep_spec import SweepSpec

# metric -> (title, higher is better)
METRICS = {
    "test_auc": ("Test AUC", True),
    "test_logloss": ("Test logloss", False),
    "test_ne": ("Test NE", False),  # normalized entropy: logloss / entropy of the test split's base rate
}
DIGITS = 5


@dataclass
class Stat:
    """One table cell: the values of the seeds that finished, how many were expected and failed."""

    values: list[float] = field(default_factory=list)
    expected: int = 0
    failed: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None below two values)."""
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


Key = tuple[str, str, int]  # (model, mode, scale)


def aggregate(records: Iterable[dict[str, Any]], dataset: str, metric: str, seeds: int | None = None) -> dict[Key, Stat]:
    """``(model, mode, scale) -> Stat`` of ``metric`` over seeds for one dataset. A record
    standing for several modes (the shared 1x cell) counts in each of them."""
    stats: dict[Key, Stat] = {}
    for r in records:
        if r["dataset"] != dataset:
            continue
        for mode in r.get("modes") or [r["mode"]]:
            s = stats.setdefault((r["model"], mode, r["scale"]), Stat())
            s.expected += 1
            value = r.get(metric)
            if r["status"] == "done" and isinstance(value, (int, float)) and math.isfinite(value):
                s.values.append(float(value))
            elif r["status"] == "failed":
                s.failed += 1
    if seeds is not None:
        for s in stats.values():
            s.expected = max(s.expected, seeds)
    return stats


def best_keys(stats: dict[Key, Stat | float | None], higher_is_better: bool) -> set[Key]:
    """Per scale (column), the rows with the best mean (all of them on a tie)."""
    def value(s: Stat | float | None) -> float | None:
        return s.mean if isinstance(s, Stat) else s

    best: set[Key] = set()
    for scale in {k[2] for k in stats}:
        column = {k: value(v) for k, v in stats.items() if k[2] == scale and value(v) is not None}
        if not column:
            continue
        top = (max if higher_is_better else min)(column.values())
        best |= {k for k, v in column.items() if abs(v - top) <= 1e-12}
    return best


def paper_stats(spec: SweepSpec, paper_dataset: str) -> dict[Key, float | None]:
    return {
        (model, mode, scale): paper_test_auc(paper_dataset, model, mode, scale)
        for model in spec.models
        for mode in spec.modes
        for scale in spec.scales
    }


def _fmt(v: float) -> str:
    return f"{v:.{DIGITS}f}"


def format_stat(s: Stat | None, bold: bool = False) -> str:
    if s is None or s.n == 0:
        return "failed" if s is not None and s.failed else "—"
    text = f"**{_fmt(s.mean)}**" if bold else _fmt(s.mean)
    if s.std is not None:
        text += f" ± {_fmt(s.std)}"
    if s.n < s.expected:
        text += f" (n={s.n}/{s.expected}{', ' + str(s.failed) + ' failed' if s.failed else ''})"
    return text


def _md_table(spec: SweepSpec, cells: dict[Key, str]) -> list[str]:
    lines = ["| Model | | " + " | ".join(f"{s}x" for s in spec.scales) + " |",
             "| --- | --- | " + " | ".join("---" for _ in spec.scales) + " |"]  # fmt: skip
    for model in spec.models:
        for j, mode in enumerate(spec.modes):
            name = display_name(model) if j == 0 else ""
            lines.append(f"| {name} | {mode.upper()} | " + " | ".join(cells[(model, mode, s)] for s in spec.scales) + " |")
    return lines


def render_markdown(spec: SweepSpec, output: str, records: Sequence[dict[str, Any]]) -> str:
    counts = {k: sum(r["status"] == k for r in records) for k in ("done", "failed", "missing")}
    n_seeds = len(spec.seeds)
    out = [
        "# Scaling sweep",
        "",
        f"Output `{output}`: {len(records)} cell(s), {counts['done']} done, {counts['failed']} failed, "
        f"{counts['missing']} not run yet. Seeds {list(spec.seeds)}; SE at k-x is one embedding set of dim k*K0, "
        "ME at k-x is k sets of dim K0" + (" (1x trained once, shown in both rows)." if spec.share_1x else "."),
        "",
    ]
    paper = spec.paper_datasets()
    for dataset in spec.datasets:
        out += [f"## {dataset}", ""]
        oracle = next((r for r in records if r["dataset"] == dataset and r.get("oracle_test_auc") is not None), None)
        if oracle:
            out += [f"Oracle on the test split (the best any model can reach on this synthetic data): "
                    f"AUC {_fmt(oracle['oracle_test_auc'])}, logloss {_fmt(oracle['oracle_test_logloss'])}.", ""]  # fmt: skip
        for metric, (title, higher) in METRICS.items():
            stats = aggregate(records, dataset, metric, n_seeds)
            best = best_keys(stats, higher)
            how = "higher" if higher else "lower"
            out += [f"### {title} (mean ± std over seeds; {how} is better, best per column in bold)", ""]
            cells = {(m, mo, s): format_stat(stats.get((m, mo, s)), (m, mo, s) in best)
                     for m in spec.models for mo in spec.modes for s in spec.scales}  # fmt: skip
            out += _md_table(spec, cells) + [""]
        if dataset in paper:
            pstats = paper_stats(spec, paper[dataset])
            pbest = best_keys(pstats, True)
            cells = {k: ("—" if v is None else (f"**{_fmt(v)}**" if k in pbest else _fmt(v))) for k, v in pstats.items()}
            out += [f"### Paper ({paper[dataset].capitalize()}): test AUC", "", f"From {CITATION}; — where the paper has no number.", ""]
            out += _md_table(spec, cells) + [""]
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        out += ["## Failed cells", ""]
        out += [f"- `{r['id']}`: {r.get('error') or 'failed'} (log: `{r['log']}`)" for r in failed]
        out.append("")
    return "\n".join(out)


def render_csv(spec: SweepSpec, records: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "metric", "source", "model", "mode"]
               + [f"{s}x_{col}" for s in spec.scales for col in ("mean", "std", "n", "best")])  # fmt: skip

    def num(v: float | None) -> str:
        return "" if v is None else repr(round(v, 10))

    paper = spec.paper_datasets()
    for dataset in spec.datasets:
        for metric, (_, higher) in METRICS.items():
            stats = aggregate(records, dataset, metric, len(spec.seeds))
            best = best_keys(stats, higher)
            for model in spec.models:
                for mode in spec.modes:
                    row = [dataset, metric, "ours", model, mode]
                    for s in spec.scales:
                        st = stats.get((model, mode, s)) or Stat()
                        row += [num(st.mean), num(st.std), st.n, int((model, mode, s) in best)]
                    w.writerow(row)
        if dataset in paper:
            pstats = paper_stats(spec, paper[dataset])
            best = best_keys(pstats, True)
            for model in spec.models:
                for mode in spec.modes:
                    row = [dataset, "test_auc", f"paper_{paper[dataset]}", model, mode]
                    for s in spec.scales:
                        v = pstats[(model, mode, s)]
                        row += [num(v), "", 3 if v is not None else 0, int((model, mode, s) in best)]
                    w.writerow(row)
    return buf.getvalue()


# ---- plots ------------------------------------------------------------------------------


def _figure(spec: SweepSpec, records: Sequence[dict[str, Any]], metric: str, ylabel: str, with_paper: bool) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    datasets, models = list(spec.datasets), list(spec.models)
    # one row per dataset; a single dataset's models wrap at four per row
    ncols = min(4, len(models)) if len(datasets) == 1 else len(models)
    per_dataset = math.ceil(len(models) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.9 * per_dataset * len(datasets)), constrained_layout=True)
    grid = fig.subplots(per_dataset * len(datasets), ncols, squeeze=False)
    for ax in grid.flat[len(models) * len(datasets):]:
        ax.set_visible(False)
    xs = list(range(len(spec.scales)))
    paper = spec.paper_datasets() if with_paper else {}
    styles = {"se": ("tab:blue", "o"), "me": ("tab:red", "s")}
    for i, dataset in enumerate(datasets):
        stats = aggregate(records, dataset, metric)
        for j, model in enumerate(models):
            ax = grid.flat[i * per_dataset * ncols + j]
            drawn = False
            for mode in spec.modes:
                color, marker = styles[mode]
                pts = [(x, stats[(model, mode, s)]) for x, s in zip(xs, spec.scales) if (model, mode, s) in stats and stats[(model, mode, s)].n]
                if pts:
                    ax.errorbar([x for x, _ in pts], [st.mean for _, st in pts], yerr=[st.std or 0.0 for _, st in pts],
                                color=color, marker=marker, capsize=3, label=mode.upper())  # fmt: skip
                    drawn = True
                if dataset in paper:
                    pp = [(x, paper_test_auc(paper[dataset], model, mode, s)) for x, s in zip(xs, spec.scales)]
                    pp = [(x, v) for x, v in pp if v is not None]
                    if pp:
                        ax.plot([x for x, _ in pp], [v for _, v in pp], color=color, linestyle="--", alpha=0.5,
                                label=f"{mode.upper()} paper ({paper[dataset]})")  # fmt: skip
                        drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{s}x" for s in spec.scales])
            ax.set_title(f"{display_name(model)} ({dataset})", fontsize=10)
            ax.grid(alpha=0.3)
            if j % ncols == 0:
                ax.set_ylabel(ylabel)
            ax.set_xlabel("scale")
            if drawn and i == 0 and j == 0:
                ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def render_figures(spec: SweepSpec, records: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    return {
        "auc_vs_scale.png": _figure(spec, records, "test_auc", "test AUC", with_paper=True),
        "ia_vs_scale.png": _figure(spec, records, "mean_ia", "mean IA over fields", with_paper=False),
    }


# ---- writing ----------------------------------------------------------------------------


def _write_atomic(output: str, name: str, data: bytes | str) -> None:
    os.makedirs(output, exist_ok=True)
    target = os.path.join(output, name)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, target)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_results_jsonl(output: str, records: Sequence[dict[str, Any]]) -> None:
    """One strict-JSON line per cell (NaN as null)."""
    lines = [json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in records]
    _write_atomic(output, "results.jsonl", "".join(lines))


def write_tables(spec: SweepSpec, output: str, records: Sequence[dict[str, Any]]) -> None:
    write_results_jsonl(output, records)
    _write_atomic(output, "table.md", render_markdown(spec, output, records))
    _write_atomic(output, "table.csv", render_csv(spec, records))


def write_report(spec: SweepSpec, output: str, records: Sequence[dict[str, Any]], plots: bool = True) -> list[str]:
    """Write every report file; returns their names."""
    write_tables(spec, output, records)
    names = ["results.jsonl", "table.md", "table.csv"]
    if plots:
        for name, png in render_figures(spec, records).items():
            _write_atomic(output, name, png)
            names.append(name)
    return names
