"""The simulator: times one attention layer (forward + backward) of a plan on a modelled cluster.

Per rank, compute is the sum of its segments' kernel times (``Cluster.kernel_seconds``: a tile model) plus one
kernel launch per time slot with work (see :mod:`.cluster`). Communication is timed per exchange: a
message of ``bytes`` on a link takes ``latency + bytes / bandwidth`` (NVLink inside a node, InfiniBand
between nodes); a rank sends and receives at once (full duplex); its messages of one exchange share its
link, so a message ends when its sender has sent, and its receiver has received, everything of that
exchange; a message starts once both ends posted it. Communication kernels hold ``comm_sms`` SMs, so
compute beside them runs at ``(num_sms − comm_sms) / num_sms`` speed. One rule for every schedule: a
rank's compute is slowed exactly while that rank's own transfers are in flight (from the first of its
messages of an exchange starting to the last ending, :class:`hf_fcp.plan.timeline.Busy`) — ``p2p``
stages, ``ring`` steps (each step's transfer of the next block beside that step's compute); transfers
that no compute overlaps (``allgather``, a p2p plan without overlap, ring's last dK/dV hop) slow nothing.

Schedules (how far compute and communication overlap — as implemented, not idealised):

* ``p2p`` (fcp, magi; :func:`hf_fcp.fcp_attention`; the overlapped timeline is :mod:`hf_fcp.plan.timeline`,
  which the fcp planner runs too, in kernel-work units): forward posts every stage at once (the engine's
  default ``prefetch``), runs local work, then for each stage k waits for it and runs its work (split and
  fused segments, exactly the rank view's task lists); a rank's exchanges run one after another in stage
  order (stream order); backward runs the stages' work last stage first, posting each stage's dK/dV back
  to the owners after it, and ends with local work; owners wait for every dK/dV. Plans without overlap
  (``plan.overlap`` False) receive every stage first and return every dK/dV last, at full compute speed.
* ``ring`` (TE, ByteScale, WLB-LLM): step i computes against the block held at step i while the next
  block travels (compute slowed while it does); step time = max(compute, transfer); backward moves K/V
  and dK/dV (2×) plus a last hop that returns each dK/dV to its owner.
* ``allgather`` (Llama 3): all-gather K/V (ring algorithm, exposed), compute; backward computes, then
  reduce-scatters dK/dV (exposed).
* ``local`` (packing): compute only.

Layers repeat, and every layer's communication couples the ranks, so a layer's forward ends when the
slowest rank's forward ends, likewise backward: ``step = max_r forward_r + max_r backward_r``.
Attention MFU = useful causal FLOPs (forward + backward) / (ranks × peak × step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..plan import timeline
from ..plan.baseline_placements import assign_to_groups
from ..plan.fcp_plan import imbalance, span_cost
from .cluster import Cluster
from .models import BWD_FLOP_RATIO, AttentionModel
from .segments import (
    Messages,
    Segments,
    Spans,
    local_segments,
    p2p_segments,
    prefix_segments,
    ring_schedule,
)
from .strategies import FIXED_CP, STAGES, Candidate, build, cp_sizes


@dataclass(kw_only=True)
class SimResult:
    """Timing of one strategy on one batch."""

    strategy: str
    world_size: int
    block_size: int
    cp_size: int
    """CP group size of fixed-group strategies (1 otherwise)."""
    step_s: float
    """Forward + backward time of one attention layer, seconds."""
    fwd_s: float
    bwd_s: float
    attention_mfu: float
    """Useful attention FLOPs / (ranks × peak × step)."""
    compute_imbalance: float
    """max / mean − 1 over ranks of busy compute time (forward + backward)."""
    flop_imbalance: float
    """max / mean − 1 over ranks of visible attention pairs (the plan's compute balance)."""
    comm_imbalance: float
    """max / mean − 1 over ranks of bytes sent + received (0 when nothing moves)."""
    memory_imbalance: float
    """max / mean − 1 over ranks of tokens held."""
    peak_tokens: int
    """Tokens held by the busiest rank (its share of the batch's memory)."""
    comm_bytes: float
    """Bytes moved by all ranks in forward and backward."""
    exposed_comm_s: float
    """Time the slowest rank of each pass waited for data (forward + backward), seconds."""
    plan_ms: float
    """Wall time to build the strategy's plan, milliseconds."""
    useful_flops: float
    """Causal attention FLOPs of the batch, forward + backward."""
    rank_compute_s: np.ndarray = field(repr=False)
    rank_finish_s: np.ndarray = field(repr=False)
    """Per rank, forward end + backward end (its own critical path)."""
    rank_comm_bytes: np.ndarray = field(repr=False)
    rank_pairs: np.ndarray = field(repr=False)
    trace: list[tuple[str, str, float, float, str]] = field(default_factory=list, repr=False)
    """Events of the traced rank: (pass, "compute"|"comm", start s, end s, label)."""


class _Run:
    """State of one simulation: model, cluster, world size and the traced rank."""

    def __init__(self, model: AttentionModel, cluster: Cluster, world: int, trace_rank: int | None):
        self.model, self.cluster, self.w, self.trace_rank = model, cluster, world, trace_rank
        self.trace: list = []
        self.rank_bytes = np.zeros(world)
        self.prefetch = PREFETCH

    def slot_times(self, segs: Segments, nslots: int, backward: bool) -> np.ndarray:
        """(W, nslots) compute seconds per rank and slot."""
        fpp = self.model.fwd_flops_per_pair * (BWD_FLOP_RATIO if backward else 1.0)
        causal = segs.pairs < segs.q * segs.k  # causal segments (local tasks, prefixes) see fewer than q·k pairs
        t = self.cluster.kernel_seconds(segs.q, segs.k, causal, fpp, backward)
        idx = segs.rank * nslots + segs.slot
        size = self.w * nslots
        out = np.bincount(idx, weights=t, minlength=size).astype(np.float64)  # int64 when segs is empty
        out += (np.bincount(idx, weights=segs.pairs > 0, minlength=size) > 0) * self.cluster.launch_s
        return out.reshape(self.w, nslots)

    def exchange(self, avail: np.ndarray, msgs: Messages, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(end, start) per rank of one exchange posted at ``avail``; uninvolved ranks: end = avail."""
        w, src, dst = self.w, msgs.src, msgs.dst
        if len(src) == 0:
            return avail, np.full(w, np.inf)
        nbytes = msgs.tokens * self.model.kv_bytes_per_token * scale
        self.rank_bytes += np.bincount(src, weights=nbytes, minlength=w) + np.bincount(dst, weights=nbytes, minlength=w)
        bw, lat = self.cluster.link(src, dst)
        return timeline.exchange(avail, src, dst, nbytes / bw, lat)

    def note(self, phase: str, kind: str, start, end, label: str) -> None:
        r = self.trace_rank
        if r is not None and np.isfinite(start[r]) and end[r] > start[r]:
            self.trace.append((phase, kind, float(start[r]), float(end[r]), label))


PREFETCH = 10**9  # forward stages posted ahead of compute: fcp_attention's default (prefetch=None: all)


def _reverse(m: Messages) -> Messages:
    return Messages(src=m.dst, dst=m.src, tokens=m.tokens)


def _p2p(run: _Run, cand: Candidate, sp: Spans):
    remote, msgs = p2p_segments(cand.plan, sp)
    nslots = 1 + len(msgs)
    segs = Segments.concat([local_segments(sp), remote])
    cf, cb = run.slot_times(segs, nslots, False), run.slot_times(segs, nslots, True)
    exchange = lambda avail, k, back: run.exchange(avail, _reverse(msgs[k]) if back else msgs[k])  # noqa: E731
    if not cand.plan.overlap:
        return (*timeline.exposed(cf, cb, exchange, run.note), segs)
    return (*timeline.overlapped(cf, cb, exchange, run.cluster.compute_share_while_comm, run.prefetch, run.note),
            segs)


def _ring(run: _Run, cand: Candidate, sp: Spans):
    sched = ring_schedule(cand.plan, sp, cand.cp_size)
    nsteps = sched.nsteps
    cf, cb, pairs = np.zeros((run.w, nsteps)), np.zeros((run.w, nsteps)), np.zeros(run.w)
    for i in range(nsteps):  # one step's segments at a time: all of them at once need O(steps × spans) memory
        seg = sched.step_segments(i)
        cf += run.slot_times(seg, nsteps, False)
        cb += run.slot_times(seg, nsteps, True)
        pairs += np.bincount(seg.rank, weights=seg.pairs, minlength=run.w)
    out, busy_compute = [], []
    for phase, c, scale in (("fwd", cf, 1.0), ("bwd", cb, 2.0)):
        busy = timeline.Busy(run.w, run.cluster.compute_share_while_comm)
        start = np.zeros(run.w)
        for i in range(nsteps):
            end = start
            if i < nsteps - 1:  # the next block travels beside this step's compute
                end, s0 = run.exchange(start, sched.steps[i], scale)
                busy.add(s0, end)
                run.note(phase, "comm", s0, end, f"step {i}")
            finish = busy.compute(start, c[:, i])
            run.note(phase, "compute", start, finish, f"step {i}")
            start = np.maximum(finish, end)
        if phase == "bwd":
            end, s0 = run.exchange(start, sched.final)
            run.note(phase, "comm", s0, end, "dKV home")
            start = np.maximum(start, end)
        out.append(start)
        busy_compute.append(c.sum(1) + busy.extra)
    per_rank = Segments(rank=np.arange(run.w), slot=np.zeros(run.w, np.int64), q=np.zeros(run.w), k=np.zeros(run.w),
                        pairs=pairs)  # only the per-rank pair totals are used downstream
    return out[0], out[1], busy_compute[0], busy_compute[1], per_rank


def _allgather(run: _Run, cand: Candidate, sp: Spans):
    segs = prefix_segments(sp)
    cf, cb = run.slot_times(segs, 1, False)[:, 0], run.slot_times(segs, 1, True)[:, 0]
    c, cl = cand.cp_size, run.cluster
    held = np.bincount(sp.rank, weights=sp.b - sp.a, minlength=run.w)
    group_max = held.reshape(-1, c).max(1).repeat(c)
    group_sum = held.reshape(-1, c).sum(1).repeat(c)
    bw, lat = (cl.ib_bw, cl.ib_latency) if c > cl.gpus_per_node else (cl.nvlink_bw, cl.nvlink_latency)
    t_ag = (c - 1) * (lat + group_max * run.model.kv_bytes_per_token / bw) if c > 1 else np.zeros(run.w)
    if c > 1:  # each rank receives the others' K/V, then sends its dK/dV share back: in + out, both passes
        run.rank_bytes += 2 * 2 * (group_sum - held) * run.model.kv_bytes_per_token
    zero = np.zeros(run.w)
    run.note("fwd", "comm", zero, t_ag, "all-gather K/V")
    run.note("fwd", "compute", t_ag, t_ag + cf, "attention")
    run.note("bwd", "compute", zero, cb, "attention")
    run.note("bwd", "comm", cb, cb + t_ag, "reduce-scatter dK/dV")
    return t_ag + cf, cb + t_ag, cf, cb, segs


def _local(run: _Run, cand: Candidate, sp: Spans):
    segs = local_segments(sp)
    cf, cb = run.slot_times(segs, 1, False)[:, 0], run.slot_times(segs, 1, True)[:, 0]
    run.note("fwd", "compute", np.zeros(run.w), cf, "attention")
    run.note("bwd", "compute", np.zeros(run.w), cb, "attention")
    return cf, cb, cf, cb, segs


SCHEDULES = {"p2p": _p2p, "ring": _ring, "allgather": _allgather, "local": _local}


def simulate(cand: Candidate, model: AttentionModel, cluster: Cluster, *, trace_rank: int | None = None,
             plan_ms: float | None = None) -> SimResult:
    """Time one candidate plan (see the module docstring for the model)."""
    plan, w = cand.plan, cand.plan.world_size
    run = _Run(model, cluster, w, trace_rank)
    sp = Spans.of(plan)
    fwd, bwd, cf, cb, segs = SCHEDULES[cand.schedule](run, cand, sp)
    fwd_s, bwd_s = float(fwd.max()), float(bwd.max())
    step = fwd_s + bwd_s
    useful = float(span_cost(0, np.asarray(plan.seq_lens)).sum()) * model.fwd_flops_per_pair * (1 + BWD_FLOP_RATIO)
    rf, rb = int(fwd.argmax()), int(bwd.argmax())
    pairs = np.bincount(segs.rank, weights=segs.pairs, minlength=w)
    tokens = np.bincount(sp.rank, weights=sp.b - sp.a, minlength=w)
    trace = [(p, k, s + (fwd_s if p == "bwd" else 0.0), e + (fwd_s if p == "bwd" else 0.0), lab)
             for p, k, s, e, lab in run.trace]
    return SimResult(
        strategy=plan.strategy, world_size=w, block_size=plan.block_size, cp_size=cand.cp_size, step_s=step,
        fwd_s=fwd_s, bwd_s=bwd_s, attention_mfu=useful / (w * cluster.peak_flops * step),
        compute_imbalance=imbalance(cf + cb), flop_imbalance=imbalance(pairs),
        comm_imbalance=imbalance(run.rank_bytes), memory_imbalance=imbalance(tokens), peak_tokens=int(tokens.max()),
        comm_bytes=float(run.rank_bytes.sum() / 2), exposed_comm_s=max(0.0, float(fwd[rf] - cf[rf] + bwd[rb] - cb[rb])),
        plan_ms=plan.plan_ms if plan_ms is None else plan_ms, useful_flops=useful, rank_compute_s=cf + cb,
        rank_finish_s=fwd + bwd,
        rank_comm_bytes=run.rank_bytes, rank_pairs=pairs, trace=trace)


def at_equal_memory(fcp: list[SimResult], others: list[list[SimResult]], batches, *, tokens_per_rank: int,
                    **kwargs) -> list[SimResult]:
    """fcp raced, batch by batch, at the memory of the batch's fastest other strategy: whole sequences cannot
    fill fixed groups exactly, so a baseline's busiest rank may end over ``tokens_per_rank``; fcp may then
    hold as many tokens per rank as well (planned with that budget; the faster of its two plans). ``fcp``:
    its results under ``tokens_per_rank``, one per batch of ``batches``; ``others``: per other strategy, its
    results on the same batches; ``kwargs``: the rest of :func:`simulate_strategy`'s arguments."""
    out = []
    for i, (mine, lens) in enumerate(zip(fcp, batches)):
        peak = min((results[i] for results in others), key=lambda r: r.step_s).peak_tokens if others else 0
        wider = simulate_strategy("fcp", lens, tokens_per_rank=peak, **kwargs) if peak > tokens_per_rank else mine
        out.append(wider if wider.step_s < mine.step_s else mine)
    return out


def ideal_step_s(lens, model: AttentionModel, cluster: Cluster) -> float:
    """The ceiling no placement can beat: the batch's attention on ONE modelled GPU — whole documents, one
    causal segment each, one kernel launch per pass, no communication. Its MFU (useful FLOPs / (peak ×
    this time)) is what W GPUs reach at perfect balance and zero overhead of splitting."""
    n = np.asarray(lens, np.float64)
    fpp = model.fwd_flops_per_pair
    fwd = cluster.kernel_seconds(n, n, True, fpp).sum() + cluster.launch_s
    bwd = cluster.kernel_seconds(n, n, True, fpp * BWD_FLOP_RATIO, backward=True).sum() + cluster.launch_s
    return float(fwd + bwd)


def planner_model(model: AttentionModel, cluster: Cluster, world: int) -> dict:
    """The fcp planner settings that describe this machine: its kernel (``kernel_cost``, its launch cost
    included), the time to move one token's K and V in units of one causal pair's kernel time
    (``link_cost``; the slowest link the world uses), the kernels' slowdown beside communication
    (``overlap_slowdown``), a message's fixed latency in tokens moved (``link_latency``), the node size and
    the link cost inside a node (``node_size``, ``node_link_cost``)."""
    fpp = model.fwd_flops_per_pair
    peak = cluster.peak_flops
    pair_s = fpp / (cluster.eff_fwd * peak) + fpp * BWD_FLOP_RATIO / (cluster.eff_bwd * peak)
    inside = world <= cluster.gpus_per_node
    bandwidth = cluster.nvlink_bw if inside else min(cluster.nvlink_bw, cluster.ib_bw)
    latency = cluster.nvlink_latency if inside else max(cluster.nvlink_latency, cluster.ib_latency)
    tile_s = cluster.tile ** 2 * fpp / (cluster.eff_fwd * peak)  # a full forward tile
    kernel = replace(cluster.kernel_cost(), launch=cluster.launch_s / tile_s)
    return {"kernel_cost": kernel, "link_cost": model.kv_bytes_per_token / bandwidth / pair_s,
            "overlap_slowdown": 1.0 - cluster.compute_share_while_comm,
            "link_latency": latency * bandwidth / model.kv_bytes_per_token, "node_size": cluster.gpus_per_node,
            "node_link_cost": model.kv_bytes_per_token / cluster.nvlink_bw / pair_s}


def comm_floor_s(name: str, lens, world: int, cap: int, c: int, model: AttentionModel, cluster: Cluster) -> float:
    """A lower bound of the step time of fixed-CP strategy ``name`` at CP size ``c`` from its communication
    alone (0 for p2p strategies): a ring rank receives every other group member's K/V one step after
    another, forward, and K/V with dK/dV backward; an all-gather does the same exposed, forward and
    backward. A rank holds at most its group's even share plus two tokens per sequence (two zigzag chunks
    rounded up); the slowest link a group of more than a node uses is the network's."""
    if c == 1 or name == "magi":
        return 0.0
    inside = c <= cluster.gpus_per_node
    bw, lat = (cluster.nvlink_bw, cluster.nvlink_latency) if inside else (cluster.ib_bw, cluster.ib_latency)
    worst = 0.0
    for seqs in assign_to_groups(lens, world // c, c * cap, by_cost=name == "wlb"):
        group = float(sum(lens[s] for s in seqs))
        if name == "allgather":  # (c - 1) hops of at least the group's mean share, each way
            t = 2 * (c - 1) * (lat + group / c * model.kv_bytes_per_token / bw)
        else:  # others' K/V forward, K/V and dK/dV backward (latency left out: empty blocks are not sent)
            t = 3 * max(0.0, group * (c - 1) / c - 2 * len(seqs)) * model.kv_bytes_per_token / bw
        worst = max(worst, t)
    return worst


def simulate_strategy(name: str, lens, *, world_size: int, block_size: int, tokens_per_rank: int,
                      model: AttentionModel, cluster: Cluster, cp_size: str | int = "best", stages: int = STAGES,
                      fcp_options: dict | None = None, trace_rank: int | None = None) -> SimResult:
    """Build ``name``'s candidate plan(s) for one batch (:func:`.strategies.build`) and time them; the
    fastest wins. ``cp_size="best"`` tries the fixed-CP strategies at every CP size of
    :func:`.strategies.cp_sizes` (powers of two from the smallest that holds the longest sequence up to
    the world) and keeps the fastest. Raises :class:`.strategies.NotApplicable` when the strategy cannot
    run the batch."""
    sizes = cp_sizes(lens, world_size, tokens_per_rank, cp_size) if name in FIXED_CP else [cp_size]
    fcp_options = {**planner_model(model, cluster, world_size), **(fcp_options or {})}  # fcp plans for this machine
    best: SimResult | None = None
    for c in sizes:
        if best is not None and name in FIXED_CP and comm_floor_s(name, lens, world_size, tokens_per_rank, c, model,
                                                                   cluster) >= best.step_s:
            continue  # its communication alone outlasts the best size's step: it cannot be the fastest
        t0 = time.perf_counter()
        cands = build(name, lens, world_size=world_size, block_size=block_size, tokens_per_rank=tokens_per_rank,
                      cp_size=c, stages=stages, fcp_options=fcp_options)
        plan_ms = (time.perf_counter() - t0) * 1e3 / len(cands)
        result = min((simulate(cd, model, cluster, trace_rank=trace_rank, plan_ms=plan_ms) for cd in cands),
                     key=lambda r: r.step_s)
        if best is None or result.step_s < best.step_s:
            best = result
    return best
