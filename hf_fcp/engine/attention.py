"""``fcp_attention``: exact causal attention of a packed batch spread over ranks by an FCP plan.

Every rank holds some token spans of the global batch (``view = plan.for_rank(rank)``) and computes
attention for its own queries. Keys it holds are used at once (``view.local_tasks``); keys it lacks
arrive from their owners in the plan's congestion-free rounds, one communication stage at a
time (``view.stages``), and the partial results are merged by log-sum-exp in fp32::

    forward:  post stages 0..P-1 ─► local tasks ─► wait 0, post P ─► stage 0 tasks ─► wait 1, post P+1 ─► ...
              (P = ``prefetch``, default all stages: the transfers run back to back behind the compute)
    backward: stage 0 tasks, post its dK/dV back ─► stage 1 tasks, post ... ─► local tasks ─► wait all,
              owners add the dK/dV they receive into their local dK/dV

Every rank takes part in every round in both directions, whether or not it has work there (a rank that
skipped its backward exchange would hang its peers). With ``world_size == 1`` and no process group
this is plain exact varlen causal attention, without any torch.distributed call.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor

from ..plan.views import RankView, TaskList
from . import comm, plan_check
from .kernels import merge_partial, select_backend, varlen_backward, varlen_forward


def fcp_attention(q: Tensor, k: Tensor, v: Tensor, view: RankView, *, group=None, scale: float | None = None,
                  backend: str | None = None, prefetch: int | None = None, return_lse: bool = False):
    """Causal attention within each sequence of the global batch, for this rank's tokens.

    Args:
        q: (n_local, Hq, D) queries in the view's local token order (``view.token_index``).
        k, v: (n_local, Hkv, D) keys/values, same dtype and device as q; Hq % Hkv == 0 (GQA/MQA: only
            the Hkv heads are ever communicated).
        view: ``plan.for_rank(rank)`` of the plan every rank of ``group`` uses.
        group: process group of the FCP traffic (default: :func:`hf_fcp.comm.get_default_group`, i.e. the
            group bound at setup, else WORLD). A view with ``world_size == 1`` needs none and ignores the
            default group (plain local attention, no torch.distributed call, also inside a distributed job).
        scale: softmax scale, default ``D ** -0.5``.
        backend: kernel backend (:func:`hf_fcp.engine.kernels.select_backend`); default the view's
            ``kernel`` (the plan's ``PlanSettings.kernel``), else automatic for q's device and dtype.
        prefetch: forward K/V stages in flight ahead of the compute (``None``: all stages are posted at the
            start, so the transfers run back to back while the kernels work; ``1``: the next stage is posted
            when the previous one arrived). More stages ahead hide more latency and keep more send buffers
            alive at once (at most this rank's outgoing K/V).
        return_lse: also return the log-sum-exp (n_local, Hq) float32 (not differentiable).

    Returns:
        out (n_local, Hq, D) like q; or (out, lse) with ``return_lse``.

    Raises:
        ValueError: bad shapes/dtypes/devices/scale or a view that does not fit the inputs or group.
        hf_fcp.comm.PlanMismatchError: on every rank when the ranks' views come from different plans, and
            on the other ranks when one rank raised ValueError. Checked with one tiny all-gather on the
            first use of each view object (every rank builds its own view per batch), before any P2P
            traffic, so a bad rank never leaves its peers waiting.

    Every rank of the group must call this with its own view of the same plan, and must run the backward
    of every call it made (the backward exchanges dK/dV with peers).
    """
    bad = prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1)
    problem = f"prefetch: got {prefetch!r}, expected an integer >= 1 or None (all stages)" if bad else None
    group, scale, backend, view = prepare(q, k, v, view, group, scale, backend, check=lambda _: problem)
    out, lse = _FCPAttention.apply(q, k, v, view, group, scale, backend, prefetch)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- validation
def prepare(q, k, v, view, group, scale, backend, check=None):
    """Shared entry checks of the attention ops; raises before any P2P traffic.

    ``check(view)`` may add an op-specific problem message. On the first use of a view the
    ranks agree on the plan (and on every rank's validation result), so a rank's bad input raises on all
    ranks instead of hanging them. Returns (group or None when world size is 1, scale, backend, view on
    q's device).
    """
    explicit = group is not None
    group = comm.resolve_group(group)
    if isinstance(view, RankView) and view.world_size == 1 and not explicit:
        group = None  # a world-size-1 view never communicates, even inside a distributed job
    world = comm.group_world_rank(group)[0]
    failure, backend = _entry_checks(q, k, v, view, group, scale, backend, check, exchange=world > 1)
    if world > 1 and plan_check.needs_plan_check(view, group, k):
        plan_check.agree_on_plan(view, group, failure, k)  # a failure here raises on every rank
    if failure is not None:
        raise failure
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if view.token_index.device != q.device:
        view = view.to(q.device)
    return (group if world > 1 else None), scale, backend, view


def _entry_checks(q, k, v, view, group, scale, backend, check, exchange: bool):
    """Every check of one call that can fail on one rank alone, run before any traffic so that the plan
    check can route it to every rank: (the failure as an exception or None, the kernel backend)."""
    error = _validate(q, k, v, view, group, scale)
    if error is None and check is not None:
        error = check(view)
    if error is None and exchange:
        error = comm.check_exchange_device(group, q.device)
    if error is not None:
        return ValueError(error), None
    try:
        return None, select_backend(q.device, q.dtype, backend or view.kernel)
    except (ValueError, ImportError) as err:  # e.g. flash-attn asked for but missing on this rank
        return err, None


def _validate(q, k, v, view, group, scale) -> str | None:
    """The first problem with the arguments as a "got X, expected Y" message, or None."""
    if not isinstance(view, RankView):
        return f"view: got {type(view).__name__}, expected a RankView (plan.for_rank(rank))"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            return f"{name}: got {got}, expected a floating (n_local, heads, head_dim) tensor"
    if q.shape[0] != view.num_local:
        return f"q: got {q.shape[0]} rows, expected view.num_local={view.num_local} (rank {view.rank}'s tokens)"
    if k.shape != v.shape:
        return f"v: got shape {tuple(v.shape)}, expected {tuple(k.shape)} (the shape of k)"
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        return f"k: got shape {tuple(k.shape)}, expected ({q.shape[0]}, Hkv, {q.shape[2]}) to match q"
    if q.shape[1] % k.shape[1]:
        return f"k: got {k.shape[1]} heads, expected a divisor of q's {q.shape[1]} heads (Hq % Hkv == 0)"
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            return f"{name}: got {t.dtype} on {t.device}, expected {q.dtype} on {q.device} (as q)"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        return f"scale: got {scale!r}, expected a positive finite number or None"
    return _validate_group(view, group)


def _validate_group(view: RankView, group) -> str | None:
    if group is None and view.world_size != 1:
        return (f"view: got a view for world_size={view.world_size}, expected a process group of that size; "
                f"none is bound: call torch.distributed.init_process_group, hf_fcp.comm.set_default_group "
                f"or pass group=")
    size, rank = comm.group_world_rank(group)
    if view.world_size != size:
        return f"view.world_size: got {view.world_size}, expected {size} (the size of the process group)"
    if view.rank != rank:
        return f"view.rank: got {view.rank}, expected {rank} (this process's rank in the group)"
    return None


# ----------------------------------------------------------------------------- task helpers
def _is_identity(rows: Tensor, n: int) -> bool:
    return rows.numel() == n and bool(torch.equal(rows, torch.arange(n, device=rows.device)))


def _take(x: Tensor, rows: Tensor) -> Tensor:
    """``x[rows]`` (a copy), or ``x`` itself when rows is 0..n-1."""
    return x if _is_identity(rows, x.shape[0]) else x.index_select(0, rows)


def run_tasks(tasks: TaskList, q, k_src, v_src, scale, backend) -> tuple[Tensor, Tensor]:
    """Forward of one task list: out (Nq, Hq, D) in q's dtype, lse (Nq, Hq) fp32 for ``tasks.q_rows``."""
    return varlen_forward(_take(q, tasks.q_rows), _take(k_src, tasks.k_rows), _take(v_src, tasks.k_rows),
                          tasks.cu_q, tasks.cu_k, causal=tasks.causal, scale=scale, backend=backend)


def run_tasks_backward(tasks: TaskList, dout, q, k_src, v_src, out, lse, scale, backend):
    """Backward of one task list with the final (merged) out/lse: dq for q_rows, dk/dv for k_rows."""
    qr = tasks.q_rows
    return varlen_backward(_take(dout, qr), _take(q, qr), _take(k_src, tasks.k_rows),
                           _take(v_src, tasks.k_rows), _take(out, qr), _take(lse, qr), tasks.cu_q,
                           tasks.cu_k, causal=tasks.causal, scale=scale, backend=backend)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for partial results and gradients: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_rows(acc: Tensor, rows: Tensor, val: Tensor) -> None:
    """acc[rows] += val (rows may repeat), in acc's dtype."""
    if _is_identity(rows, acc.shape[0]):
        acc.add_(val)
    else:
        acc.index_add_(0, rows, val.to(acc.dtype))


# ----------------------------------------------------------------------------- forward / backward
def _what(kind: str, i: int, stages) -> str:
    """Names one exchange in error messages: kind, stage (0-based, as in ``view.stages``) and its rounds."""
    return f"{kind} exchange of stage {i} (of {len(stages)}; {len(stages[i].rounds)} round(s))"


def _forward(q, k, v, view: RankView, group, scale, backend, prefetch=None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns out (n, Hq, D) in q's dtype, lse (n, Hq) fp32 and the receive buffer (num_recv, 2*Hkv, D)."""
    hkv = k.shape[1]
    stages = view.stages if group is not None else ()
    recv = k.new_empty((view.num_recv, 2 * hkv, k.shape[2]))
    ahead = len(stages) if prefetch is None else prefetch
    kv = comm.pack_kv(k, v, stages)  # K|V once per call: each message is then one index_select

    def post(i: int):
        return comm.post_kv(stages[i].rounds, kv, recv, group, _what("forward K/V", i, stages))

    in_flight = deque(post(i) for i in range(min(ahead, len(stages))))  # every rank posts in stage order
    o, lse = run_tasks(view.local_tasks, q, k, v, scale, backend)
    remote = [s.tasks for s in stages if s.tasks.num_segments]
    if not remote and _is_identity(view.local_tasks.q_rows, q.shape[0]):
        out = o  # every query's keys are local (always so at world size 1)
    else:
        out = q.new_zeros(q.shape, dtype=acc_dtype(q.dtype))
        lse_acc = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
        merge_partial(out, lse_acc, view.local_tasks.q_rows, o, lse)
        lse = lse_acc
    for i, stage in enumerate(stages):
        in_flight.popleft().wait(consume=bool(stage.tasks.num_segments))  # NCCL: only a stage read waits
        if i + ahead < len(stages):
            in_flight.append(post(i + ahead))
        if stage.tasks.num_segments:
            o_s, l_s = run_tasks(stage.tasks, q, recv[:, :hkv], recv[:, hkv:], scale, backend)
            merge_partial(out, lse, stage.tasks.q_rows, o_s, l_s)
    return out.to(q.dtype), lse, recv


def _backward(dout, q, k, v, recv, out, lse, view: RankView, group, scale, backend):
    """Returns dq, dk, dv like q, k, v. Remote rows' dK/dV travel back to their owners per stage."""
    hkv, local = k.shape[1], view.local_tasks
    stages = view.stages if group is not None else ()
    if not stages and _is_identity(local.q_rows, q.shape[0]) and _is_identity(local.k_rows, k.shape[0]):
        return run_tasks_backward(local, dout, q, k, v, out, lse, scale, backend)  # one call covers all
    dq = torch.zeros(q.shape, dtype=acc_dtype(q.dtype), device=q.device)
    dkv_buf = torch.zeros((recv.shape[0], 2 * hkv, k.shape[2]), dtype=dq.dtype, device=k.device)  # dK|dV
    dk_buf, dv_buf = dkv_buf[:, :hkv], dkv_buf[:, hkv:]  # each stage's message: one cast-copy of its rows
    flights = []
    for i, stage in enumerate(stages):
        t = stage.tasks
        if t.num_segments:
            gq, gk, gv = run_tasks_backward(t, dout, q, recv[:, :hkv], recv[:, hkv:], out, lse, scale, backend)
            add_rows(dq, t.q_rows, gq)
            add_rows(dk_buf, t.k_rows, gk)
            add_rows(dv_buf, t.k_rows, gv)
        flights.append(comm.post_grads(stage.rounds, dkv_buf, group, k.dtype, _what("backward dK/dV", i, stages)))
    gq, gk, gv = run_tasks_backward(local, dout, q, k, v, out, lse, scale, backend)
    add_rows(dq, local.q_rows, gq)
    dk = torch.zeros(k.shape, dtype=dq.dtype, device=k.device)
    dv = torch.zeros_like(dk)
    add_rows(dk, local.k_rows, gk)
    add_rows(dv, local.k_rows, gv)
    for pending, incoming in flights:
        pending.wait()
        for rows, grads in incoming:
            dk.index_add_(0, rows, grads[:, :hkv].to(dk.dtype))
            dv.index_add_(0, rows, grads[:, hkv:].to(dv.dtype))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FCPAttention(torch.autograd.Function):
    """Autograd node of one FCP attention call: (q, k, v) -> (out, lse); lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, view, group, scale, backend, prefetch):
        q, k, v = q.detach(), k.detach(), v.detach()
        out, lse, recv = _forward(q, k, v, view, group, scale, backend, prefetch)
        ctx.save_for_backward(q, k, v, recv, out, lse)
        ctx.view, ctx.group, ctx.scale, ctx.backend = view, group, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, recv, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, recv, out, lse, ctx.view, ctx.group, ctx.scale,
                               ctx.backend)
        return dq, dk, dv, None, None, None, None, None
