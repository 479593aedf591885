"""The serving form of a trained model: plain (B, W) int64 ids in, probabilities out.

The M x F embedding tables are packed into one table (fields stacked by rows at
``offsets``, sets side by side in the columns), so a batch costs one gather, and the
graph has no TorchRec structures: a serving stack feeds it a plain tensor.

    ids (B, W) + offsets -> packed[...] (B, W, M * K) -> pooled (B, F, M * K) -> (M, B, F, K)
      -> the trained model's forward_embeddings -> sigmoid -> (B,)

Column layout: field f takes ``max_length`` consecutive columns (one for a single-valued
field, so ``W = F`` without multi-hot fields); a multi-hot field's row holds its ids in
any of its columns and -1 in the others (no id), and pools them as training did (sum,
or mean over the ids present; no ids -> zeros, as TorchRec's pooled lookup).

``int8``: every (row, set) embedding of K values is stored as K uint8 codes with an
fp16 scale and bias (row-wise asymmetric quantisation, the layout of FBGEMM's 8-bit
row-wise tables), dequantised after the gather: 4 + 4/K bytes per value fewer than
fp32, in plain torch ops, so the int8 program needs no fbgemm either.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from trainer.model import MultiEmbeddingCTR


def pack_tables(model: MultiEmbeddingCTR) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's tables as one ``(sum of cardinalities, M * K)`` float32 table and the
    ``(F,)`` int64 row offset of each field (padding columns dropped)."""
    arch = model.sparse_arch
    bags = arch.embedding_bag_collection.embedding_bags
    by_key = arch.table_names()
    fields = []
    for field in arch.field_names:
        sets = [bags[by_key[(m, field)]].weight.detach()[:, : arch.dim] for m in range(arch.num_sets)]
        fields.append(torch.cat(sets, dim=1))
    rows = torch.tensor([0] + [t.shape[0] for t in fields[:-1]], dtype=torch.int64)
    return torch.cat(fields).float().contiguous(), torch.cumsum(rows, 0)


