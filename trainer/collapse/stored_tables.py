"""Embedding tables out of a DCP checkpoint, one field at a time, in any process.

A training checkpoint (``trainer.checkpoint``: ``RUN/checkpoints/step-XXXXXXXX/`` with
DCP shards, ``.metadata`` and ``meta.json``) holds each table under the key
``trainer.table_layout.checkpoint_weight_key`` gives, as the chunks the writing ranks held (whole tables, column slices, row slices). This reader
needs no process group and no model: ``torch.distributed.checkpoint.load`` fills plain
tensors in a single process (``no_dist``), whatever world size wrote the checkpoint, and
a custom load plan asks only for a row window and the first ``dim`` columns of a table
(the padding columns up to ``storage_dim`` are never read).

Memory: DCP's file reader deserialises a stored chunk whole, so a field is read in row
bands aligned with the stored chunks' row boundaries (merged up to ``band_rows``): a
band costs the field's M sets' stored chunks overlapping it, i.e. at most the pieces the
writing ranks held; a table-wise or column-wise sharded table is one band (the whole
table, which one rank held when it was written). The float64 work is chunked below that
(``trainer.collapse.gram``).

``.metadata`` is read through ``trainer.dcp_io``'s allow-list unpickler; ``analyze_checkpoint``
verifies every file's checksum once it has read the tables (a truncated shard fails the
read itself, a flipped byte only the checksum), so no report comes from a corrupt checkpoint. Paths and URLs go through fsspec: local paths
(DCP's ``FileSystemReader``) and any
fsspec URL (DCP's ``FsspecReader``), e.g. ``memory://`` (checked in the tests), ``s3://``
or ``gs://`` with their fsspec packages installed.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from trainer import dcp_io
from trainer.checkpoint import DCP_METADATA, META, read_meta, resolve_checkpoint, verify_files
from trainer.collapse.analysis import DEFAULT_RTOL, CollapseReport, FieldCollapse, analyze_field
from trainer.collapse.gram import DEFAULT_CHUNK_ROWS, field_gram_from_chunks
from trainer.errors import UserError
from trainer.storage import filesystem, join
from trainer.table_layout import (
    CHECKPOINT_MODEL_PREFIX,
    EMBEDDING_MODES,
    checkpoint_weight_key,
    embedding_shape,
    table_name,
    table_weight_key,
)

log = logging.getLogger("trainer.collapse")

DEFAULT_BAND_ROWS = 1 << 20


@dataclass(frozen=True)
class TableKey:
    set_index: int
    field: str
    key: str  # the DCP key of the weight
    rows: int
    storage_dim: int


class CheckpointTables:
    """The embedding tables of one training checkpoint, read field by field.

    Example::

        ckpt = CheckpointTables("runs/x/checkpoints/step-00001000")   # or a run dir / URL
        ckpt.fields            # [("C1", 1460), ...]
        for bands in ckpt.field_bands("C1"):   # each band: M tensors (n, K), same rows
            ...
        ckpt.load_field("C1")  # M tensors (rows, K): the whole field
    """

    def __init__(self, url: str, band_rows: int = DEFAULT_BAND_ROWS):
        self.url = resolve_checkpoint(url)
        self.band_rows = band_rows
        self.meta = read_meta(self.url)
        fs, path = filesystem(self.url)
        if not fs.exists(join(path, DCP_METADATA)):
            raise UserError(f"{self.url} is not a DCP checkpoint: it has no {DCP_METADATA} file")
        self.identity = self.meta.get("identity")
        if not isinstance(self.identity, dict):
            raise UserError(f"checkpoint {self.url}: its {META} has no model identity (not written by trainer.main?)")
        self.num_sets, self.dim, self.embedding = _embedding_of(self.identity, self.url)
        model = self.identity.get("model")
        self.model_name: str | None = model.get("name") if isinstance(model, dict) else None
        self.fields = _fields_of(self.identity, self.url)
        progress = self.meta.get("progress") or {}
        self.step: int | None = progress.get("step")
        self.world_size: int | None = progress.get("world_size")
        self.metadata = dcp_io.read_metadata(self.url)  # allow-list unpickling: no code runs from it
        self.tables = self._find_tables()

    # ---- layout -------------------------------------------------------------------------

    def _find_tables(self) -> dict[tuple[int, str], TableKey]:
        md = self.metadata.state_dict_metadata
        tables = {}
        for m in range(self.num_sets):
            for name, rows in self.fields:
                table = table_name(m, name)
                key = checkpoint_weight_key(m, name)
                if key not in md:  # another wrapper path: any model key ending in the table's weight
                    candidates = [k for k in md if k.startswith(CHECKPOINT_MODEL_PREFIX) and k.endswith("." + table_weight_key(table))]
                    if len(candidates) != 1:
                        raise UserError(
                            f"checkpoint {self.url} has no embedding table {table} (expected the key {key}): "
                            f"it was written by another model than its {META} describes"
                        )
                    key = candidates[0]
                entry = md[key]
                if not isinstance(entry, TensorStorageMetadata) or len(entry.size) != 2:
                    raise UserError(f"checkpoint {self.url}: {key} is not a 2-d tensor")
                n, width = int(entry.size[0]), int(entry.size[1])
                if n != rows or width < self.dim:
                    raise UserError(
                        f"checkpoint {self.url}: table {table} is {n} x {width}, but its {META} describes "
                        f"{rows} rows x {self.dim} columns"
                    )
                tables[(m, name)] = TableKey(m, name, key, rows, width)
        return tables

    def field_row_bands(self, field: str) -> list[tuple[int, int]]:
        """Row bands ``[(start, stop), ...]`` aligned with the stored chunks of the field's sets."""
        rows = self._rows(field)
        cuts = {0, rows}
        for m in range(self.num_sets):
            entry = self.metadata.state_dict_metadata[self.tables[(m, field)].key]
            for chunk in entry.chunks:
                cuts.update((int(chunk.offsets[0]), int(chunk.offsets[0] + chunk.sizes[0])))
        cuts = sorted(c for c in cuts if 0 <= c <= rows)
        bands: list[tuple[int, int]] = []
        for start, stop in zip(cuts, cuts[1:]):
            if bands and stop - bands[-1][0] <= self.band_rows:
                bands[-1] = (bands[-1][0], stop)
            else:
                bands.append((start, stop))
        return bands

    def _rows(self, field: str) -> int:
        for name, rows in self.fields:
            if name == field:
                return rows
        raise UserError(f"checkpoint {self.url} has no field {field!r}; fields: {[n for n, _ in self.fields]}")

    # ---- reading ------------------------------------------------------------------------

    def verify(self) -> None:
        """UserError unless every file has the sha256 recorded when the checkpoint was
        written (``trainer.checkpoint.verify_files``): a flipped byte still loads."""
        verify_files(self.url, self.meta)

    def read_window(self, field: str, start: int, stop: int) -> list[torch.Tensor]:
        """Rows ``[start, stop)`` of each set of ``field``: M float32 tensors (n, K)."""
        self._rows(field)
        windows, state = {}, {}
        for m in range(self.num_sets):
            t = self.tables[(m, field)]
            dtype = self.metadata.state_dict_metadata[t.key].properties.dtype
            state[t.key] = torch.empty(stop - start, self.dim, dtype=dtype)
            windows[t.key] = ((start, 0), (stop - start, self.dim))
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*load in a single process.*")
                dcp.load(state, storage_reader=dcp_io.storage_reader(self.url), planner=_WindowLoadPlanner(windows), no_dist=True)
        except (Exception, CheckpointException) as e:
            raise UserError(f"checkpoint {self.url}: cannot read field {field!r} ({dcp_io.first_error_line(e)[:300]})") from None
        return [state[self.tables[(m, field)].key] for m in range(self.num_sets)]

    def field_bands(self, field: str) -> Iterator[list[torch.Tensor]]:
        """The field's M sets, band by band (``field_row_bands``): M tensors (n, K) per band."""
        for start, stop in self.field_row_bands(field):
            yield self.read_window(field, start, stop)

    def load_field(self, field: str) -> list[torch.Tensor]:
        """The whole field: M tensors (rows, K)."""
        return self.read_window(field, 0, self._rows(field))


