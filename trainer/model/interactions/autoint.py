"""AutoInt without the linear term: multi-head self-attention over the fields, beside a DNN.

Per set, as the paper's reference code: the K-dim field embeddings are mapped to
``attention_dim`` by a linear layer, go through ``attention_layers`` layers of
``x <- LayerNorm(x + MultiHeadSelfAttention(x))`` over the F fields, and a ReLU; the
flattened result (F * attention_dim) is the explicit part, read by one shared
``Linear(F * attention_dim -> 1)`` after averaging across sets. The DNN branch and the
logit sum are xDeepFM's (``ExplicitPlusDNN`` head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.job_config import ModelConfig
from trainer.model.heads import ExplicitPlusDNN


class SelfAttentionLayer(nn.Module):
    """``LayerNorm(x + MHSA(x))`` over the field axis (``scaled_dot_product_attention``, so
    that torch.fx and torch.export see plain tensor ops).

    Args:
        width (int): d, the attention width (divisible by ``heads``).
        heads (int): the number of heads.
        dropout (float): dropout on the attention weights.
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads: int = heads
        self.dropout: float = dropout
        self.qkv: nn.Linear = nn.Linear(width, 3 * width)
        self.out: nn.Linear = nn.Linear(width, width)
        self.norm: nn.LayerNorm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, d) -> (B, F, d)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each (B, h, F, d/h)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).transpose(1, 2).flatten(2)  # (B, F, d)
        return self.norm(x + self.out(attended))


class AutoIntInteraction(nn.Module):
    """Self-attention features of one set, followed by its flattened embeddings.

    Args:
        num_fields (int): F.
        dim (int): K.
        attention_dim (int): d.
        heads (int): attention heads (dividing d).
        layers (int): attention layers.
        dropout (float): dropout on the attention weights.

    Example::

        AutoIntInteraction(3, 4, attention_dim=8, heads=2, layers=2, dropout=0.0)(torch.randn(2, 3, 4)).shape  # (2, 24 + 12)
    """

    head = ExplicitPlusDNN

    def __init__(self, num_fields: int, dim: int, attention_dim: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embed: nn.Linear = nn.Linear(dim, attention_dim)
        self.layers: nn.ModuleList = nn.ModuleList(
            SelfAttentionLayer(attention_dim, heads, dropout) for _ in range(layers)
        )
        self.explicit_dim: int = num_fields * attention_dim
        self.output_dim: int = self.explicit_dim + num_fields * dim

    @classmethod
    def from_config(cls, config: "ModelConfig", num_fields: int, dim: int, num_sets: int = 1) -> "AutoIntInteraction":
        return cls(
            num_fields, dim, config.attention_dim, config.attention_heads, config.attention_layers, config.dropout
        )

    def attention(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, F, K) -> the attention features (B, F * d)."""
        x = self.embed(embeddings)
        for layer in self.layers:
            x = layer(x)
        return torch.relu(x).flatten(1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): (B, F, K).

        Returns:
            torch.Tensor: (B, F * d + F * K), ``[attention features, flattened embeddings]``.
        """
        return torch.cat([self.attention(embeddings), embeddings.flatten(1)], dim=1)
