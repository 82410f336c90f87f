"""Integrations with the Hugging Face stack: transformers (``attn_implementation="fcp"``) and Accelerate."""

from .transformers import ATTN_IMPLEMENTATION, fcp_attention_forward, register

__all__ = ["ATTN_IMPLEMENTATION", "fcp_attention_forward", "register"]
