"""Feature interactions, one file each, run once per embedding set.

Every interaction maps one set's embeddings ``(B, F, K)`` to a flat ``(B, output_dim)``,
is built from the model config by ``from_config(config, num_fields, dim, num_sets)`` and
names its ``head`` (``trainer.model.heads``): the per-set projection and the shared tail
that follow it. ``INTERACTIONS`` maps the config's ``model.name`` to its interaction.
"""

from __future__ import annotations

from typing import Protocol

import torch

from trainer.job_config import ModelConfig
from trainer.model.heads import Head
from trainer.model.interactions.autoint import AutoIntInteraction
from trainer.model.interactions.dcnv2 import DCNv2Interaction
from trainer.model.interactions.dnn import DNNInteraction
from trainer.model.interactions.finalmlp import FinalMLPInteraction
from trainer.model.interactions.ipnn import IPNNInteraction
from trainer.model.interactions.nfwfm import NFwFMInteraction
from trainer.model.interactions.xdeepfm import CINInteraction


class Interaction(Protocol):
    output_dim: int
    head: "type[Head]"

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int, num_sets: int = 1) -> "Interaction": ...

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor: ...


INTERACTIONS: dict[str, type[Interaction]] = {
    "dnn": DNNInteraction,
    "dcnv2": DCNv2Interaction,
    "ipnn": IPNNInteraction,
    "nfwfm": NFwFMInteraction,
    "xdeepfm": CINInteraction,
    "finalmlp": FinalMLPInteraction,
    "autoint": AutoIntInteraction,
}

__all__ = [
    "INTERACTIONS",
    "Interaction",
    "AutoIntInteraction",
    "CINInteraction",
    "DCNv2Interaction",
    "DNNInteraction",
    "FinalMLPInteraction",
    "IPNNInteraction",
    "NFwFMInteraction",
]
