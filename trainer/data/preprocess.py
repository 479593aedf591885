"""Raw Criteo / Avazu logs -> the prepared parquet dataset (layout: ``trainer.data.schema``).

Two streaming passes; memory is bounded by the number of distinct tokens, not
by the file size:

1. A background thread parses the raw file (``trainer.data.raw_reader``) while
   the caller validates, splits, transforms and dictionary-encodes each chunk
   and counts the tokens of train rows (``trainer.data.encoding``), spilling the
   encoded chunk to an Arrow stream inside the temporary output directory.
2. Each field's vocabulary is built from the train counts
   (``trainer.data.vocabulary``); the spilled chunks are mapped to ids in a
   background thread while ``DatasetWriter`` writes the splits.

Everything is written inside ``atomic_directory``: a failed run leaves nothing,
a killed one a temporary the next run removes; ``--overwrite`` only replaces a
dataset (a directory with ``schema.json``) and never one that holds the input.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from trainer.atomic_output import atomic_directory
from trainer.cli_help import HelpFormatter
from trainer.data.encoding import BAD_ROW_POLICIES, INTEGER_TRANSFORM, Encoder, map_batches
from trainer.data.raw_formats import FORMATS, RawFormat, raw_format
from trainer.data.raw_reader import open_raw, prefetch, read_chunks
from trainer.data.schema import MISSING_ID, SPLITS, DatasetSchema, SparseField, SplitInfo, write_schema
from trainer.data.splits import TRAIN, parse_split
from trainer.data.synthetic import read_oracle
from trainer.data.vocabulary import build_vocabulary, write_vocabulary
from trainer.data.writer import DatasetWriter
from trainer.errors import UserError, run_cli
from trainer.storage import filesystem, join, require_exists

_SPILL_FILE = "_spill.arrow"
SCHEMA_FILE = "schema.json"  # what marks a dataset: --overwrite replaces nothing else


@dataclass(frozen=True)
class PreprocessConfig:
    """What to read, where to write, and the recipe's knobs."""

    dataset: str  # "criteo" | "avazu"
    input: str  # path or fsspec URL; .gz/.bz2/... decompressed by extension
    output: str  # dataset directory (path or URL) to create
    min_count: int | None = None  # None: the dataset's default (Criteo 10, Avazu 4)
    split: str = "8,1,1"  # train,val,test proportions
    seed: int = 0
    on_bad_rows: str = "fail"  # "fail" | "skip"
    files_per_split: int = 4
    overwrite: bool = False
    block_size: int = 2 << 20  # bytes per CSV parse block
    chunk_rows: int = 1 << 17  # rows validated, encoded and spilled together
    progress: bool = True  # tqdm bars on stderr


def _progress(config: PreprocessConfig, desc: str, total: int | None = None) -> tqdm:
    return tqdm(desc=desc, total=total, unit=" rows", unit_scale=True, mininterval=1.0, disable=not config.progress)


def _check(config: PreprocessConfig) -> tuple[RawFormat, int, tuple[float, float, float]]:
    fmt = raw_format(config.dataset)
    min_count = fmt.default_min_count if config.min_count is None else config.min_count
    if min_count < 1:
        raise UserError(f"--min-count must be >= 1, got {min_count}")
    if config.on_bad_rows not in BAD_ROW_POLICIES:
        raise UserError(f"--on-bad-rows must be one of {list(BAD_ROW_POLICIES)}, got {config.on_bad_rows!r}")
    if config.files_per_split < 1:
        raise UserError(f"--files-per-split must be >= 1, got {config.files_per_split}")
    return fmt, min_count, parse_split(config.split)


def _pass1(config: PreprocessConfig, fmt: RawFormat, fractions: tuple[float, float, float], spill_url: str) -> Encoder:
    """Read, validate, encode and count; the encoded chunks go to ``spill_url``. Returns the encoder's tallies."""
    spill_fs, spill_path = filesystem(spill_url)
    with ThreadPoolExecutor(2, thread_name_prefix="preprocess-encode") as pool:
        encoder = Encoder(fmt, config.input, fractions, config.seed, config.on_bad_rows, pool)
        with (
            open_raw(config.input) as raw,
            contextlib.closing(
                prefetch(read_chunks(raw, fmt, config.input, config.block_size, config.chunk_rows))
            ) as chunks,
            spill_fs.open(spill_path, "wb") as spill_file,
            pa.ipc.new_stream(spill_file, encoder.spill_schema) as spill,
            _progress(config, "pass 1/2: read") as bar,
        ):
            for chunk in chunks:
                spill.write_batch(encoder.encode(chunk))
                bar.update(chunk.table.num_rows + len(chunk.rejected))
    return encoder


def _pass2(
    config: PreprocessConfig, fmt: RawFormat, vocabularies: dict[str, pa.Table], spill_url: str, root: str, rows: int
) -> tuple[dict[str, SplitInfo], np.ndarray]:
    """Map the spilled chunks to ids and write the splits; returns the split infos and OOV counts (split x field)."""
    spill_fs, spill_path = filesystem(spill_url)
    oov = np.zeros((len(SPLITS), len(fmt.sparse_fields)), dtype=np.int64)
    writer = DatasetWriter(root, files_per_split=config.files_per_split)
    with (
        spill_fs.open(spill_path, "rb") as spill_file,
        contextlib.closing(
            prefetch(map_batches(pa.ipc.open_stream(spill_file), fmt, vocabularies, writer.row_group_rows, oov))
        ) as tables,
        _progress(config, "pass 2/2: write", total=rows) as bar,
    ):
        for split, table in tables:
            writer.write(split, table)
            bar.update(table.num_rows)
    splits = writer.close()
    spill_fs.rm(spill_path)
    return splits, oov


