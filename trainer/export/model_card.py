"""The human-readable model card (``model_card.md``) of an artifact, from ``model_card.json``."""

from __future__ import annotations

from typing import Any


def _num(value: Any, spec: str = ".5f") -> str:
    return "n/a" if value is None else format(value, spec)


def render_model_card(card: dict[str, Any]) -> str:
    """Markdown: what the model is, what it takes, how good it is, where it came from."""
    m, e, q, d = card["model"], card["embedding"], card["quantization"], card["data"]
    trained = card["metrics"]["trainer"] or {}
    ev = card["metrics"]["export_test"]
    mode = "multi-embedding" if e["mode"] == "me" else "single-embedding"
    lines = [
        f"# {m['name']} CTR model, {mode} {e['scale']}x ({e['num_sets']} set(s) of dim {e['dim']})",
        "",
        f"Exported {card['exported_at']} from `{card['source']['checkpoint']}` (step {card['source']['step']}, "
        f"trained on {card['source']['world_size']} rank(s)).",
        "",
        "## Inputs and output",
        "",
        f"- `ids`: {card['inputs']['ids']}; fields in order: {', '.join(card['inputs']['fields'])}",
        f"- output: {card['output']}",
        "- raw rows: `predictor.py` maps them with `feature_spec.json` and `vocab/` exactly as preprocessing did",
        "",
        "## Quality",
        "",
        "| | test AUC | test logloss | rows |",
        "|---|---|---|---|",
        f"| trainer (best checkpoint) | {_num(trained.get('test_auc'))} | {_num(trained.get('test_logloss'))} | all |",
        f"| exported program, fp32 | {_num(ev['fp32_auc'])} | {_num(ev['fp32_logloss'])} | {ev['rows']} |",
    ]
    if "int8_auc" in ev:
        lines.append(f"| exported program, int8 | {_num(ev['int8_auc'])} | {_num(ev['int8_logloss'])} | {ev['rows']} |")
    if card["metrics"]["trainer_note"]:
        lines += ["", f"Note: {card['metrics']['trainer_note']}."]
    lines += [
        "",
        "## Size",
        "",
        f"- embedding tables: {q['table_bytes'] / 2**20:.2f} MiB ({q['mode']}; fp32 would be {q['fp32_table_bytes'] / 2**20:.2f} MiB)",
        f"- program file: {q['program_bytes'] / 2**20:.2f} MiB",
        "",
        "## Embedding collapse at export",
        "",
        f"Mean information abundance {_num(card['collapse']['mean_ia'], '.2f')} "
        f"(normalised by a random table of the same shape: {_num(card['collapse']['mean_ia_normalized'], '.3f')}); "
        f"mean set diversity {_num(card['collapse']['mean_diversity'], '.3f')}.",
        "",
        "## Data",
        "",
        f"- dataset: {d['dataset']} at `{d['path']}`; splits {d['split_rows']}",
        f"- {len(d['fields'])} fields: " + ", ".join(f"{name} ({card})" for name, card in d["fields"]),
        "",
        "## Model",
        "",
        f"- interaction: {m}",
        f"- embedding: {e}",
        f"- versions: {card['versions']}",
        "",
    ]
    return "\n".join(lines)
