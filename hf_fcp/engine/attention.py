"""``fcp_attention``: exact causal attention of a packed batch spread over ranks by an FCP plan.

Every rank holds some token spans of the global batch (``view = plan.for_rank(rank)``) and computes
attention for its own queries. Keys it holds are used at once (``view.local_tasks``); keys it lacks
arrive from their owners in the plan's congestion-free rounds, one communication stage at a
time (``view.stages``), and the partial results are merged by log-sum-exp in fp32. A stage's work is its
split segments (against the receive buffer) and its fused segments (a held run against all its keys, in
the K/V buffer ``[receive buffer | local K/V]``; :mod:`hf_fcp.plan.tasks`)::

    forward:  post stages 0..P-1 ─► local tasks ─► wait 0, post P ─► stage 0 tasks ─► wait 1, post P+1 ─► ...
              (P = ``prefetch``, default all stages: the transfers run back to back behind the compute)
    backward: last stage's tasks, post its dK/dV back ─► the stage before ... ─► local tasks ─► wait all,
              owners add the dK/dV they receive into their local dK/dV (stages in reverse: a fused segment
              of stage k also holds keys of earlier stages, whose dK/dV are complete only after it)

Task lists carry their offsets and row flags on the host, so nothing here reads device memory back.

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
from .kernels import backward_segments, forward_segments, merge_partial, select_backend


def fcp_attention(q: Tensor, k: Tensor, v: Tensor, view: RankView, *, group=None, scale: float | None = None,
                  backend: str | None = None, prefetch: int | None = None, return_lse: bool = False,
                  window: int | None = None, softcap: float | None = None, sinks: Tensor | None = None):
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
        window: sliding window in keys (transformers' ``sliding_window``: query at position p sees keys at
            positions ``(p - window, p]``); the plan must have been made for it
            (``PlanSettings.attention_layers``), and only the window's K/V is exchanged
            (``view.for_window(window)``). None: full causal attention.
        softcap: logit soft-capping ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2); needs a kernel
            that computes it (``naive`` on CPU, ``flash_attn`` on CUDA).
        sinks: (Hq,) attention-sink logits (gpt-oss ``s_aux``): one extra logit per head in every softmax
            denominator, with no value; differentiable.

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
    problem = problem or check_options(q, window, softcap, sinks)
    if problem is None and isinstance(view, RankView):
        try:
            view = view.for_window(window)
        except ValueError as err:
            problem = str(err)
    group, scale, backend, view = prepare(q, k, v, view, group, scale, backend, check=lambda _: problem,
                                          softcap=softcap)
    out, lse = _FCPAttention.apply(q, k, v, sinks, view, group, scale, backend, prefetch, softcap)
    return (out, lse) if return_lse else out


def check_options(q, window, softcap, sinks) -> str | None:
    """The first problem with the attention options ``window``, ``softcap``, ``sinks``, or None."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        return f"window: got {window!r}, expected a positive integer (keys) or None (full causal attention)"
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        return f"softcap: got {softcap!r}, expected a positive finite number or None"
    if sinks is not None:
        heads = q.shape[1] if isinstance(q, Tensor) and q.dim() == 3 else "Hq"
        if (not isinstance(sinks, Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (heads,)
                or (isinstance(q, Tensor) and sinks.device != q.device)):
            got = f"{sinks.dtype} tensor of shape {tuple(sinks.shape)} on {sinks.device}" \
                if isinstance(sinks, Tensor) else type(sinks).__name__
            return f"sinks: got {got}, expected a floating ({heads},) tensor on q's device (one logit per head)"
    return None


# ----------------------------------------------------------------------------- validation
def prepare(q, k, v, view, group, scale, backend, check=None, softcap=None):
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
    failure, backend = _entry_checks(q, k, v, view, group, scale, backend, check, world > 1, softcap)
    if world > 1 and plan_check.needs_plan_check(view, group, k):
        plan_check.agree_on_plan(view, group, failure, k)  # a failure here raises on every rank
    if failure is not None:
        raise failure
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if view.token_index.device != q.device:
        view = view.to(q.device)
    return (group if world > 1 else None), scale, backend, view


def _entry_checks(q, k, v, view, group, scale, backend, check, exchange: bool, softcap=None):
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
        return None, select_backend(q.device, q.dtype, backend or view.kernel, softcap=softcap)
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
def _take(x: Tensor, rows: Tensor, whole: bool) -> Tensor:
    """``x[rows]`` (a copy), or ``x`` itself when ``whole`` (rows is 0..n-1 of x, known from the plan)."""
    return x if whole else x.index_select(0, rows)


def run_tasks(tasks: TaskList, q, k_src, v_src, scale, backend, **options) -> tuple[Tensor, Tensor]:
    """Forward of one task list: out (Nq, Hq, D) in q's dtype, lse (Nq, Hq) fp32 for ``tasks.q_rows``.
    ``options``: ``window``/``softcap`` of the kernels (causal task lists only take a window)."""
    kr = tasks.k_rows
    return forward_segments(_take(q, tasks.q_rows, tasks.q_all), _take(k_src, kr, tasks.k_all),
                            _take(v_src, kr, tasks.k_all), tasks, causal=tasks.causal, scale=scale, backend=backend,
                            **options)


def run_tasks_backward(tasks: TaskList, dout, q, k_src, v_src, out, lse, scale, backend, **options):
    """Backward of one task list with the final (merged) out/lse: dq for q_rows, dk/dv for k_rows."""
    qr, kr, qa, ka = tasks.q_rows, tasks.k_rows, tasks.q_all, tasks.k_all
    return backward_segments(_take(dout, qr, qa), _take(q, qr, qa), _take(k_src, kr, ka), _take(v_src, kr, ka),
                             _take(out, qr, qa), _take(lse, qr, qa), tasks, causal=tasks.causal, scale=scale,
                             backend=backend, **options)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for partial results and gradients: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_rows(acc: Tensor, rows: Tensor, val: Tensor, whole: bool) -> None:
    """acc[rows] += val (rows may repeat), in acc's dtype; ``whole``: rows is 0..n-1 of acc."""
    if whole:
        acc.add_(val)
    else:
        acc.index_add_(0, rows, val.to(acc.dtype))


# ----------------------------------------------------------------------------- forward / backward
def _what(kind: str, i: int, stages) -> str:
    """Names one exchange in error messages: kind, stage (0-based, as in ``view.stages``) and its rounds."""
    return f"{kind} exchange of stage {i} (of {len(stages)}; {len(stages[i].rounds)} round(s))"


def _kv_buffer(k, v, view: RankView, staged: bool) -> Tensor:
    """The K/V buffer (rows, 2*Hkv, D): the receive buffer's ``num_recv`` rows, then — when fused segments
    run, or the exchange is relayed — a copy of the local K|V, so a fused segment's keys (received and
    local), or a message's rows (own and forwarded), are rows of one tensor."""
    hkv, n_recv = k.shape[1], view.num_recv if staged else 0
    fused = staged and (view.has_fused or bool(view.relay_stage))
    buf = k.new_empty((n_recv + (k.shape[0] if fused else 0), 2 * hkv, k.shape[2]))
    if fused:
        buf[n_recv:, :hkv] = k
        buf[n_recv:, hkv:] = v
    return buf


def _stage_work(stage, buf, num_recv: int, hkv: int):
    """(task list, K source, V source) of a stage: split segments on the receive buffer, fused on all."""
    recv = buf[:num_recv]
    return ((stage.tasks, recv[:, :hkv], recv[:, hkv:]), (stage.fused, buf[:, :hkv], buf[:, hkv:]))


def _forward(q, k, v, view: RankView, group, scale, backend, prefetch=None, softcap=None, sinks=None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns out (n, Hq, D) in q's dtype, lse (n, Hq) fp32 and the K/V buffer (rows, 2*Hkv, D); with
    ``sinks`` (Hq,), out and lse include the sink logits."""
    hkv, options = k.shape[1], {"window": view.window, "softcap": softcap}
    stages = view.stages if group is not None else ()
    buf = _kv_buffer(k, v, view, bool(stages))
    recv = buf[:view.num_recv] if stages else buf
    ahead = len(stages) if prefetch is None else prefetch
    # K|V once per call, so that each message is one index_select: the K/V buffer (relayed: its send rows index
    # all of it), or its local copy when it has one
    kv = buf if stages and view.relay_stage else \
        buf[view.num_recv:] if stages and view.has_fused else comm.pack_kv(k, v, stages)
    relay = view.relay_stage or len(stages)  # the relay phase is posted once every stage before it arrived
    in_flight: deque = deque()

    def post_up_to(arrived: int) -> None:  # every rank posts in stage order, ``ahead`` beyond what arrived
        last = min(len(stages), arrived + ahead, relay if arrived < relay else len(stages))
        for i in range(len(in_flight) + arrived, last):
            in_flight.append(comm.post_kv(stages[i].rounds, kv, recv, group, _what("forward K/V", i, stages)))

    post_up_to(0)
    if not view.overlap:  # every K/V first: no communication kernel runs beside the attention kernels
        for i in range(len(stages)):
            in_flight.popleft().wait()
            post_up_to(i + 1)
    local = view.local_tasks
    o, lse = run_tasks(local, q, k, v, scale, backend, **options)
    if not any(t.num_segments for st in stages for t in (st.tasks, st.fused)) and local.q_all:
        out = o  # every query's keys are local (always so at world size 1)
    else:
        out = q.new_zeros(q.shape, dtype=acc_dtype(q.dtype))
        lse_acc = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
        merge_partial(out, lse_acc, local.q_rows, o, lse)
        lse = lse_acc
    for i, stage in enumerate(stages):
        if view.overlap:  # NCCL: only a stage whose rows are read makes the stream wait; stage k's wait covers
            # the earlier stages a fused segment reads too (one communicator runs them in order)
            in_flight.popleft().wait(consume=bool(stage.tasks.num_segments or stage.fused.num_segments
                                                  or view.forwards and i < relay))
            post_up_to(i + 1)
        for tasks, k_src, v_src in _stage_work(stage, buf, view.num_recv, hkv):
            if tasks.num_segments:
                o_s, l_s = run_tasks(tasks, q, k_src, v_src, scale, backend, **options)
                merge_partial(out, lse, tasks.q_rows, o_s, l_s)
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return out.to(q.dtype), lse, buf


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Attention with one extra logit per head (``sinks`` (Hq,)) that has no value: lse' = log(e^lse +
    e^sink), out' = out · e^(lse − lse'). Returns out' (acc dtype) and lse' (fp32)."""
    merged = torch.logaddexp(lse, sinks.detach().float()[None, :])
    return out.to(acc_dtype(out.dtype)) * torch.exp(lse - merged).unsqueeze(-1), merged


def sinks_grad(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """d loss / d sinks (Hq,) for this rank's queries: −Σ_q e^(sink − lse'_q) · (dout_q · out'_q)."""
    p_sink = torch.exp(sinks.detach().float()[None, :] - lse)
    return -(p_sink * (dout.float() * out.float()).sum(-1)).sum(0).to(sinks.dtype)


def _backward(dout, q, k, v, buf, out, lse, view: RankView, group, scale, backend, softcap=None):
    """Returns dq, dk, dv like q, k, v. Remote rows' dK/dV travel back to their owners per stage; in a
    relayed exchange a relay adds the dK/dV of what it forwarded to its own before it returns them."""
    hkv, local, n_recv = k.shape[1], view.local_tasks, view.num_recv
    options = {"window": view.window, "softcap": softcap}
    stages = view.stages if group is not None else ()
    if not stages and local.q_all and local.k_all:
        return run_tasks_backward(local, dout, q, k, v, out, lse, scale, backend, **options)  # one call covers all
    dq = torch.zeros(q.shape, dtype=acc_dtype(q.dtype), device=q.device)
    dkv_buf = torch.zeros((buf.shape[0], 2 * hkv, k.shape[2]), dtype=dq.dtype, device=k.device)  # dK|dV
    dk_buf, dv_buf = dkv_buf[:, :hkv], dkv_buf[:, hkv:]  # each stage's message: one cast-copy of its rows
    flights, relay = [], view.relay_stage

    def settle(acc_k: Tensor, acc_v: Tensor) -> None:  # wait for the returns posted so far, add what came back
        for pending, incoming in flights:
            pending.wait()
            for rows, grads in incoming:
                acc_k.index_add_(0, rows, grads[:, :hkv].to(acc_k.dtype))
                acc_v.index_add_(0, rows, grads[:, hkv:].to(acc_v.dtype))
        flights.clear()

    def post(i: int) -> None:
        if view.forwards and i == relay - 1:  # what it forwarded came back (relay stages go first): add it
            settle(dk_buf, dv_buf)  # to its own received rows before those return to their owners
        flights.append(comm.post_grads(stages[i].rounds, dkv_buf[:n_recv], group, k.dtype,
                                       _what("backward dK/dV", i, stages)))

    for i in reversed(range(len(stages))):
        bufs = (dk_buf[:n_recv], dv_buf[:n_recv]), (dk_buf, dv_buf)
        for (tasks, k_src, v_src), (gk_acc, gv_acc) in zip(_stage_work(stages[i], buf, n_recv, hkv), bufs):
            if tasks.num_segments:
                gq, gk, gv = run_tasks_backward(tasks, dout, q, k_src, v_src, out, lse, scale, backend, **options)
                add_rows(dq, tasks.q_rows, gq, tasks.q_all)
                add_rows(gk_acc, tasks.k_rows, gk, tasks.k_all)
                add_rows(gv_acc, tasks.k_rows, gv, tasks.k_all)
        if view.overlap:
            post(i)
    gq, gk, gv = run_tasks_backward(local, dout, q, k, v, out, lse, scale, backend, **options)
    add_rows(dq, local.q_rows, gq, local.q_all)
    if not view.overlap:  # all compute first, then every dK/dV goes back (no kernels share the GPU)
        for i in reversed(range(len(stages))):
            post(i)
    dk, dv = dk_buf[n_recv:], dv_buf[n_recv:]  # the local K/V's share of fused segments (or empty)
    if dk.shape[0] != k.shape[0]:
        dk = torch.zeros(k.shape, dtype=dq.dtype, device=k.device)
        dv = torch.zeros_like(dk)
    add_rows(dk, local.k_rows, gk, local.k_all)
    add_rows(dv, local.k_rows, gv, local.k_all)
    settle(*((dk_buf, dv_buf) if relay else (dk, dv)))  # relayed: rows of the K/V buffer, whose tail is dk/dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FCPAttention(torch.autograd.Function):
    """Autograd node of one FCP attention call: (q, k, v, sinks or None) -> (out, lse); lse is not
    differentiable. With sinks, out/lse include them and the kernels' backward runs on those (exact)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, view, group, scale, backend, prefetch, softcap):
        q, k, v = q.detach(), k.detach(), v.detach()
        out, lse, buf = _forward(q, k, v, view, group, scale, backend, prefetch, softcap, sinks)
        ctx.save_for_backward(q, k, v, buf, out, lse, *(() if sinks is None else (sinks.detach(),)))
        ctx.view, ctx.group, ctx.scale, ctx.backend, ctx.softcap = view, group, scale, backend, softcap
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, buf, out, lse, *sinks = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _backward(dout, q, k, v, buf, out, lse, ctx.view, ctx.group, ctx.scale, ctx.backend,
                               ctx.softcap)
        dsinks = sinks_grad(dout, out, lse, sinks[0]) if sinks and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None, None, None, None, None, None
