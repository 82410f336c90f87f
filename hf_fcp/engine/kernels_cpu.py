"""CPU and plain-torch attention blocks behind :mod:`hf_fcp.engine.kernels`: ``torch_cpu`` (aten's CPU flash
kernel) and ``naive`` (plain torch, any device and dtype: the reference).

A *block* is a batch of equal segments: q/do/o (B, Hq, Lq, D), l (B, Hq, Lq), k/v (B, Hkv, Lk, D); causal
blocks are BOTTOM-RIGHT aligned (query i sees key j iff j <= i + Lk - Lq) and have Lq <= Lk. Options of
every block function:

* ``window`` (int or None): a sliding window of that many keys — query i sees only keys
  ``i + Lk - Lq - window < j <= i + Lk - Lq`` (transformers' ``sliding_window``); causal only;
* ``softcap`` (float or None): logits ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2); ``naive`` only.

``torch_cpu`` runs a causal block whose keys start before its queries as an unmasked prefix plus a square
diagonal part (the op's own causal flag is top-left aligned), merged by log-sum-exp; a windowed block in
query chunks, each against only the keys its window reaches, with a float mask of at most
``_MASK_ELEMENTS`` elements — memory stays bounded for any segment length.
"""

from __future__ import annotations

import torch

_INF = float("inf")
_NAIVE_MAX_SCORES = 1 << 24  # naive backend: score elements materialised per query chunk
_MASK_ELEMENTS = 1 << 22  # torch_cpu windowed blocks: mask elements per query chunk
_cpu_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lse_merge(o1, l1, o2, l2):
    """Merge two partial results: o (..., D), l (...). −inf on both sides stays −inf with o = 0."""
    m = torch.maximum(l1, l2)
    m = m.masked_fill(m == -_INF, 0.0)
    w1, w2 = (l1 - m).exp(), (l2 - m).exp()
    total = w1 + w2
    inv = torch.where(total > 0, total.reciprocal(), torch.zeros_like(total))
    out = o1 * (w1 * inv).unsqueeze(-1) + o2 * (w2 * inv).unsqueeze(-1)
    return out, m + total.log()


def visible(rows: slice, lq: int, lk: int, causal: bool, window: int | None, device,
            keys: slice | None = None) -> torch.Tensor | None:
    """Bool (rows, keys) visibility of queries ``rows`` against keys ``keys`` (default all); None: all."""
    if not causal:
        return None
    keys = keys or slice(0, lk)
    pos = torch.arange(rows.start, rows.stop, device=device).unsqueeze(1) + (lk - lq)
    j = torch.arange(keys.start, keys.stop, device=device)
    mask = j <= pos
    return mask if window is None else mask & (j > pos - window)


