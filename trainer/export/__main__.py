"""Export a checkpoint for serving: ``python -m trainer.export --checkpoint PATH --output DIR``.

``--checkpoint`` is a checkpoint directory or a run directory (meaning its best
checkpoint), of any world size, local or an fsspec URL. The artifact (see
``trainer/export/runtime.py`` for its layout) scores raw rows with
``python -m trainer.predict --artifact DIR --input FILE --output FILE``, or with its own
``predictor.py`` and torch alone.
"""

from __future__ import annotations

import argparse

from trainer.cli_help import HelpFormatter, description
from trainer.errors import run_cli
from trainer.export import QUANTIZE_MODES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainer.export", description=description(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH_OR_URL", help="a checkpoint dir, or a run dir (its best checkpoint)")
    p.add_argument("--output", required=True, metavar="PATH_OR_URL", help="the artifact directory to write")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none", help="int8: row-wise 8-bit embedding tables")
    p.add_argument("--dataset", metavar="PATH_OR_URL", help="the training dataset (default: data.path of the run's config.yaml)")
    p.add_argument("--max-auc-drop", type=float, default=0.001, help="refuse an int8 export losing more test AUC than this")
    p.add_argument("--eval-rows", type=int, help="test rows to score at export (default: the whole test split)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = p.parse_args(argv)
    from trainer.export.artifact import ExportConfig, export_artifact

    card = export_artifact(
        ExportConfig(a.checkpoint, a.output, a.quantize, a.dataset, a.max_auc_drop, a.eval_rows, a.overwrite)
    )
    ev = card["metrics"]["export_test"]
    q = card["quantization"]
    line = f"exported {a.output}: test AUC {ev['fp32_auc']:.5f} (fp32)"
    if "int8_auc" in ev:
        line += f", {ev['int8_auc']:.5f} (int8, {ev['auc_change']:+.5f})"
    print(f"{line}; tables {q['table_bytes'] / 2**20:.2f} MiB ({q['mode']})")


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
