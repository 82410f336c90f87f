"""Support for tests and benchmarks (like ``torch.testing``): float64 attention references
(:mod:`.reference`) and spawned gloo process groups on loopback (:mod:`.spawn`). Not needed to train."""

from .reference import packed_causal_attention, packed_causal_reference, random_qkv
from .spawn import fcp_subgroups, run_workers

__all__ = ["fcp_subgroups", "packed_causal_attention", "packed_causal_reference", "random_qkv", "run_workers"]
