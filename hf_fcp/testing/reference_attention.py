"""``attn_implementation="fcp_reference"``: a slow, obviously exact attention for sharded batches (tests only).

Every rank all-gathers every rank's K/V with the token's document and position (autograd: the gradient
of the gathered K/V is all-reduced and each rank keeps its own rows), then computes dense attention for
its local queries with everything the model asks for: the document + causal mask, a sliding window
(:func:`hf_fcp.integrations.model_support.layer_window`), a chunk (``layer_chunk``), logit soft-capping
and attention sinks. Run instead of ``"fcp"`` it separates the question "is everything OUTSIDE attention
token-local and position-correct?" (what the model matrix verifies per module class) from the FCP
engine's own features. Takes the same ``fcp_plan=`` keyword as ``"fcp"``; q/k/v as transformers passes them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine import comm
from ..integrations.model_support import layer_chunk, layer_window

REFERENCE_IMPLEMENTATION = "fcp_reference"
CALLS = [0]  # calls so far in this process (the matrix tells a model that never calls the interface)


def register_reference() -> None:
    """Register ``"fcp_reference"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(REFERENCE_IMPLEMENTATION, reference_attention_forward)
    AttentionMaskInterface.register(REFERENCE_IMPLEMENTATION, flash_attention_mask)


class _AllGather(torch.autograd.Function):
    """(n_max, ...) per rank → (size * n_max, ...); backward: all-reduce, keep this rank's rows."""

    @staticmethod
    def forward(ctx, x, group, size: int, rank: int):
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None, None


def _gather(x, n_max: int, group, size: int, rank: int, grad: bool):
    pad = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, n_max - x.shape[0]), value=-1 if not grad else 0)
    if grad:
        return _AllGather.apply(pad, group, size, rank)
    parts = [torch.empty_like(pad) for _ in range(size)]
    dist.all_gather(parts, pad.contiguous(), group=group)
    return torch.cat(parts)


def reference_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, sliding_window: int | None = None,
                                softcap: float | None = None, fcp_plan=None, s_aux=None, **kwargs):
    """q (1, Hq, S, D), k (1, Hkv, S, D), v (1, Hkv, S, Dv) in the plan's local order → ((1, S, Hq, Dv), None)."""
    view = fcp_plan
    CALLS[0] += 1
    if view is None:
        raise ValueError("attn_implementation='fcp_reference' needs fcp_plan (an FCPCollator batch)")
    group = comm.get_default_group()
    size, rank = comm.group_world_rank(group)
    n = view.num_local
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([n]), group=group)
    n_max = int(max(c.item() for c in counts))
    q, k, v = (t[0, :, :n].transpose(0, 1) for t in (query, key, value))  # (n, H, D)
    meta = torch.stack([view.seq_index, view.position_ids], 1).to(q.device)  # (n, 2)
    keys, values = (_gather(t, n_max, group, size, rank, grad=True) for t in (k, v))
    kmeta = _gather(meta, n_max, group, size, rank, grad=False)
    mask = _mask(meta, kmeta, layer_window(module, sliding_window), layer_chunk(module))
    out = _attend(q, keys, values, mask, scaling, softcap, s_aux)
    if query.shape[2] > n:  # FCPCollator's placeholder token of a rank without tokens
        out = torch.cat([out, query.new_zeros((query.shape[2] - n,) + out.shape[1:])])
    return out.unsqueeze(0), None


def _mask(meta, kmeta, window: int | None, chunk: int | None):
    qs, qp = meta[:, None, 0], meta[:, None, 1]
    ks, kp = kmeta[None, :, 0], kmeta[None, :, 1]
    mask = (qs == ks) & (kp <= qp) & (ks >= 0)
    if window:
        mask &= kp > qp - window
    if chunk:
        mask &= torch.div(kp, chunk, rounding_mode="floor") == torch.div(qp, chunk, rounding_mode="floor")
    return mask  # (n, N)


def _attend(q, k, v, mask, scaling, softcap, sinks):
    """Dense attention: q (n, Hq, D), k (N, Hkv, D), v (N, Hkv, Dv), mask (n, N) → (n, Hq, Dv)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[None], float("-inf"))
    if sinks is not None:
        sink = sinks.reshape(-1, 1, 1).expand(-1, scores.shape[1], 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return torch.einsum("hqk,khd->qhd", probs.to(v.dtype), v).contiguous()
