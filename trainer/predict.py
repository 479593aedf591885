"""Batch scoring of raw rows: ``python -m trainer.predict --artifact DIR --input FILE --output FILE``.

The input is a raw file in the layout the model was trained on (Criteo TSV, Avazu CSV;
``.gz`` read as gzip), with or without the label column: a header says which (Avazu), and
a layout without one (Criteo) needs ``--labeled`` or ``--unlabeled`` (the width is never
used to guess: a labelled row missing a column is as wide as an unlabelled one). The
output is a CSV ``row,probability[,label]``, written under a temporary name and renamed
when complete; an existing output is refused unless ``--overwrite``. The artifact's
manifest is checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import logging
import time

from trainer.cli_help import HelpFormatter, description
from trainer.errors import UserError, run_cli

log = logging.getLogger("trainer.predict")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainer.predict", description=description(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--artifact", required=True, help="an artifact directory written by trainer.export")
    p.add_argument("--input", required=True, help="raw rows to score")
    p.add_argument("--output", required=True, help="the CSV of probabilities to write")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--labeled", dest="labeled", action="store_const", const=True,
                        help="the rows have the label column (needed for a layout without a header, e.g. Criteo TSV)")
    layout.add_argument("--unlabeled", dest="labeled", action="store_const", const=False,
                        help="the rows have no label column (needed for a layout without a header)")
    p.add_argument("--batch-rows", type=int, default=8192, help="rows per scoring batch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a = p.parse_args(argv)
    from trainer.export.runtime import ArtifactError, Predictor

    if a.batch_rows < 1:
        raise UserError("--batch-rows must be positive")
    started = time.monotonic()
    try:
        predictor = Predictor(a.artifact)
        rows = predictor.score_file(a.input, a.output, a.batch_rows, labeled=a.labeled, overwrite=a.overwrite)
    except ArtifactError as e:
        raise UserError(str(e)) from None
    seconds = time.monotonic() - started
    print(f"scored {rows} rows of {a.input} into {a.output} in {seconds:.1f}s ({rows / max(seconds, 1e-9):,.0f} rows/s)")


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
