"""Raw logs -> the prepared parquet dataset (layout: ``trainer.data.schema``), as a dataset spec says.

The spec (``trainer.data.dataset_spec``; ``--dataset criteo|avazu|...`` names a
shipped one under ``configs/datasets/``) gives the input files, the columns and
the split. Two streaming passes over each input file, in file order; memory is
bounded by the number of distinct tokens of the vocabulary fields (hashed
fields hold none), not by the file sizes:

1. A background thread parses the file (``trainer.data.raw_reader``) while
   the caller validates, splits, transforms and dictionary-encodes each chunk
   and counts the tokens of train rows (``trainer.data.encoding``), spilling the
   encoded chunks to an Arrow stream inside the temporary output directory.
2. Each field's vocabulary is built from the train counts of every file
   (``trainer.data.vocabulary``); each file's spilled chunks are mapped to ids
   in a background thread while a ``DatasetWriter`` writes its part files
   (file ``k``: ``part-{k * files_per_split + i}``).

The phases work file by file (``trainer.data.phases``), so ``--workers N
--worker I`` (one torchx job of N replicas: ``pipelines/components.py``) shares
the files out and writes the same bytes as one process: each worker counts its
files, worker 0 merges the counts into the vocabularies, each encodes its
files, worker 0 writes ``schema.json``; they meet through files in ``--work``
(``WORK/RUN_ID``, which may not overlap the input or the output). Worker 0 removes
the directories that runs no longer running left in ``--work`` (each worker notes
its host and pid there) and reports those it cannot vouch for.

Everything is written inside ``atomic_directory``: a failed run leaves nothing,
a killed one a temporary the next run removes; ``--overwrite`` only replaces a
dataset (a directory with ``schema.json``) and never one that holds the input.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from dataclasses import dataclass, replace
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from trainer.atomic_output import atomic_directory, check_writable, clean_or_report, owner_record, refuse_overlap
from trainer.cli_help import HelpFormatter
from trainer.data.dataset_spec import DatasetSpec, load_spec, shipped_names, shipped_spec
from trainer.data.encoding import BAD_ROW_POLICIES
from trainer.data.global_shuffle import order_train
from trainer.data.phases import (
    WORK, Job, count_file, encode_file, finish, merge, new_counts, read_vocabularies, remove_work,
)  # fmt: skip
from trainer.data.schema import SPLITS, DatasetSchema, write_schema
from trainer.data.splits import files_fractions, parse_split
from trainer.errors import UserError, run_cli
from trainer.storage import filesystem, join, require_exists

SCHEMA_FILE = "schema.json"  # what marks a dataset: --overwrite replaces nothing else


@dataclass(frozen=True)
class PreprocessConfig:
    """What to read (a spec), where to write, and the knobs that override the spec."""

    output: str  # dataset directory (path or URL) to create
    dataset: str | None = None  # a shipped spec: configs/datasets/NAME.yaml
    spec: str | None = None  # a spec file (instead of dataset)
    input: str | list[str] | None = None  # path(s), glob(s) or fsspec URL(s); None: the spec's input.paths
    min_count: int | None = None  # None: the spec's (per field, then defaults.min_count); else every vocabulary field's
    split: str | None = None  # "8,1,1": the split's ratios; None: the spec's
    seed: int | None = None  # None: the spec's split seed
    on_bad_rows: str = "fail"  # "fail" | "skip"
    files_per_split: int = 4  # per input file
    overwrite: bool = False
    block_size: int = 2 << 20  # bytes per CSV parse block
    chunk_rows: int = 1 << 17  # rows validated, encoded and spilled together
    progress: bool = True  # tqdm bars on stderr
    shuffle_train: bool = False  # rewrite train in a seeded random order (trainer.data.global_shuffle)


def resolve_spec(config: PreprocessConfig) -> DatasetSpec:
    """The spec with the config's overrides applied (input paths, min-count, split ratios, seed)."""
    if (config.dataset is None) == (config.spec is None):
        raise UserError(f"give --dataset NAME (shipped: {shipped_names()}) or --spec FILE, not both or neither")
    spec = shipped_spec(config.dataset) if config.dataset is not None else load_spec(config.spec)  # type: ignore[arg-type]
    if config.min_count is not None:
        if config.min_count < 1:
            raise UserError(f"--min-count must be >= 1, got {config.min_count}")
        columns = [replace(c, min_count=config.min_count) if c.is_field and c.hash_buckets is None else c for c in spec.columns]
        spec = spec.replace(columns=columns, defaults=replace(spec.defaults, min_count=config.min_count))
    if config.split is not None:
        spec = spec.replace(split=replace(spec.split, ratios=list(parse_split(config.split))))
    if config.seed is not None:
        spec = spec.replace(split=replace(spec.split, seed=config.seed))
    if config.input is not None:
        paths = [config.input] if isinstance(config.input, str) else list(config.input)
        spec = spec.replace(input=replace(spec.input, paths=paths))
    if config.on_bad_rows not in BAD_ROW_POLICIES:
        raise UserError(f"--on-bad-rows must be one of {list(BAD_ROW_POLICIES)}, got {config.on_bad_rows!r}")
    if config.files_per_split < 1:
        raise UserError(f"--files-per-split must be >= 1, got {config.files_per_split}")
    return spec


