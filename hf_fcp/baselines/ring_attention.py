"""Classic zigzag ring attention (Megatron/TransformerEngine, ring-flash-attention), the bar FCP must beat.

Every sequence is cut into 2W chunks; rank r holds chunks r and 2W−1−r (``plan_batch(...,
strategy="ring")``). K/V blocks rotate around the ring: in step i = 0..W−1 rank r holds the whole local
K/V of rank (r − i) mod W, computes its queries against the keys of that block that precede them (step 0:
its own block, causal), and meanwhile passes the block on to r + 1 (W − 1 transfers)::

    step 0:  own K/V (causal)          send own block → r+1,  receive block of r−1
    step i:  block of r−i (full pairs)  send it on → r+1,       receive block of r−i−1

Backward re-rotates K/V the same way (nothing but the local block is kept, as ring attention does) and a
dK|dV accumulator travels with each block: rank r adds its contribution to the block it holds and sends
the sum on; after W hops every accumulator is back at its owner. Same kernels and LSE merge as
:func:`hf_fcp.fcp_attention`; exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..engine import comm
from ..engine.attention import (
    acc_dtype,
    add_rows,
    prepare,
    run_tasks,
    run_tasks_backward,
)
from ..engine.kernels import merge_partial
from ..plan.baseline_placements import place_ring
from ..plan.tasks import TaskList, local_tasks
from ..plan.views import RankView


def ring_attention(q: Tensor, k: Tensor, v: Tensor, view: RankView, *, group=None, scale: float | None = None,
                   backend: str | None = None, return_lse: bool = False):
    """Zigzag ring attention; arguments and result exactly as :func:`hf_fcp.fcp_attention`.

    ``view`` must come from ``plan_batch(seq_lens, world_size=W, strategy="ring").for_rank(rank)``.
    q: (n_local, Hq, D); k, v: (n_local, Hkv, D). Returns out like q (and lse (n_local, Hq) fp32).
    """
    layout: list = []
    group, scale, backend, view = prepare(q, k, v, view, group, scale, backend,
                                          check=lambda vw: _zigzag_check(vw, layout))
    steps = _step_tasks(view, layout[0]) if group is not None else [_local_step(view)]
    sizes = [sum(b - a for _, a, b in spans) for spans in layout[0]] if group is not None else [q.shape[0]]
    out, lse = _RingAttention.apply(q, k, v, steps, sizes, group, view.rank, scale, backend)
    return (out, lse) if return_lse else out


def _zigzag_check(view: RankView, layout: list) -> str | None:
    """Recompute every rank's zigzag spans from the view's global batch; they must match the view's."""
    spans = place_ring(tuple(view.seq_lens.tolist()), view.world_size, 1)
    mine = [tuple(s) for s in view.spans.tolist()]
    if mine != [tuple(s) for s in spans[view.rank]]:
        return (f"view: got spans {mine[:4]}..., expected the zigzag spans {spans[view.rank][:4]}... of "
                f"plan_batch(..., strategy='ring') (ring_attention needs the ring placement)")
    layout.append(spans)
    return None


def _local_step(view: RankView) -> TaskList:
    """Step 0: one causal segment per held sequence over its runs joined (the view's own local tasks may
    run some sequences fused; ring attention needs them split)."""
    by_seq: dict[int, list[tuple[int, int, int]]] = {}
    offset = 0
    for s, a, b in view.spans.tolist():
        by_seq.setdefault(s, []).append((a, b, offset))
        offset += b - a
    return local_tasks(by_seq, frozenset(), view.num_local).to(view.token_index.device)


