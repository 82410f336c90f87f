"""Float64 single-process references of packed causal attention, and seeded inputs for them.

Every distributed path of the engine is checked against these: ``q``/``k``/``v`` of a packed global batch
in global token order, causal attention inside each sequence and none across sequences
(:func:`packed_causal_reference`); and the kernels against dense per-segment attention with a
bottom-right causal mask (:func:`segment_reference`).
"""

from __future__ import annotations

import math

import torch


def random_qkv(seq_lens, hq: int, hkv: int, d: int = 16, seed: int = 0):
    """Seeded float64 q (N, Hq, D), k, v (N, Hkv, D) and dout (N, Hq, D) of a packed batch, N = sum(seq_lens)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(seq_lens)
    q, dout = (torch.randn(n, hq, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(n, hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout


def packed_causal_attention(q, k, v, seq_lens, scale=None, window=None, softcap=None, sinks=None):
    """Differentiable dense attention of a packed batch: causal inside each sequence, none across.

    q: (N, Hq, D), k/v: (N, Hkv, D) in global batch order, any float dtype (use float64 for a reference).
    ``window``: each query sees only its last ``window`` keys (itself included); ``softcap``: logits
    ``softcap * tanh(s / softcap)``; ``sinks`` (Hq,): a per-head sink logit that joins every softmax with
    a zero value (gpt-oss). Returns out (N, Hq, D) and lse (N, Hq) (sinks included).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    outs, lses, start = [], [], 0
    for n in seq_lens:
        sl = slice(start, start + n)
        ks, vs = (t[sl].repeat_interleave(group, 1) for t in (k, v))
        s = torch.einsum("qhd,khd->hqk", q[sl], ks) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
        if window is not None:
            hidden |= torch.ones(n, n, dtype=torch.bool).tril(-window)
        s = s.masked_fill(hidden, -math.inf)
        if sinks is not None:
            s = torch.cat([s, sinks.reshape(-1, 1, 1).expand(-1, n, 1).to(s.dtype)], dim=-1)
            vs = torch.cat([vs, vs.new_zeros(1, *vs.shape[1:])])
        lses.append(s.logsumexp(-1).transpose(0, 1))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs))
        start += n
    return torch.cat(outs), torch.cat(lses)


def packed_causal_reference(q, k, v, seq_lens, dout, scale=None, layers=1, **options):
    """Float64 reference: out, lse and dq, dk, dv of ``(out * dout).sum()`` (and d sinks with ``sinks=``).

    ``layers`` > 1 chains the attention (the output is the next call's q, same k and v); lse is the last
    call's. Tensors as in :func:`packed_causal_attention` (``options``: window, softcap, sinks); every
    result is float64.
    """
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    sinks = options.pop("sinks", None)
    inputs = [q, k, v]
    if sinks is not None:
        sinks = sinks.detach().double().requires_grad_()
        inputs.append(sinks)
    out = q
    for _ in range(layers):
        out, lse = packed_causal_attention(out, k, v, seq_lens, scale, sinks=sinks, **options)
    grads = torch.autograd.grad((out * dout.double()).sum(), inputs)
    return (out.detach(), lse.detach(), *grads)


def offsets(lengths, dtype=torch.int64):
    """Cumulative offsets (S+1,) of segment lengths, starting at 0."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def segment_inputs(layout, hq, hkv, d=16, dtype=torch.float32, seed=0, device="cpu"):
    """Seeded q (Nq, Hq, D), k/v (Nk, Hkv, D), dout like q, in ``dtype`` on ``device``, and int64 offsets
    cu_q/cu_k of the segments ``layout`` = [(q_len, k_len), ...]; values drawn in float64."""
    gen = torch.Generator().manual_seed(seed)
    nq, nk = sum(a for a, _ in layout), sum(b for _, b in layout)
    q, dout = (torch.randn(nq, hq, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(nk, hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = offsets([a for a, _ in layout]), offsets([b for _, b in layout])
    cast = [t.to(dtype=dtype, device=device) for t in (q, k, v, dout)]
    return (*cast, cu_q, cu_k)


def segment_reference(q, k, v, dout, cu_q, cu_k, causal, scale, window=None, softcap=None):
    """Dense float64 attention per segment with a bottom-right causal mask (``window``: only the last
    ``window`` keys of each query; ``softcap``: capped logits); grads by autograd."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qs, ks = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]].repeat_interleave(group, 1)
        vs = v[cu_k[i]:cu_k[i + 1]].repeat_interleave(group, 1)
        lq, lk = qs.shape[0], ks.shape[0]
        first = max(0, lq - lk) if causal else (lq if lk == 0 else 0)  # rows before `first` see nothing
        s = torch.einsum("qhd,khd->hqk", qs[first:], ks) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if causal:
            pos = torch.arange(first, lq).unsqueeze(1) + (lk - lq)
            mask = torch.arange(lk) <= pos
            if window is not None:
                mask &= torch.arange(lk) > pos - window
            s = s.masked_fill(~mask, -math.inf)
        lse = s.logsumexp(-1).transpose(0, 1)
        out = torch.einsum("hqk,khd->qhd", s.softmax(-1), vs)
        outs += [q.new_zeros(first, *q.shape[1:]), out]
        lses += [q.new_full((first, q.shape[1]), -math.inf), lse]
    out, lse = torch.cat(outs), torch.cat(lses)
    dq, dk, dv = torch.autograd.grad((out * dout.cpu().double()).sum(), (q, k, v), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip((dq, dk, dv), (q, k, v))]
    return out.detach(), lse.detach(), *grads
