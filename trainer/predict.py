"""Batch scoring of raw rows: ``python -m trainer.predict --artifact DIR --input FILE --output FILE``.

The input is a raw file in the layout the model was trained on (Criteo TSV, Avazu CSV;
``.gz`` read as gzip), with or without the label column: a header says which (Avazu), and
a layout without one (Criteo) needs ``--labeled`` or ``--unlabeled`` (the width is never
used to guess: a labelled row missing a column is as wide as an unlabelled one). A
``.parquet`` input (a raw Parquet log, as a Parquet dataset spec reads) is read by column
name: the label is written beside the scores when the file has it (``--unlabeled``
leaves it out). The output is a CSV ``row,probability[,label]``, written under a
temporary name and renamed when complete; an existing output is refused unless
``--overwrite``. The artifact's manifest is checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Iterator

from trainer.cli_help import HelpFormatter, description
from trainer.errors import UserError, run_cli

log = logging.getLogger("trainer.predict")
PARQUET_SUFFIXES = (".parquet", ".pq")


def score_parquet(predictor: Any, path: str, output: str, batch_rows: int, labeled: bool | None, overwrite: bool) -> int:
    """Score a raw Parquet file with ``predictor`` (``trainer.export.runtime.Predictor``) into
    ``output``, its values read as the preprocessor reads them (numbers as their text, a
    list column as a list of texts); returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.export.runtime import ArtifactError

    out = predictor.check_output(output, overwrite, path)
    transform = predictor.transform
    try:
        file = pq.ParquetFile(path)
    except FileNotFoundError:
        raise ArtifactError(f"input not found: {path}") from None
    except (pa.ArrowException, OSError) as e:
        raise ArtifactError(f"{path}: not a readable parquet file ({e})") from None
    names = file.schema_arrow.names
    missing = [f for f in transform.fields if f not in names]
    if missing:
        raise ArtifactError(f"{path}: no column(s) {missing} of the model's fields; the file has {names}")
    label = transform.layout.label
    has_label = label in names and labeled is not False
    if labeled and not has_label:
        raise ArtifactError(f"{path}: --labeled, but the file has no {label} column; it has {names}")

    def text(column: pa.Array) -> list:
        """Values as the preprocessor's tokens: text (numbers as their decimal text), lists of texts."""
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            return column.cast(pa.list_(pa.string())).to_pylist()
        if pa.types.is_boolean(column.type):
            column = column.cast(pa.int8())
        return column.cast(pa.string()).to_pylist()

    def batches() -> Iterator[tuple[Any, list[str] | None]]:
        done = 0
        for batch in file.iter_batches(batch_size=batch_rows, columns=transform.fields + ([label] if has_label else [])):
            try:
                columns = [text(batch.column(f)) for f in transform.fields]
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as e:
                raise ArtifactError(f"{path}: a column cannot be read as tokens ({e})") from None
            lines = [f"row {done + i + 1}" for i in range(batch.num_rows)]  # errors say FILE:row N
            ids = transform.column_ids(columns, batch.num_rows, lines, path)
            done += batch.num_rows
            yield ids, text(batch.column(label)) if has_label else None

    return predictor.write_scores(out, batches(), has_label)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainer.predict", description=description(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--artifact", required=True, help="an artifact directory written by trainer.export")
    p.add_argument("--input", required=True, help="raw rows to score: the layout the model was trained on, or .parquet")
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
        if a.input.endswith(PARQUET_SUFFIXES):
            rows = score_parquet(predictor, a.input, a.output, a.batch_rows, labeled=a.labeled, overwrite=a.overwrite)
        else:
            rows = predictor.score_file(a.input, a.output, a.batch_rows, labeled=a.labeled, overwrite=a.overwrite)
    except ArtifactError as e:
        raise UserError(str(e)) from None
    seconds = time.monotonic() - started
    print(f"scored {rows} rows of {a.input} into {a.output} in {seconds:.1f}s ({rows / max(seconds, 1e-9):,.0f} rows/s)")


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