def preprocess(config: PreprocessConfig) -> DatasetSchema:
    """Turn the raw file ``config.input`` into a prepared dataset at ``config.output``."""
    fmt, min_count, fractions = _check(config)
    require_exists(config.input)
    with atomic_directory(
        config.output, overwrite=config.overwrite, marker=SCHEMA_FILE, what="dataset", inputs=[config.input]
    ) as root:
        spill_url = join(root, _SPILL_FILE)
        encoder = _pass1(config, fmt, fractions, spill_url)
        kept = int(encoder.split_rows.sum())
        if kept == 0:
            raise UserError(f"{config.input}: no usable data rows ({encoder.rows_read} read, {encoder.bad.count} bad)")
        if encoder.split_rows[TRAIN] == 0:
            raise UserError(f"{config.input}: no row landed in train ({kept} rows); use more rows or another --split")

        vocabularies = {name: build_vocabulary(encoder.counts[name].table(), min_count) for name in fmt.sparse_fields}
        for name, vocabulary in vocabularies.items():
            write_vocabulary(root, name, vocabulary, config.input)
        splits, oov = _pass2(config, fmt, vocabularies, spill_url, root, kept)

        rows = {split: int(n) for split, n in zip(SPLITS, encoder.split_rows)}
        schema = DatasetSchema(
            dataset=fmt.name,
            sparse_fields=[SparseField(name, vocabularies[name].num_rows + MISSING_ID + 1) for name in vocabularies],
            dense_fields=list(fmt.integer_fields),
            splits=splits,
            recipe={
                "source": "trainer.data.preprocess",
                "dataset": fmt.name,
                "input": config.input,
                "min_count": min_count,
                "vocabulary_from": "train",
                "split": list(fractions),
                "seed": config.seed,
                "integer_transform": INTEGER_TRANSFORM if fmt.integer_fields else None,
                "rows_read": encoder.rows_read,
                "bad_rows": {
                    "policy": config.on_bad_rows,
                    "count": encoder.bad.count,
                    "examples": encoder.bad.examples,
                },
                "rows": rows,
                "oov_rate": {
                    split: {name: float(oov[s, f] / max(rows[split], 1)) for f, name in enumerate(fmt.sparse_fields)}
                    for s, split in enumerate(SPLITS)
                },
                **read_oracle(config.input, config.split, config.seed),
            },
        )
        write_schema(root, schema)
    return schema


def summary(schema: DatasetSchema, output: str, seconds: float) -> str:
    """A few lines for the terminal: rows, speed, bad rows, splits, vocabulary, OOV."""
    r = schema.recipe
    rows, bad = r["rows_read"], r["bad_rows"]
    splits = ", ".join(f"{s} {n:,}" for s, n in r["rows"].items())
    oov = {s: float(np.mean(list(rates.values()))) for s, rates in r["oov_rate"].items()}
    lines = [
        f"preprocessed {schema.dataset} -> {output}",
        f"  {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s); "
        f"bad rows skipped: {bad['count']:,}",
        f"  splits: {splits}",
        f"  {len(schema.sparse_fields)} sparse fields, {sum(f.cardinality for f in schema.sparse_fields):,} ids "
        f"in all (min-count {r['min_count']}), {len(schema.dense_fields)} dense",
        "  OOV rate (mean over fields): " + ", ".join(f"{s} {v:.2%}" for s, v in oov.items()),
    ]
    lines += [f"  bad row {e['where']}: {e['reason']}" for e in bad["examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainer.data.preprocess",
        description="Turn raw Criteo/Avazu logs into a prepared dataset.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=sorted(FORMATS), help="criteo (TSV, no header) or avazu (CSV with header)")
    p.add_argument("--input", required=True, help="raw file: path or fsspec URL (.gz etc. decompressed)")
    p.add_argument("--output", required=True, help="dataset directory to create: path or fsspec URL")
    p.add_argument(
        "--min-count", type=int, default=None, help="train tokens rarer than this -> OOV (default: criteo 10, avazu 4)"
    )
    p.add_argument("--split", default="8,1,1", help="train,val,test proportions")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--on-bad-rows", default="fail", choices=BAD_ROW_POLICIES,
                   help="fail: stop at the first bad row; skip: count and drop them")  # fmt: skip
    p.add_argument("--files-per-split", type=int, default=4, help="parquet files per split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    config = PreprocessConfig(
        dataset=args.dataset,
        input=args.input,
        output=args.output,
        min_count=args.min_count,
        split=args.split,
        seed=args.seed,
        on_bad_rows=args.on_bad_rows,
        files_per_split=args.files_per_split,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    schema = preprocess(config)
    print(summary(schema, config.output, time.perf_counter() - start))


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
