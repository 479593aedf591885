"""The multi-embedding sparse arch: M independent embedding sets over the same F fields.

All M*F tables live in one TorchRec ``EmbeddingBagCollection`` (one input dist, one
planner problem). Table ``set{m}__{field}`` holds set ``m`` of ``field`` and is fed by the
batch feature ``field``. When several tables read one feature TorchRec keys their pooled
outputs ``field@table``; with a single set the key is the field name itself. The sharded
collection returns its keys in another order than the unsharded one, so the output is
always assembled by key, never by position.

FBGEMM's kernels need table widths divisible by 4, and the paper's base dim is 10:
tables are stored ``storage_dim(K)`` wide (``trainer.table_layout``, which also owns the
table names and state-dict keys) and only their first K columns are used (the padding
columns start at zero, get no gradient and never reach the model). Readers of the
weights (collapse monitoring, export) take ``[:, :dim]``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from trainer.data.schema import SparseField
from trainer.errors import UserError
from trainer.table_layout import storage_dim, table_name, table_weight_key


@dataclass(frozen=True)
class TableInfo:
    """Where one (set, field) embedding lives: its table and its key in the pooled output."""

    set_index: int
    field: str
    table: str
    key: str
    cardinality: int
    dim: int  # K, the columns the model uses
    storage_dim: int  # the stored width: K rounded up to a multiple of 4 (FBGEMM)
    init_bound: float  # initial values are U(-init_bound, init_bound) (``init_bound``)


INIT_BLOCK_ROWS = 1 << 16

# ``embedding.data_type`` -> the tables' TorchRec data type
TABLE_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}

# ``SparseField.pooling`` -> the tables' TorchRec pooling (a single-id field: sum of one id = the id's row)
POOLING_TYPES = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_seed(seed: int, set_index: int, field: str, block: int = 0) -> int:
    """A stable 63-bit seed for one row block of one table, from (run seed, set, field, block).

    Stable across processes and Python versions (no salted ``hash``), so every rank and
    every rerun draws the same table.
    """
    digest = hashlib.blake2b(f"{seed}/{set_index}/{field}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def init_bound(init: str, cardinality: int, cardinalities: Sequence[int], dim: int) -> float:
    """The half-width of one table's initial uniform values, by ``embedding.init``:

    - ``"uniform"``: ``sqrt(1/cardinality)``, per table (TorchRec's default);
    - ``"xavier_concat"``: the authors' Xavier-uniform over one set's concatenated vocabulary
      (``nn.Embedding(sum(cardinalities), dim)``, ``xavier_uniform_``: fan-in ``dim``, fan-out
      the rows), ``sqrt(6/(sum(cardinalities) + dim))``, the same for every table of every
      set (the authors' ME sets are such tables of the set dim each).
    """
    if init == "uniform":
        return math.sqrt(1.0 / cardinality)
    if init == "xavier_concat":
        return math.sqrt(6.0 / (sum(cardinalities) + dim))
    raise UserError(f"embedding init {init!r}: expected uniform or xavier_concat")


def init_table_(
    weight: torch.Tensor, table: TableInfo, seed: int, row_offset: int = 0, col_offset: int = 0
) -> torch.Tensor:
    """Fill ``weight`` with its window of the seeded initial value of ``table``.

    The full table is ``U(-table.init_bound, table.init_bound)`` (``init_bound``),
    drawn in blocks of ``INIT_BLOCK_ROWS`` rows of ``dim`` columns, block
    ``i`` from a CPU generator seeded with ``table_seed(seed, set, field, i)``; padding
    columns up to ``storage_dim`` are zero. ``weight`` is the
    ``(rows, cols)`` window at ``(row_offset, col_offset)``: the whole table, or one shard
    of it, which is thus initialised without materialising the rest.
    """
    rows, cols = weight.shape
    bound = table.init_bound
    values = torch.empty(rows, cols, dtype=torch.float32)
    first_block, end_block = row_offset // INIT_BLOCK_ROWS, -(-(row_offset + rows) // INIT_BLOCK_ROWS)
    for block in range(first_block, end_block):
        start = block * INIT_BLOCK_ROWS
        generator = torch.Generator().manual_seed(table_seed(seed, table.set_index, table.field, block))
        drawn = torch.zeros(min(INIT_BLOCK_ROWS, table.cardinality - start), table.storage_dim)
        drawn[:, : table.dim].uniform_(-bound, bound, generator=generator)
        lo, hi = max(start, row_offset), min(start + drawn.shape[0], row_offset + rows)
        values[lo - row_offset : hi - row_offset] = drawn[lo - start : hi - start, col_offset : col_offset + cols]
    with torch.no_grad():
        weight.copy_(values.to(device=weight.device, dtype=weight.dtype))
    return weight


@torch.fx.wrap  # a leaf of TrainPipelineSparseDist's trace: it reads the key order of the real output
def _set_major(pooled: KeyedTensor, keys: list[str], num_sets: int, num_fields: int, dim: int) -> torch.Tensor:
    """The first ``dim`` columns of each key's pooled embedding, keys in the order of ``keys``
    (set-major, field-minor), as (B, M, F, K) float32: one gather of the output's columns,
    whatever order the (sharded) collection returned its keys in, padding columns dropped."""
    values = pooled.values()
    offsets = dict(zip(pooled.keys(), pooled.offset_per_key()))
    starts = torch.tensor([offsets[key] for key in keys], device=values.device)
    columns = (starts[:, None] + torch.arange(dim, device=values.device)).flatten()  # (M*F*K,)
    # float32 whatever the tables hold (the sharded kernels already return fp32; unsharded fp16 bags do not)
    return values.index_select(1, columns).float().view(-1, num_sets, num_fields, dim)


class MultiEmbeddingSparseArch(nn.Module):
    """Looks up M independent embedding sets for F fields (one id per row, or a multi-hot
    field's ids pooled by its ``pooling``: sum or mean; no ids pool to zeros).

    Args:
        fields (Sequence[SparseField]): the F categorical fields, ids in ``[0, cardinality)``,
            each with its ``pooling``.
        num_sets (int): M, the number of embedding sets.
        dim (int): K, the embedding dim of every table.
        seed (int): the init seed: every table is drawn from (seed, set, field) by
            ``init_table_``, so reruns and shards see the same values and sets differ.
        device (torch.device | None): where the tables are allocated; ``meta`` defers
            allocation to sharding.
        data_type (str): the tables' storage, ``"fp32"`` or ``"fp16"``
            (``embedding.data_type``); lookups are returned as float32 either way.
        init (str): the initial values' bound, ``"uniform"`` or ``"xavier_concat"``
            (``embedding.init``; see ``init_bound``).

    Example::

        arch = MultiEmbeddingSparseArch([SparseField("a", 5), SparseField("b", 7)], num_sets=2, dim=4, seed=0)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"], values=torch.tensor([0, 4, 6, 1]), lengths=torch.ones(4, dtype=torch.int32)
        )
        arch(features).shape  # (2, 2, 2, 4): (M, B, F, K)
    """

    def __init__(
        self,
        fields: Sequence[SparseField],
        num_sets: int,
        dim: int,
        seed: int,
        device: torch.device | None = None,
        data_type: str = "fp32",
        init: str = "uniform",
    ) -> None:
        super().__init__()
        names = [f.name for f in fields]
        if not names:
            raise UserError("the model needs at least one sparse field")
        if len(set(names)) != len(names):
            raise UserError(f"duplicate sparse field names: {sorted({n for n in names if names.count(n) > 1})}")
        bad = [f.name for f in fields if f.cardinality < 1]
        if bad:
            raise UserError(f"sparse fields with cardinality < 1: {bad}")
        if num_sets < 1 or dim < 1:
            raise UserError(f"embedding sets {num_sets} x dim {dim}: both must be positive")
        if data_type not in TABLE_DATA_TYPES:
            raise UserError(f"embedding data_type {data_type!r}: expected one of {list(TABLE_DATA_TYPES)}")
        self.fields: list[SparseField] = list(fields)
        self.data_type: str = data_type
        self.field_names: list[str] = names
        self.num_sets: int = num_sets
        self.dim: int = dim
        tables = [
            EmbeddingBagConfig(
                name=table_name(m, f.name),
                embedding_dim=storage_dim(dim),
                num_embeddings=f.cardinality,
                feature_names=[f.name],
                pooling=POOLING_TYPES[f.pooling],  # a multi-hot field's ids pool into one vector
                data_type=TABLE_DATA_TYPES[data_type],
            )
            for m in range(num_sets)
            for f in fields
        ]
        keys = [names_of_table[0] for names_of_table in get_embedding_names_by_table(tables)]
        # set-major, field-minor: the order ``forward`` stacks the pooled embeddings in.
        self.tables: list[TableInfo] = [
            TableInfo(
                m, f.name, config.name, key, f.cardinality, dim, storage_dim(dim),
                init_bound(init, f.cardinality, [g.cardinality for g in fields], dim),
            )  # fmt: skip
            for (m, f), config, key in zip(((m, f) for m in range(num_sets) for f in fields), tables, keys)
        ]
        self.seed: int = seed
        self.embedding_bag_collection: EmbeddingBagCollection = EmbeddingBagCollection(tables=tables, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every (unsharded, allocated) table from the seed; sharded tables are drawn
        shard by shard after sharding (``trainer.sharding.shard_model``)."""
        bags = self.embedding_bag_collection.embedding_bags
        for t in self.tables:
            weight = bags[t.table].weight
            if not weight.is_meta:
                init_table_(weight, t, self.seed)

    def table_names(self) -> dict[tuple[int, str], str]:
        """(set, field) -> table name, e.g. for reading per-set weights for collapse monitoring."""
        return {(t.set_index, t.field): t.table for t in self.tables}

    def weight_keys(self, prefix: str = "") -> dict[tuple[int, str], str]:
        """(set, field) -> the state-dict key of that table's weight, under ``prefix`` (this
        module's path in the model, with a trailing dot). The same keys name the tables in
        the unsharded model, the ``DistributedModelParallel`` and DCP checkpoints."""
        return {(t.set_index, t.field): table_weight_key(t.table, prefix) for t in self.tables}

    def stack(self, pooled: KeyedTensor) -> torch.Tensor:
        """Arrange the pooled embeddings by key.

        Args:
            pooled (KeyedTensor): one (B, S) embedding per table, keys in any order.

        Returns:
            torch.Tensor: (M, B, F, K), a view of (B, M, F, K) rows: one set's (B, F * K) is a view too.
        """
        keys = [t.key for t in self.tables]
        return _set_major(pooled, keys, self.num_sets, len(self.field_names), self.dim).transpose(0, 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            features (KeyedJaggedTensor): keys = the field names (any order), a row's ids
                per field (one for a single-valued field, 0..max_length for a multi-hot one).

        Returns:
            torch.Tensor: (M, B, F, K).
        """
        return self.stack(self.embedding_bag_collection(features))


def find_sparse_arch(module: nn.Module) -> tuple[str, "MultiEmbeddingSparseArch"]:
    """The one ``MultiEmbeddingSparseArch`` inside ``module`` (the model, or a training
    wrapper around it) and its path prefix, e.g. ``("model.sparse_arch.", arch)``."""
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, MultiEmbeddingSparseArch)]
    if len(found) != 1:
        raise ValueError(f"expected one MultiEmbeddingSparseArch in {type(module).__name__}, found {len(found)}")
    name, arch = found[0]
    return (f"{name}." if name else ""), arch
