"""The serving form of a trained model: plain (B, F) int64 ids in, probabilities out.

The M x F embedding tables are packed into one table (fields stacked by rows at
``offsets``, sets side by side in the columns), so a batch costs one gather, and the
graph has no TorchRec structures: a serving stack feeds it a plain tensor.

    ids (B, F) + offsets (F,) -> packed[...] (B, F, M * K) -> (M, B, F, K)
      -> the trained model's forward_embeddings -> sigmoid -> (B,)

``int8``: every (row, set) embedding of K values is stored as K uint8 codes with an
fp16 scale and bias (row-wise asymmetric quantisation, the layout of FBGEMM's 8-bit
row-wise tables), dequantised after the gather: 4 + 4/K bytes per value fewer than
fp32, in plain torch ops, so the int8 program needs no fbgemm either.
"""

from __future__ import annotations

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
    ):
        super().__init__()
        self.num_sets, self.dim, self.num_fields = num_sets, dim, offsets.numel()
        self.quantized = table.dtype == torch.uint8
        self.register_buffer("table", table)
        self.register_buffer("offsets", offsets)
        if self.quantized:
            self.register_buffer("scale", scale)
            self.register_buffer("bias", bias)
        self.dense: MultiEmbeddingCTR = dense.eval()

    @classmethod
    def from_model(cls, model: MultiEmbeddingCTR) -> "ServingModel":
        """The fp32 serving form of a trained, unsharded ``model``, which it consumes: the
        tables are packed and the sparse arch is released (the program holds the tables
        once); the dense part is shared, in eval mode."""
        arch = model.sparse_arch
        table, offsets = pack_tables(model)
        del model.sparse_arch
        return cls(table, offsets, model, arch.num_sets, arch.dim)

    def int8(self) -> "ServingModel":
        """This model with row-wise int8 tables (the dense part is shared)."""
        if self.quantized:
            return self
        codes, scale, bias = quantize_rowwise(self.table, self.num_sets)
        return ServingModel(codes, self.offsets, self.dense, self.num_sets, self.dim, scale, bias)

    def table_bytes(self) -> int:
        """Bytes of the embedding tables (codes, scales and biases)."""
        tensors = [self.table] + ([self.scale, self.bias] if self.quantized else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids (torch.Tensor): (B, F) int64.

        Returns:
            torch.Tensor: (M, B, F, K) float32.
        """
        rows = ids + self.offsets  # (B, F)
        batch = ids.shape[0]
        values = self.table[rows].view(batch, self.num_fields, self.num_sets, self.dim)
        if self.quantized:
            values = values.float() * self.scale[rows].float() + self.bias[rows].float()
        return values.permute(2, 0, 1, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids (torch.Tensor): (B, F) int64, column f = the id of field f.

        Returns:
            torch.Tensor: (B,) float32 click probabilities.
        """
        return torch.sigmoid(self.dense.forward_embeddings(self.embeddings(ids)))


def export_program(serving: ServingModel, example_batch: int = 8) -> ExportedProgram:
    """``torch.export`` of ``serving`` with a dynamic batch dimension (any B >= 1)."""
    serving.eval()
    example = torch.zeros(example_batch, serving.num_fields, dtype=torch.int64)
    batch = Dim("batch", min=1, max=1 << 30)
    with torch.no_grad():
        return torch.export.export(serving, (example,), dynamic_shapes=({0: batch},), strict=False)