def _step_tasks(view: RankView, layout) -> list[TaskList]:
    """Task lists of steps 0..W−1: step i pairs local queries with the earlier keys of rank (r − i)'s block."""
    w, r = view.world_size, view.rank
    mine = [tuple(s) for s in view.spans.tolist()]
    q_off = np.concatenate([[0], np.cumsum([b - a for _, a, b in mine])])
    steps = [_local_step(view)]
    for i in range(1, w):
        src = layout[(r - i) % w]
        k_off = np.concatenate([[0], np.cumsum([b - a for _, a, b in src])])
        by_seq: dict[int, list[tuple[int, int, int]]] = {}
        for (s, c, d), o in zip(src, k_off.tolist()):
            by_seq.setdefault(s, []).append((c, d, o))
        q_runs, k_runs = [], []
        for (s, a, b), o in zip(mine, q_off.tolist()):
            keys = [np.arange(o2, o2 + d - c) for c, d, o2 in by_seq.get(s, ()) if d <= a]
            if keys:
                q_runs.append(np.arange(o, o + b - a))
                k_runs.append(np.concatenate(keys))
        steps.append(TaskList.build(q_runs, k_runs, False, view.num_local, int(k_off[-1])).to(view.token_index.device))
    return steps


def _rotate(block: Tensor, size: int, ring, tag: str) -> tuple[comm.Pending, Tensor]:
    """Send ``block`` to rank r+1 and receive a (size, ...) block from r−1 (``ring`` = (group, r, W))."""
    group, r, w = ring
    incoming = block.new_empty((size, *block.shape[1:]))
    return comm.post([((r + 1) % w, block)], [((r - 1) % w, incoming)], group, tag=tag,
                     what=f"ring-attention {tag} rotation"), incoming


def _forward(q, k, v, steps, sizes, ring, scale, backend):
    """out (n, Hq, D) in q's dtype and lse (n, Hq) fp32; ring = (group, rank, world)."""
    _, r, w = ring
    hkv = k.shape[1]
    block = torch.cat([k, v], dim=1)
    out, lse = None, None
    for i in range(w):
        pending, block_next = _rotate(block, sizes[(r - i - 1) % w], ring, "kv") if i < w - 1 else (None, None)
        if i == 0:
            out, lse = run_tasks(steps[0], q, k, v, scale, backend)
            out = out.to(acc_dtype(q.dtype)) if w > 1 else out
        elif steps[i].num_segments:
            o, l = run_tasks(steps[i], q, block[:, :hkv], block[:, hkv:], scale, backend)
            merge_partial(out, lse, steps[i].q_rows, o, l)
        if pending is not None:
            pending.wait()
            block = block_next
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, steps, sizes, ring, scale, backend):
    """dq, dk, dv like q, k, v: dK|dV accumulators travel with the re-rotated K/V blocks."""
    _, r, w = ring
    hkv = k.shape[1]
    dq = torch.zeros(q.shape, dtype=acc_dtype(q.dtype), device=q.device)
    block, acc_pending, acc_in = torch.cat([k, v], dim=1), None, None
    for i in range(w):
        kv_pending = _rotate(block, sizes[(r - i - 1) % w], ring, "kv") if i < w - 1 else None
        acc = torch.zeros(block.shape, dtype=dq.dtype, device=q.device)
        if steps[i].num_segments:
            gq, gk, gv = run_tasks_backward(steps[i], dout, q, block[:, :hkv], block[:, hkv:], out, lse, scale,
                                            backend)
            t = steps[i]
            add_rows(dq, t.q_rows, gq, t.q_all)
            add_rows(acc[:, :hkv], t.k_rows, gk, t.k_all)
            add_rows(acc[:, hkv:], t.k_rows, gv, t.k_all)
        if w == 1:
            return dq.to(q.dtype), acc[:, :hkv].to(k.dtype), acc[:, hkv:].to(v.dtype)
        if acc_pending is not None:
            acc_pending.wait()
            acc += acc_in
        acc_pending, acc_in = _rotate(acc.to(k.dtype), sizes[(r - i - 1) % w], ring, "grad")
        if kv_pending is not None:
            kv_pending[0].wait()
            block = kv_pending[1]
    acc_pending.wait()  # after W hops the accumulator of this rank's own block is back
    return dq.to(q.dtype), acc_in[:, :hkv].to(k.dtype), acc_in[:, hkv:].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """(q, k, v) -> (out, lse) of zigzag ring attention; lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, steps, sizes, group, rank, scale, backend):
        q, k, v = q.detach(), k.detach(), v.detach()
        ring = (group, rank, len(steps))
        out, lse = _forward(q, k, v, steps, sizes, ring, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (steps, sizes, ring, scale, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