# ----------------------------------------------------------------------------- torch_cpu
def _window_chunks(lq: int, lk: int, window: int):
    """(query rows, key range) per chunk: each query's window lies inside its chunk's key range."""
    step = max(1, min(lq, _MASK_ELEMENTS // max(1, window + lq)))
    step = max(1, min(step, _MASK_ELEMENTS // (step + window)))
    for i in range(0, lq, step):
        rows = slice(i, min(lq, i + step))
        keys = slice(max(0, rows.start + lk - lq - window + 1), rows.stop + lk - lq)
        yield rows, keys


def _float_mask(rows, keys, lq, lk, window, dtype, device):
    mask = visible(rows, lq, lk, True, window, device, keys)
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, -_INF)[None, None]


def cpu_block_fwd(q, k, v, causal, scale, window=None, softcap=None):
    if softcap is not None:
        raise ValueError("softcap: got a logit soft-cap, but kernel 'torch_cpu' does not support it; use kernel "
                         "'naive' on CPU (FCPPlugin(kernel='naive')) or 'flash_attn' on GPU")
    lq, lk = q.shape[2], k.shape[2]
    if causal and window is not None and window < lk:
        outs, lses = [], []
        for rows, keys in _window_chunks(lq, lk, window):
            mask = _float_mask(rows, keys, lq, lk, window, q.dtype, q.device)
            o, lc = _cpu_fwd(q[:, :, rows], k[:, :, keys], v[:, :, keys], 0.0, False, attn_mask=mask, scale=scale)
            outs.append(o)
            lses.append(lc)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    off = lk - lq
    if not causal or off == 0:
        return _cpu_fwd(q, k, v, 0.0, causal, scale=scale)
    o1, l1 = _cpu_fwd(q, k[:, :, :off], v[:, :, :off], 0.0, False, scale=scale)
    o2, l2 = _cpu_fwd(q, k[:, :, off:], v[:, :, off:], 0.0, True, scale=scale)
    ct = compute_dtype(q.dtype)
    o, l = lse_merge(o1.to(ct), l1.to(ct), o2.to(ct), l2.to(ct))
    return o.to(q.dtype), l


def cpu_block_bwd(do, q, o, l, k, v, causal, scale, window=None, softcap=None):
    lq, lk = q.shape[2], k.shape[2]
    l = l.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    if causal and window is not None and window < lk:
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=compute_dtype(k.dtype), device=k.device)
        dv = torch.zeros_like(dk)
        for rows, keys in _window_chunks(lq, lk, window):
            mask = _float_mask(rows, keys, lq, lk, window, q.dtype, q.device)
            g = _cpu_bwd(do[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], o[:, :, rows], l[:, :, rows],
                         0.0, False, attn_mask=mask, scale=scale)
            dq[:, :, rows] = g[0]
            dk[:, :, keys] += g[1]
            dv[:, :, keys] += g[2]
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    off = lk - lq
    if not causal or off == 0:
        return _cpu_bwd(do, q, k, v, o, l, 0.0, causal, scale=scale)
    dq1, dk1, dv1 = _cpu_bwd(do, q, k[:, :, :off], v[:, :, :off], o, l, 0.0, False, scale=scale)
    dq2, dk2, dv2 = _cpu_bwd(do, q, k[:, :, off:], v[:, :, off:], o, l, 0.0, True, scale=scale)
    dq = dq1.to(compute_dtype(q.dtype)).add_(dq2)
    return dq, torch.cat([dk1, dk2], dim=2), torch.cat([dv1, dv2], dim=2)


# ----------------------------------------------------------------------------- naive
def _naive_chunks(q, k, causal, window):
    """Yield (row slice, visibility mask or None) so one chunk's scores stay under _NAIVE_MAX_SCORES."""
    lq, lk = q.shape[2], k.shape[2]
    step = max(1, _NAIVE_MAX_SCORES // max(1, q.shape[0] * q.shape[1] * lk))
    for i in range(0, lq, step):
        rows = slice(i, min(lq, i + step))
        yield rows, visible(rows, lq, lk, causal, window, q.device)


def _naive_scores(qc, k, mask, scale, softcap):
    """qc (B, Hkv, G, r, D), k (B, Hkv, Lk, D) → (scores (B, Hkv, G, r, Lk) masked with −inf, tanh of the
    capped logits or None)."""
    s = torch.matmul(qc, k.unsqueeze(2).transpose(-1, -2)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = softcap * t
    return (s if mask is None else s.masked_fill(~mask, -_INF)), t


def naive_block_fwd(q, k, v, causal, scale, window=None, softcap=None):
    ct, hkv = compute_dtype(q.dtype), k.shape[1]
    qg, k, v = q.to(ct).unflatten(1, (hkv, -1)), k.to(ct), v.to(ct)
    out = torch.empty(qg.shape, dtype=ct, device=q.device)
    lse = torch.empty(qg.shape[:-1], dtype=ct, device=q.device)
    for rows, mask in _naive_chunks(q, k, causal, window):
        s, _ = _naive_scores(qg[..., rows, :], k, mask, scale, softcap)
        lse[..., rows] = s.logsumexp(-1)
        out[..., rows, :] = torch.matmul((s - lse[..., rows, None]).exp(), v.unsqueeze(2))
    return out.flatten(1, 2), lse.flatten(1, 2)


def naive_block_bwd(do, q, o, l, k, v, causal, scale, window=None, softcap=None):
    ct, hkv = compute_dtype(q.dtype), k.shape[1]
    qg, do, o = (t.to(ct).unflatten(1, (hkv, -1)) for t in (q, do, o))
    k, v, l = k.to(ct), v.to(ct), l.to(ct).unflatten(1, (hkv, -1))
    dq, dk, dv = torch.empty_like(qg), torch.zeros_like(k), torch.zeros_like(v)
    for rows, mask in _naive_chunks(q, k, causal, window):
        s, t = _naive_scores(qg[..., rows, :], k, mask, scale, softcap)
        p = (s - l[..., rows, None]).exp()
        dor = do[..., rows, :]
        dv += torch.matmul(p.transpose(-1, -2), dor).sum(2)
        dp = torch.matmul(dor, v.unsqueeze(2).transpose(-1, -2))
        ds = p * (dp - (dor * o[..., rows, :]).sum(-1, keepdim=True))
        if t is not None:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
            ds = ds * (1 - t * t)
        dq[..., rows, :] = torch.matmul(ds, k.unsqueeze(2)) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qg[..., rows, :]).sum(2) * scale
    return dq.flatten(1, 2), dk, dv


BLOCKS = {"torch_cpu": (cpu_block_fwd, cpu_block_bwd), "naive": (naive_block_fwd, naive_block_bwd)}
"""backend -> (forward block, backward block)."""

