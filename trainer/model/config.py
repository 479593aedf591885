"""Typed configs of the CTR model: how big the embeddings are and which interaction runs on them.

Scale semantics follow the paper's reference code (thuml/Multi-Embedding): at scale ``k``,

- single-embedding (``se``) has one embedding set of dim ``k * base_dim``;
- multi-embedding (``me``) has ``k`` independent sets of dim ``base_dim``;

so both hold the same number of embedding parameters. The paper's scales are 1, 2, 3, 4
and 10 with ``base_dim = 10``; any positive scale is accepted. At scale 1 SE and ME are
the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import UserError
from trainer.model.interactions import INTERACTIONS

EMBEDDING_MODES = ("se", "me")
PAPER_SCALES = (1, 2, 3, 4, 10)


def _require_positive_ints(config: object, section: str, names: tuple[str, ...], hint: str = "") -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{section} {name} {value!r}: expected a positive integer{hint}")


@dataclass(frozen=True)
class EmbeddingConfig:
    """``mode``: ``"se"`` or ``"me"``; ``scale``: the paper's k (1, 2, 3, 4, 10);
    ``base_dim``: the 1x embedding dim (10 in the paper, 50 for NFwFM)."""

    mode: str = "me"
    scale: int = 1
    base_dim: int = 10

    def __post_init__(self) -> None:
        if self.mode not in EMBEDDING_MODES:
            raise UserError(f"embedding mode {self.mode!r}: expected one of {list(EMBEDDING_MODES)}")
        _require_positive_ints(self, "embedding", ("scale", "base_dim"), f" (paper scales: {list(PAPER_SCALES)})")

    @property
    def num_sets(self) -> int:
        """M: the number of independent embedding sets."""
        return self.scale if self.mode == "me" else 1

    @property
    def dim(self) -> int:
        """K: the embedding dim of every table."""
        return self.base_dim if self.mode == "me" else self.scale * self.base_dim


@dataclass(frozen=True)
class ModelConfig:
    """``name``: the model, i.e. its interaction (run once per embedding set) and the head
    that follows it: ``"dnn"``, ``"dcnv2"``, ``"ipnn"``, ``"nfwfm"``, ``"xdeepfm"``,
    ``"finalmlp"`` or ``"autoint"`` (see ``trainer.model.interactions``).

    ``hidden`` and ``dropout`` size every MLP: the per-set projection, the shared tail and
    FinalMLP's towers (400 and 0.2 in the paper). The other keys are read by one model
    each (and validated always):

    - ``cross_layers``: depth of the DCNv2 cross net (4).
    - ``cin_layers``: xDeepFM's CIN layer sizes ((16, 16)).
    - ``tower_layers``: the depth of each FinalMLP tower, of width ``hidden`` (2).
    - ``attention_dim``, ``attention_heads``, ``attention_layers``: AutoInt's
      self-attention width (divisible by the heads), heads and layers (64, 2, 3).
    """

    name: str = "dcnv2"
    hidden: int = 400
    dropout: float = 0.2
    cross_layers: int = 4
    cin_layers: tuple[int, ...] = (16, 16)
    tower_layers: int = 2
    attention_dim: int = 64
    attention_heads: int = 2
    attention_layers: int = 3

    def __post_init__(self) -> None:
        if self.name not in INTERACTIONS:
            raise UserError(f"model {self.name!r}: expected one of {sorted(INTERACTIONS)}")
        _require_positive_ints(
            self, "model", ("hidden", "cross_layers", "tower_layers", "attention_dim", "attention_heads", "attention_layers")
        )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model dropout {self.dropout!r}: expected a probability in [0, 1)")
        layers = self.cin_layers
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in layers)
        ):
            raise UserError(f"model cin_layers {layers!r}: expected a non-empty list of positive integers, e.g. [16, 16]")
        object.__setattr__(self, "cin_layers", tuple(layers))
        if self.attention_dim % self.attention_heads:
            raise UserError(
                f"model attention_dim {self.attention_dim} is not divisible by attention_heads {self.attention_heads}"
            )