class _WindowLoadPlanner(dcp_io.SafeLoadPlanner):
    """Loads a window ``(offsets, sizes)`` of each key into a plain tensor of the window's
    size: DCP's resharding read items for one local chunk at that offset."""

    def __init__(self, windows: dict[str, tuple[tuple[int, int], tuple[int, int]]]):
        super().__init__()
        self.windows = windows

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, sizes) in self.windows.items():
            md = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items += create_read_items_for_chunk_list(key, md, [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


def _embedding_of(identity: dict[str, Any], url: str) -> tuple[int, int, dict[str, Any]]:
    emb = identity.get("embedding")
    if not isinstance(emb, dict) or not {"mode", "scale", "base_dim"} <= set(emb):
        raise UserError(
            f"checkpoint {url}: its {META} identity has no embedding mode/scale/base_dim "
            f"(got {emb!r}): not a multi-embedding CTR checkpoint"
        )
    mode, scale, base_dim = emb["mode"], emb["scale"], emb["base_dim"]
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (scale, base_dim))
    if mode not in EMBEDDING_MODES or not ints_ok:
        raise UserError(f"checkpoint {url}: its {META} identity has an invalid embedding {emb!r}")
    num_sets, dim = embedding_shape(mode, scale, base_dim)
    return num_sets, dim, {"mode": mode, "scale": scale, "base_dim": base_dim}


def _fields_of(identity: dict[str, Any], url: str) -> list[tuple[str, int]]:
    fields = identity.get("fields")
    try:
        parsed = [(str(name), int(rows)) for name, rows in fields]
    except (TypeError, ValueError):
        parsed = []
    if not parsed or any(rows < 1 for _, rows in parsed):
        raise UserError(f"checkpoint {url}: its {META} identity has no usable fields list [[name, cardinality], ...]")
    return parsed


# ---- the whole analysis -----------------------------------------------------------------


def checkpoint_label(ckpt: CheckpointTables) -> str:
    """E.g. ``dcnv2 ME 2x @ step 400``."""
    e = ckpt.embedding
    label = f"{e['mode'].upper()} {e['scale']}x"
    if ckpt.model_name:
        label = f"{ckpt.model_name} {label}"
    if ckpt.step is not None:
        label += f" @ step {ckpt.step}"
    return label


def analyze_checkpoint(
    url: str,
    fields: Sequence[str] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    band_rows: int = DEFAULT_BAND_ROWS,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    progress: bool = True,
) -> CollapseReport:
    """Collapse metrics of every field (or ``fields``) of a checkpoint (a checkpoint dir, a
    run dir meaning its latest checkpoint, or a URL). One streaming Gram per field, one
    field in memory at a time. Single-embedding tables at scale k > 1 are also split into
    k column groups of ``base_dim`` for the diversity the paper compares ME with."""
    t0 = time.perf_counter()
    ckpt = CheckpointTables(url, band_rows=band_rows)
    names = [n for n, _ in ckpt.fields]
    if fields:
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise UserError(f"checkpoint {ckpt.url} has no fields {unknown}; fields: {names}")
        names = [n for n in names if n in set(fields)]
    e = ckpt.embedding
    column_groups = e["scale"] if ckpt.num_sets == 1 and e["scale"] > 1 else None
    results: list[FieldCollapse] = []
    bar = _progress(names, progress, f"collapse {ckpt.url}")
    for i, name in enumerate(bar):
        fg = field_gram_from_chunks(ckpt.field_bands(name), ckpt.num_sets, ckpt.dim, chunk_rows, field=name)
        fc = analyze_field(fg, seed=seed, column_groups=column_groups, rtol=rtol)
        results.append(fc)
        if progress and bar is names:
            log.info(
                "collapse [%d/%d] %s: %d x %d x %d, overall IA %.2f (random %.2f)%s",
                i + 1, len(names), name, ckpt.num_sets, fg.rows, ckpt.dim, fc.overall_ia or float("nan"),
                fc.overall_random_ia, f", diversity {fc.mean_diversity:.3f}" if fc.mean_diversity is not None else "",
            )
    ckpt.verify()
    return CollapseReport(
        source=ckpt.url,
        label=checkpoint_label(ckpt),
        fields=results,
        num_sets=ckpt.num_sets,
        dim=ckpt.dim,
        step=ckpt.step,
        model=ckpt.model_name,
        embedding=e,
        world_size=ckpt.world_size,
        seconds=time.perf_counter() - t0,
    )


def _progress(items: list[str], enabled: bool, desc: str) -> Any:
    """A tqdm bar on an interactive stderr; otherwise the plain list (one log line per field)."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(items, desc=desc, unit="field", file=sys.stderr)
        except ImportError:
            pass
    return items
