"""The phases of preprocessing, each on whole input files, through a work directory.

``count_file`` (pass 1 of one file: validate, split, encode, count train
tokens; the encoded rows spill to the work directory), ``merge`` (every file's
counts -> the vocabularies), ``encode_file`` (pass 2 of one file: ids, its part
files), ``finish`` (``schema.json``). One process runs them in turn; N workers
(``trainer.data.preprocess --workers N``) share the files out and wait for each
other between the phases. A file's outputs depend only on the file, its number
and the vocabularies, so any worker count writes the same bytes.

Work directory (``WORK``; a single process works inside its output)::

    _work/file-K.arrow              count: file K's encoded rows, grouped by split
    _work/file-K.json               count: its rows, split rows, bad rows
    _work/file-K/FIELD.parquet      count: its train (token, count) of each vocabulary field
    _work/merged.json               merge: done
    vocab/FIELD.parquet             merge
    train|val|test/part-*.parquet   encode: file K writes part-{K * files_per_split + i}
    _work/encoded-K.json            encode: its split infos and OOV counts
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from trainer.data.dataset_spec import DatasetSpec
from trainer.data.encoding import (
    DENSE_TRANSFORMS, MAX_BAD_ROW_EXAMPLES, TOKEN_TRANSFORMS, Encoder, check_types, map_batches,
)  # fmt: skip
from trainer.data.raw_formats import RawFormat
from trainer.data.raw_reader import open_raw, parquet_row_groups, prefetch, read_chunks, read_parquet_chunks
from trainer.data.schema import MISSING_ID, SPLITS, DatasetSchema, SparseField, SplitInfo
from trainer.data.splits import TRAIN
from trainer.data.synthetic import read_oracle
from trainer.data.vocabulary import TokenCounts, build_vocabulary, write_vocabulary
from trainer.data.writer import DatasetWriter
from trainer.errors import UserError
from trainer.storage import filesystem, join

WORK = "_work"


@dataclass(frozen=True)
class Job:
    """One preprocessing run: the spec (overrides applied), its input files and their split fractions."""

    spec: DatasetSpec
    files: list[str]
    fractions: list[tuple[float, float, float] | None]  # per file; None: by time
    on_bad_rows: str = "fail"
    files_per_split: int = 4
    block_size: int = 2 << 20
    chunk_rows: int = 1 << 17
    progress: bool = True

    @property
    def where(self) -> str:
        return self.files[0] if len(self.files) == 1 else f"{self.spec.input.paths} ({len(self.files)} files)"

    def bar(self, desc: str, total: int | None = None) -> tqdm:
        return tqdm(desc=desc, total=total, unit=" rows", unit_scale=True, mininterval=1.0, disable=not self.progress)


def _write_json(url: str, value: Any) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe(path, json.dumps(value).encode())


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    return json.loads(fs.cat(path))


def count_file(job: Job, k: int, work: str, counts: dict[str, TokenCounts] | None = None) -> None:
    """Pass 1 of file ``k``: its spill and ``file-K.json`` (written last: the file's done marker).

    Its train token counts are added to ``counts`` (one process: the run's counts, in
    memory) or, when None, written to ``_work/file-K/FIELD.parquet`` for ``merge``.
    """
    spec, file = job.spec, job.files[k]
    spill_fs, spill_path = filesystem(join(work, WORK, f"file-{k:05d}.arrow"))
    spill_fs.makedirs(spill_path.rsplit("/", 1)[0], exist_ok=True)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(2, thread_name_prefix="preprocess-encode"))
        if spec.input.format == "parquet":
            handle = stack.enter_context(fsspec.open(file, "rb"))
            starts = np.cumsum([0, *parquet_row_groups(handle, file)])
            chunks = read_parquet_chunks(handle, file, spec.read_columns(), job.chunk_rows, lambda s: check_types(spec, s, file))
            header_lines = 0

            def locate(row: int) -> str:
                g = int(np.searchsorted(starts, row, "right")) - 1
                return f"row group {g}:row {row - int(starts[g])}"
        else:
            raw = stack.enter_context(open_raw(file))
            chunks = read_chunks(raw, RawFormat.from_spec(spec), file, job.block_size, job.chunk_rows, spec.read_columns())
            header_lines = 1 if spec.input.header else 0

            def locate(row: int) -> str:
                return str(row + 1 + header_lines)

        encoder = Encoder(spec, job.on_bad_rows, pool, counts)
        encoder.start_file(k, file, job.fractions[k], locate)
        chunks = stack.enter_context(contextlib.closing(prefetch(chunks)))
        spill_file = stack.enter_context(spill_fs.open(spill_path, "wb"))
        spill = stack.enter_context(pa.ipc.new_stream(spill_file, encoder.spill_schema))
        bar = stack.enter_context(job.bar(f"pass 1/2: read {file.rsplit('/', 1)[-1]}"))
        for chunk in chunks:
            spill.write_batch(encoder.encode(chunk, header_lines))
            bar.update(chunk.table.num_rows + len(chunk.rejected))
    for name, file_counts in encoder.counts.items() if counts is None else ():
        fs, path = filesystem(join(work, WORK, f"file-{k:05d}", f"{name}.parquet"))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(file_counts.table(), f)
    _write_json(join(work, WORK, f"file-{k:05d}.json"), {
        "rows_read": encoder.rows_read,
        "split_rows": encoder.split_rows.tolist(),
        "bad_rows": encoder.bad.count,
        "bad_examples": encoder.bad.examples,
    })  # fmt: skip


def new_counts(spec: DatasetSpec) -> dict[str, TokenCounts]:
    """Empty train token counts of every vocabulary field."""
    return {c.name: TokenCounts() for c in spec.fields if c.hash_buckets is None}


def merge(job: Job, work: str, counts: dict[str, TokenCounts] | None = None) -> dict[str, pa.Table]:
    """The run's train counts (``counts``, or every file's from the work directory) -> the vocabularies
    (returned, and written to ``vocab/FIELD.parquet``); ``merged.json`` last. Errors when no row landed in train."""
    stats = [read_json(join(work, WORK, f"file-{k:05d}.json")) for k in range(len(job.files))]
    split_rows = np.sum([s["split_rows"] for s in stats], axis=0)
    kept = int(split_rows.sum())
    if kept == 0:
        read, bad = sum(s["rows_read"] for s in stats), sum(s["bad_rows"] for s in stats)
        raise UserError(f"{job.where}: no usable data rows ({read} read, {bad} bad)")
    if split_rows[TRAIN] == 0:
        raise UserError(f"{job.where}: no row landed in train ({kept} rows); use more rows or another split")
    vocabularies = {}
    for c in job.spec.fields:
        if c.hash_buckets is not None:
            continue
        if counts is None:
            field_counts = TokenCounts()
            for k in range(len(job.files)):
                fs, path = filesystem(join(work, WORK, f"file-{k:05d}", f"{c.name}.parquet"))
                with fs.open(path, "rb") as f:
                    table = pq.read_table(f)
                field_counts.add(table["token"].combine_chunks(), table["count"].to_numpy())
        else:
            field_counts = counts[c.name]
        vocabularies[c.name] = build_vocabulary(field_counts.table(), job.spec.min_count(c))
        write_vocabulary(work, c.name, vocabularies[c.name], job.where)
    _write_json(join(work, WORK, "merged.json"), {"rows": kept})
    return vocabularies


def read_vocabularies(job: Job, work: str) -> dict[str, pa.Table]:
    """The vocabularies ``merge`` wrote: field -> (token binary, id, count)."""
    out = {}
    for c in job.spec.fields:
        if c.hash_buckets is None:
            fs, path = filesystem(join(work, "vocab", f"{c.name}.parquet"))
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            out[c.name] = table.set_column(0, "token", table["token"].cast(pa.binary()))
    return out


def encode_file(job: Job, k: int, work: str, vocabularies: dict[str, pa.Table]) -> None:
    """Pass 2 of file ``k``: its part files and ``encoded-K.json`` (last); its spill is removed."""
    spill_fs, spill_path = filesystem(join(work, WORK, f"file-{k:05d}.arrow"))
    oov = np.zeros((len(SPLITS), len(job.spec.fields)), dtype=np.int64)
    writer = DatasetWriter(work, files_per_split=job.files_per_split, first_part=k * job.files_per_split)
    with (
        spill_fs.open(spill_path, "rb") as spill_file,
        contextlib.closing(
            prefetch(map_batches(pa.ipc.open_stream(spill_file), job.spec, vocabularies, writer.row_group_rows, oov))
        ) as tables,
        job.bar("pass 2/2: write") as bar,
    ):
        for split, table in tables:
            writer.write(split, table)
            bar.update(table.num_rows)
    splits = writer.close()
    spill_fs.rm(spill_path)
    _write_json(join(work, WORK, f"encoded-{k:05d}.json"), {
        "splits": {s: {"rows": i.rows, "files": i.files} for s, i in splits.items()},
        "oov": oov.tolist(),
    })  # fmt: skip


def finish(job: Job, work: str, cardinalities: dict[str, int]) -> DatasetSchema:
    """The dataset's schema from the work files (``cardinalities``: vocabulary rows of each vocabulary field)."""
    spec, n = job.spec, len(job.files)
    stats = [read_json(join(work, WORK, f"file-{k:05d}.json")) for k in range(n)]
    encoded = [read_json(join(work, WORK, f"encoded-{k:05d}.json")) for k in range(n)]
    split_rows = np.sum([s["split_rows"] for s in stats], axis=0)
    oov = np.sum([e["oov"] for e in encoded], axis=0)
    splits = {
        s: SplitInfo(sum(e["splits"][s]["rows"] for e in encoded), [f for e in encoded for f in e["splits"][s]["files"]])
        for s in SPLITS
    }
    rows = {split: int(r) for split, r in zip(SPLITS, split_rows)}
    fields = [
        SparseField(
            c.name,
            (cardinalities[c.name] if c.hash_buckets is None else c.hash_buckets) + MISSING_ID + 1,
            c.max_length if c.type == "multi_hot" else 1,
            c.pooling,
        )
        for c in spec.fields
    ]
    ratios = [float(r) for r in spec.split.ratios]
    criteo_log = any(c.token == "criteo_log" for c in spec.fields)
    recorded = spec.to_dict()
    recorded["input"]["paths"] = []  # the files are the recipe's "input"
    examples = [e for s in stats for e in s["bad_examples"]][:MAX_BAD_ROW_EXAMPLES]
    return DatasetSchema(
        dataset=spec.name,
        sparse_fields=fields,
        dense_fields=[c.name for c in spec.dense_columns],
        splits=splits,
        recipe={
            "source": "trainer.data.preprocess",
            "dataset": spec.name,
            "input": job.files[0] if n == 1 else job.files,
            "min_count": spec.defaults.min_count,
            "vocabulary_from": "train",
            "split": [r / sum(ratios) for r in ratios] if spec.split.kind == "random" else spec.split.kind,
            "seed": spec.split.seed,
            "integer_transform": (
                f"token: {TOKEN_TRANSFORMS['criteo_log']}; dense: {DENSE_TRANSFORMS['log1p']}" if criteo_log else None
            ),
            "rows_read": sum(s["rows_read"] for s in stats),
            "bad_rows": {"policy": job.on_bad_rows, "count": sum(s["bad_rows"] for s in stats), "examples": examples},
            "rows": rows,
            "oov_rate": {
                split: {c.name: float(oov[s][f] / max(rows[split], 1)) for f, c in enumerate(spec.fields)}
                for s, split in enumerate(SPLITS)
            },
            "spec": recorded,
            **(read_oracle(job.files[0], ",".join(str(r) for r in ratios), spec.split.seed) if n == 1 else {}),
        },
    )


def remove_work(work: str) -> None:
    fs, path = filesystem(join(work, WORK))
    if fs.exists(path):
        fs.rm(path, recursive=True)