def input_files(spec: DatasetSpec) -> list[str]:
    """Every input file (URL), sorted within each path or glob, each once: its index is its file number."""
    if not spec.input.paths:
        raise UserError(f"dataset spec {spec.name!r} names no input.paths; pass --input")
    files: list[str] = []
    for pattern in spec.input.paths:
        fs, path = fsspec.core.url_to_fs(pattern)
        local = isinstance(fs, LocalFileSystem)
        if any(c in path for c in "*?["):
            found = [p if local else fs.unstrip_protocol(p) for p in sorted(fs.glob(path)) if fs.isfile(p)]
            if not found:
                raise UserError(f"input {pattern}: no file matches")
        else:
            require_exists(pattern)
            found = [pattern]
        files += [f for f in found if f not in files]
    return files


def file_fractions(spec: DatasetSpec, files: list[str]) -> list[tuple[float, float, float] | None]:
    """Per input file: the fractions its rows are spread over the splits by (None: by time)."""
    s = spec.split
    ratios = tuple(float(r) for r in s.ratios)
    total = sum(ratios)
    if s.kind == "time":
        return [None] * len(files)
    if s.kind == "random":
        return [(ratios[0] / total, ratios[1] / total, ratios[2] / total)] * len(files)
    assert s.files is not None
    out: list[tuple[float, float, float] | None] = []
    for f in files:
        name = f.rstrip("/").rsplit("/", 1)[-1]
        listed = {k for k, split in enumerate(SPLITS) if any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(f, g) for g in s.files.get(split, []))}
        if not listed:
            raise UserError(f"input file {f} matches no glob of split.files ({dict(s.files)})")
        out.append(files_fractions(listed, ratios))  # type: ignore[arg-type]
    return out


def job_of(config: PreprocessConfig) -> Job:
    """The run ``config`` asks for: spec, input files, split fractions, knobs."""
    spec = resolve_spec(config)
    files = input_files(spec)
    return Job(
        spec, files, file_fractions(spec, files), config.on_bad_rows, config.files_per_split,
        config.block_size, config.chunk_rows, config.progress,
    )  # fmt: skip


def preprocess(config: PreprocessConfig) -> DatasetSchema:
    """Turn the spec's raw files into a prepared dataset at ``config.output``, in this process."""
    job = job_of(config)
    with atomic_directory(
        config.output, overwrite=config.overwrite, marker=SCHEMA_FILE, what="dataset", inputs=job.files
    ) as root:
        counts = new_counts(job.spec)
        for k in range(len(job.files)):
            count_file(job, k, root, counts)
        vocabularies = merge(job, root, counts)
        del counts
        for k in range(len(job.files)):
            encode_file(job, k, root, vocabularies)
        schema = finish(job, root, {name: v.num_rows for name, v in vocabularies.items()})
        remove_work(root)
        schema = order_train(root, schema, config.shuffle_train, job.spec.split.seed)
        write_schema(root, schema)
    return schema


