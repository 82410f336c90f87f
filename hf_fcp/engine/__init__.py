"""The distributed attention engine: :func:`fcp_attention` (:mod:`.attention`), the P2P exchange of K/V and dK/dV
(:mod:`.comm`), the plan check every rank passes before its first exchange of a batch (:mod:`.plan_check`), byte
counters and message recorders (:mod:`.comm_trace`), and the varlen attention kernels with their LSE merge
(:mod:`.kernels` on any device, :mod:`.kernels_cuda` for flash-attn and PyTorch's own flash kernel). It runs a
plan's per-rank view (:mod:`hf_fcp.plan.views`) and imports nothing above the planning layer."""

from .attention import fcp_attention

__all__ = ["fcp_attention"]
