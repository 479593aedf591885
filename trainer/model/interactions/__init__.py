"""Feature interactions, one file each, run once per embedding set.

Every interaction maps one set's embeddings ``(B, F, K)`` to a flat ``(B, output_dim)``
and is built from the model config by ``from_config(config, num_fields, dim)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from trainer.model.interactions.dcnv2 import DCNv2Interaction
from trainer.model.interactions.dnn import DNNInteraction

if TYPE_CHECKING:
    from trainer.model.config import ModelConfig


class Interaction(Protocol):
    output_dim: int

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int) -> "Interaction": ...

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor: ...


INTERACTIONS: dict[str, type[Interaction]] = {
    "dnn": DNNInteraction,
    "dcnv2": DCNv2Interaction,
}

__all__ = ["INTERACTIONS", "Interaction", "DCNv2Interaction", "DNNInteraction"]