def _barrier(work: str, markers: list[str], workers: int, timeout_s: float) -> None:
    """Wait until every marker file exists under ``work/_work``; a worker's failure note ends the wait."""
    fs, base = filesystem(join(work, WORK))
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [m for m in markers if not fs.exists(f"{base}/{m}")]
        if not missing:
            return
        for i in range(workers):
            if fs.exists(f"{base}/failed-{i}.txt"):
                note = fs.cat(f"{base}/failed-{i}.txt").decode()
                raise UserError(f"worker {i} failed: {note} (a note in {work}; remove it if an earlier run left it)")
        if time.monotonic() > deadline:
            raise UserError(f"waited {timeout_s:.0f} s for the other workers ({missing[:3]} missing); giving up")
        time.sleep(0.2)


def run_worker(config: PreprocessConfig, worker: int, workers: int, work: str, timeout_s: float = 86400) -> DatasetSchema | None:
    """Worker ``worker`` of ``workers``: count its files (k % workers == worker), wait, worker 0 merges,
    wait, encode its files; worker 0 then waits for all and writes ``config.output``. Returns its schema
    (worker 0) or None. Any worker's failure is noted in the work directory and stops the others."""
    if not 0 <= worker < workers:
        raise UserError(f"--worker must be in [0, {workers}), got {worker}")
    job = job_of(config)
    _refuse_work_overlap(work, config, job.files)
    check_writable(work)
    mine = range(worker, len(job.files), workers)
    _note(work, f"owner-{worker}.json", json.dumps(owner_record()))  # tells a later run whether this one lives
    try:
        for k in mine:
            count_file(job, k, work)
        if worker == 0:
            _barrier(work, [f"file-{k:05d}.json" for k in range(len(job.files))], workers, timeout_s)
            vocabularies = merge(job, work)
        elif mine:
            _barrier(work, ["merged.json"], workers, timeout_s)
            vocabularies = read_vocabularies(job, work)
        for k in mine:
            encode_file(job, k, work, vocabularies)
        _note(work, f"done-{worker}.txt", "")  # worker 0 moves the work files away once all are done
        if worker != 0:
            return None
        _barrier(work, [f"done-{i}.txt" for i in range(workers)], workers, timeout_s)
        schema = finish(job, work, {name: v.num_rows for name, v in vocabularies.items()})
        with atomic_directory(
            config.output, overwrite=config.overwrite, marker=SCHEMA_FILE, what="dataset", inputs=job.files
        ) as root:
            fs, work_path = filesystem(work)
            _, root_path = filesystem(root)
            for name in ("vocab", *SPLITS):
                if fs.exists(f"{work_path}/{name}"):
                    fs.mv(f"{work_path}/{name}", f"{root_path}/{name}", recursive=True)
            schema = order_train(root, schema, config.shuffle_train, job.spec.split.seed)
            write_schema(root, schema)
        fs.rm(work_path, recursive=True)
        return schema
    except BaseException as e:
        _note(work, f"failed-{worker}.txt", str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
        raise


def shared_work(config: PreprocessConfig, work: str, run_id: str, worker: int) -> str:
    """This run's directory ``work/run_id`` in the work directory its workers share (which may
    not overlap the input or the output); worker 0 first removes what runs no longer running
    left in ``work`` and reports, with size and how to remove it, what it cannot vouch for."""
    _refuse_work_overlap(work, config, input_files(resolve_spec(config)))
    fs, path = filesystem(work)
    if worker == 0 and fs.isdir(path):
        for entry in sorted(fs.ls(path, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name == run_id or not fs.isdir(entry):
                continue
            owners = sorted(fs.glob(f"{entry.rstrip('/')}/{WORK}/owner-*.json"))
            records = [_owner(fs, o) for o in owners]
            clean_or_report(join(work, name), records, f"the work directory of an earlier run {name!r}")
    return join(work, run_id)


def _refuse_work_overlap(work: str, config: PreprocessConfig, files: list[str]) -> None:
    """A clear error when the work directory is, holds or lies inside an input file or the output."""
    for other, what in [*((f, "input") for f in files), (config.output, "output")]:
        try:
            refuse_overlap(work, other)
        except UserError:
            raise UserError(f"--work {work} overlaps the {what} {other}: choose another --work") from None


def _owner(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """An owner record a worker noted (``owner_record``), or "unreadable"."""
    try:
        return json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return "unreadable"


def _note(work: str, name: str, text: str) -> None:
    """``work/_work/NAME`` holding ``text``: a marker the other workers wait for."""
    fs, base = filesystem(join(work, WORK))
    fs.makedirs(base, exist_ok=True)
    fs.pipe(f"{base}/{name}", text.encode())


def summary(schema: DatasetSchema, output: str, seconds: float) -> str:
    """A few lines for the terminal: rows, speed, bad rows, splits, vocabulary, OOV."""
    r = schema.recipe
    rows, bad = r["rows_read"], r["bad_rows"]
    splits = ", ".join(f"{s} {n:,}" for s, n in r["rows"].items())
    oov = {s: sum(rates.values()) / max(len(rates), 1) for s, rates in r["oov_rate"].items()}
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
        description="Turn raw logs into a prepared dataset, as a dataset spec (YAML) says.",
        formatter_class=HelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--dataset", choices=shipped_names(), help="a shipped spec: configs/datasets/NAME.yaml")
    which.add_argument("--spec", help="a dataset spec file (YAML; keys in trainer/data/dataset_spec.py)")
    p.add_argument("--input", action="append", help="raw file(s): path, glob or fsspec URL; repeatable (default: the spec's input.paths)")
    p.add_argument("--output", required=True, help="dataset directory to create: path or fsspec URL")
    p.add_argument("--min-count", type=int, default=None, help="every vocabulary field's min count (default: the spec's)")
    p.add_argument("--split", default=None, help="train,val,test proportions (default: the spec's split.ratios)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the spec's split.seed)")
    p.add_argument("--shuffle-train", action="store_true",
                   help="write train's rows in a random order seeded by the split seed (a global shuffle; memory flat)")  # fmt: skip
    p.add_argument("--on-bad-rows", default="fail", choices=BAD_ROW_POLICIES,
                   help="fail: stop at the first bad row; skip: count and drop them")  # fmt: skip
    p.add_argument("--files-per-split", type=int, default=4, help="parquet files per split and input file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--workers", type=int, default=1, help="workers of a scaled-out run (one per replica)")
    p.add_argument("--worker", type=int, default=0, help="this worker's number, 0 .. workers-1 (0 writes the output)")
    p.add_argument("--work", default=None,
                   help="with --workers > 1: the work directory the workers share (default OUTPUT.work), "
                        "a shared volume or object store")  # fmt: skip
    p.add_argument("--run-id", default="",
                   help="with --workers > 1, required: a name fresh to this run, the same for all its workers "
                        "(its part of --work; torchx passes the app id)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    config = PreprocessConfig(
        output=args.output,
        dataset=args.dataset,
        spec=args.spec,
        input=args.input,
        min_count=args.min_count,
        split=args.split,
        seed=args.seed,
        on_bad_rows=args.on_bad_rows,
        files_per_split=args.files_per_split,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        shuffle_train=args.shuffle_train,
    )
    start = time.perf_counter()
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.workers == 1:
        schema = preprocess(config)
    else:
        if not args.run_id:  # a previous run's notes in the work directory would mislead this one's workers
            raise UserError("--workers > 1 needs --run-id: a name fresh to this run, the same for all its workers")
        work = args.work or config.output.rstrip("/") + ".work"
        schema = run_worker(config, args.worker, args.workers, shared_work(config, work, args.run_id, args.worker))
        fs, path = filesystem(work)
        if schema is not None and fs.exists(path) and not fs.ls(path, detail=False):
            fs.rm(path, recursive=True)  # this run's part is gone: the shared directory too, when empty
    if schema is not None:
        print(summary(schema, config.output, time.perf_counter() - start))
    else:
        print(f"worker {args.worker}/{args.workers}: done in {time.perf_counter() - start:.1f} s")


cli = lambda: run_cli(main)  # noqa: E731 - the console script ([project.scripts] in pyproject.toml)
if __name__ == "__main__":
    run_cli(main)