def quantize_rowwise(table: torch.Tensor, num_sets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise asymmetric 8-bit quantisation of each (row, set) K-vector.

    Args:
        table (torch.Tensor): (N, M * K) float32.
        num_sets (int): M.

    Returns:
        (codes (N, M * K) uint8, scale (N, M, 1) fp16, bias (N, M, 1) fp16) with
        ``table ~= codes * scale + bias``.
    """
    n = table.shape[0]
    grouped = table.view(n, num_sets, -1)
    low = _half_toward(grouped.amin(dim=2, keepdim=True), down=True)  # stored low <= every value
    spread = grouped.amax(dim=2, keepdim=True) - low.float()
    scale = _half_toward((spread / 255.0).clamp_min(torch.finfo(torch.float16).tiny), down=False)  # 255 steps cover it
    codes = torch.round((grouped - low.float()) / scale.float()).clamp(0, 255).to(torch.uint8)
    return codes.view(n, -1).contiguous(), scale, low


def _half_toward(x: torch.Tensor, down: bool) -> torch.Tensor:
    """``x`` in fp16, rounded down (or up) instead of to nearest."""
    h = x.half()
    target = torch.full_like(h, float("-inf") if down else float("inf"))
    off = h.float() > x if down else h.float() < x
    return torch.where(off, torch.nextafter(h, target), h)


class ServingModel(nn.Module):
    """ids -> click probabilities, for ``torch.export``. Build it with ``from_model``.

    Args:
        table (torch.Tensor): (N, M * K) packed tables: float32, or uint8 codes with
            ``scale`` and ``bias``.
        offsets (torch.Tensor): (F,) int64, the first row of each field in ``table``.
        dense (MultiEmbeddingCTR): the model whose ``forward_embeddings`` runs on the lookup.
        num_sets (int): M.
        dim (int): K.
        scale, bias (torch.Tensor | None): (N, M, 1) fp16, for uint8 ``table``.
        max_lengths (Sequence[int] | None): the columns of each field (default: 1 each).
        poolings (Sequence[str] | None): "sum" or "mean" per field (default: sum).
    """

    def __init__(
        self,
        table: torch.Tensor,
        offsets: torch.Tensor,
        dense: MultiEmbeddingCTR,
        num_sets: int,
        dim: int,
        scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        max_lengths: Sequence[int] | None = None,
        poolings: Sequence[str] | None = None,
    ):
        super().__init__()
        self.num_sets, self.dim, self.num_fields = num_sets, dim, offsets.numel()
        self.max_lengths: list[int] = list(max_lengths or [1] * self.num_fields)
        self.poolings: list[str] = list(poolings or ["sum"] * self.num_fields)
        if len(self.max_lengths) != self.num_fields or len(self.poolings) != self.num_fields:
            raise ValueError(f"{self.num_fields} fields, {len(self.max_lengths)} max_lengths, {len(self.poolings)} poolings")
        self.width = sum(self.max_lengths)
        self.quantized = table.dtype == torch.uint8
        self.register_buffer("table", table)
        self.register_buffer("offsets", offsets)
        # (W,) the first table row of each column's field
        self.register_buffer("column_offsets", offsets.repeat_interleave(torch.tensor(self.max_lengths)))
        if self.quantized:
            self.register_buffer("scale", scale)
            self.register_buffer("bias", bias)
        self.dense: MultiEmbeddingCTR = dense.eval()

    @classmethod
    def from_model(cls, model: MultiEmbeddingCTR, max_lengths: Sequence[int] | None = None) -> "ServingModel":
        """The fp32 serving form of a trained, unsharded ``model``, which it consumes: the
        tables are packed and the sparse arch is released (the program holds the tables
        once); the dense part is shared, in eval mode. ``max_lengths``: the columns of each
        field (the dataset's ``max_length``; default 1 each); the pooling is the model's."""
        arch = model.sparse_arch
        table, offsets = pack_tables(model)
        del model.sparse_arch
        return cls(table, offsets, model, arch.num_sets, arch.dim, max_lengths=max_lengths, poolings=[f.pooling for f in arch.fields])

    def int8(self) -> "ServingModel":
        """This model with row-wise int8 tables (the dense part is shared)."""
        if self.quantized:
            return self
        codes, scale, bias = quantize_rowwise(self.table, self.num_sets)
        return ServingModel(
            codes, self.offsets, self.dense, self.num_sets, self.dim, scale, bias, self.max_lengths, self.poolings
        )

    def table_bytes(self) -> int:
        """Bytes of the embedding tables (codes, scales and biases)."""
        tensors = [self.table] + ([self.scale, self.bias] if self.quantized else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids (torch.Tensor): (B, W) int64 (-1: no id, in a multi-hot field's columns).

        Returns:
            torch.Tensor: (M, B, F, K) float32.
        """
        batch = ids.shape[0]
        multi_hot = self.width != self.num_fields
        rows = (ids.clamp_min(0) if multi_hot else ids) + self.column_offsets  # (B, W)
        values = self.table[rows].view(batch, self.width, self.num_sets, self.dim)
        if self.quantized:
            values = values.float() * self.scale[rows].float() + self.bias[rows].float()
        if multi_hot:
            values = self._pool(values, ids >= 0)
        return values.permute(2, 0, 1, 3)

    def _pool(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, W, M, K) column lookups and present (B, W) bool -> (B, F, M, K), field by field."""
        values = values * present[:, :, None, None]
        pooled, start = [], 0
        for length, pooling in zip(self.max_lengths, self.poolings):
            bag = values[:, start : start + length].sum(dim=1, keepdim=True)  # (B, 1, M, K)
            if pooling == "mean" and length > 1:
                count = present[:, start : start + length].sum(dim=1).clamp_min(1)  # (B,)
                bag = bag / count[:, None, None, None]
            pooled.append(bag)
            start += length
        return torch.cat(pooled, dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids (torch.Tensor): (B, W) int64: field f's ids in its ``max_lengths[f]``
                columns (one column per field without multi-hot fields).

        Returns:
            torch.Tensor: (B,) float32 click probabilities.
        """
        return torch.sigmoid(self.dense.forward_embeddings(self.embeddings(ids)))


def export_program(serving: ServingModel, example_batch: int = 8) -> ExportedProgram:
    """``torch.export`` of ``serving`` with a dynamic batch dimension (any B >= 1)."""
    serving.eval()
    example = torch.zeros(example_batch, serving.width, dtype=torch.int64)
    batch = Dim("batch", min=1, max=1 << 30)
    with torch.no_grad():
        return torch.export.export(serving, (example,), dynamic_shapes=({0: batch},), strict=False)
