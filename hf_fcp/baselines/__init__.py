"""Baseline attention algorithms that FCP is measured against (same kernels, real communication)."""

from .ring_attention import ring_attention

__all__ = ["ring_attention"]
