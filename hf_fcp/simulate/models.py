"""Attention shapes of common models: what one attention layer computes and what its K/V weigh.

FLOP convention (FlashAttention's): a visible (query, key) pair costs ``4 · head_dim`` FLOPs per query
head in the forward pass (QKᵀ and PV, a multiply-add each) and 2.5× that in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan.cost import BWD_FLOP_RATIO

__all__ = ["BWD_FLOP_RATIO", "AttentionModel", "MODELS", "get_model"]


@dataclass(kw_only=True, frozen=True)
class AttentionModel:
    """One attention layer's shape; communication moves K and V of ``num_kv_heads`` heads only (GQA)."""

    name: str
    """Model name, for reports."""
    num_q_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention)."""
    head_dim: int
    """Head dimension."""
    num_layers: int
    """Transformer layers (informational: the simulator times one attention layer; MFU is per layer)."""
    dtype_bytes: int = 2
    """Bytes per element of K/V and of their gradients on the wire (bf16)."""

    @property
    def fwd_flops_per_pair(self) -> float:
        return 4.0 * self.head_dim * self.num_q_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K plus V of one token (also the bytes of its dK plus dV)."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


# Shapes from the models' published configs (Hugging Face config.json of each).
MODELS: dict[str, AttentionModel] = {
    "llama3-70b": AttentionModel(name="llama3-70b", num_q_heads=64, num_kv_heads=8, head_dim=128, num_layers=80),
    "llama3-8b": AttentionModel(name="llama3-8b", num_q_heads=32, num_kv_heads=8, head_dim=128, num_layers=32),
    "llama3-405b": AttentionModel(name="llama3-405b", num_q_heads=128, num_kv_heads=8, head_dim=128, num_layers=126),
    "qwen2.5-72b": AttentionModel(name="qwen2.5-72b", num_q_heads=64, num_kv_heads=8, head_dim=128, num_layers=80),
    "mistral-7b": AttentionModel(name="mistral-7b", num_q_heads=32, num_kv_heads=8, head_dim=128, num_layers=32),
}


def get_model(name: str | AttentionModel) -> AttentionModel:
    """A model from :data:`MODELS` by name."""
    if isinstance(name, AttentionModel):
        return name
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name]
