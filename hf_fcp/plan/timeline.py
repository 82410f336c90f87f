"""Timeline of one attention layer of a p2p plan, as ``fcp_attention`` runs it — in any unit of time (the
simulator's seconds, the planner's kernel-work units).

Overlapped (:func:`overlapped`, ``plan.overlap``):
Forward: every stage's exchange is posted at once (the engine's default ``prefetch``); a rank's exchanges
run one after another (stream order); the rank runs its local work, then each stage's work once that stage
arrived. Backward: the stages' work last stage first, posting each stage's dK/dV back to the owners after
it, then the local work; an owner is done when every dK/dV it waits for arrived. A message starts once
both ends posted it and ends when its sender has sent, and its receiver received, everything of that
exchange. While a rank's transfers run, the communication kernels hold part of its GPU: its compute runs
at ``share`` of full speed (:class:`Busy`).

Exchange first (:func:`exposed`): every stage arrives, then all the work runs at full speed; the backward
computes everything, then returns every stage's dK/dV.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Exchange = Callable[[np.ndarray, int, bool], tuple[np.ndarray, np.ndarray]]
"""``(avail, stage, backward) -> (end, start)`` per rank of one stage's exchange posted at ``avail``."""


def exchange(avail: np.ndarray, src: np.ndarray, dst: np.ndarray, duration: np.ndarray,
             latency) -> tuple[np.ndarray, np.ndarray]:
    """(end, start) per rank of messages ``src[i] -> dst[i]`` taking ``latency + duration[i]`` alone, posted
    by each rank at ``avail``; ranks without a message: end = avail, start = inf."""
    w = len(avail)
    if len(src) == 0:
        return avail, np.full(w, np.inf)
    send, recv = np.bincount(src, weights=duration, minlength=w), np.bincount(dst, weights=duration, minlength=w)
    start_m = np.maximum(avail[src], avail[dst])
    end_m = start_m + latency + np.maximum(send[src], recv[dst])  # the sender's and receiver's queues
    end, start = avail.copy(), np.full(w, np.inf)
    for ends in (src, dst):
        np.maximum.at(end, ends, end_m)
        np.minimum.at(start, ends, start_m)
    return end, start


class Busy:
    """Per rank, the intervals its transfers run in (stream order: they never overlap on one rank); compute
    that runs inside one gets ``share`` of the GPU (the communication kernels hold the rest)."""

    def __init__(self, world: int, share: float):
        self.share = share
        self.spans: list[tuple[np.ndarray, np.ndarray]] = []
        self.extra = np.zeros(world)  # compute time lost to the communication kernels, per rank

    def add(self, start: np.ndarray, end: np.ndarray) -> None:
        self.spans.append((np.where(np.isfinite(start), start, np.inf), np.where(np.isfinite(start), end, -np.inf)))

    def compute(self, t: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        """End of ``seconds`` of full-speed compute started at ``t`` (per rank), slowed inside busy intervals.
        Calls come in time order per rank (each starts at or after the previous one's end)."""
        left, t0 = seconds.astype(np.float64).copy(), t
        t = t.astype(np.float64).copy()
        while self.spans and (self.spans[0][1] <= t).all():  # over for every rank: no later call meets it
            self.spans.pop(0)
        for s, e in self.spans:
            if not left.any():  # done before the later transfers
                break
            run = np.minimum(np.maximum(s - t, 0.0), left)  # full speed until the transfer starts
            t, left = t + run, left - run
            room = np.maximum(e - np.maximum(t, s), 0.0) * self.share  # full-speed work that fits inside it
            run = np.where(left > 0, np.minimum(left, room), 0.0)
            t = np.where(run > 0, np.maximum(t, s) + run / self.share, t)
            left = left - run
        end = t + left
        self.extra += end - t0 - seconds
        return end


def overlapped(cf: np.ndarray, cb: np.ndarray, exchange: Exchange, share: float, prefetch: int,
               note=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(forward end, backward end, forward busy compute, backward busy compute) per rank (module doc).

    cf, cb: (W, 1 + S) full-speed compute per rank of the local work (column 0) and of each of S stages'
    work, forward / backward. ``note(phase, kind, start, end, label)``: optional trace of every event."""
    note = note or (lambda *_: None)
    w, nstages = cf.shape[0], cf.shape[1] - 1
    busy, ends, link = Busy(w, share), [], np.zeros(w)

    def post(k: int, at: np.ndarray) -> None:
        nonlocal link
        end, start = exchange(np.maximum(at, link), k, False)
        link = np.where(np.isfinite(start), end, link)
        busy.add(start, end)
        ends.append(end)
        note("fwd", "comm", start, end, f"stage {k}")

    for k in range(min(prefetch, nstages)):
        post(k, np.zeros(w))
    t = busy.compute(np.zeros(w), cf[:, 0])
    note("fwd", "compute", np.zeros(w), t, "local")
    for k in range(nstages):
        ready = np.maximum(t, ends[k])  # waited for stage k; stage k + prefetch is posted now
        if k + prefetch < nstages:
            post(k + prefetch, ready)
        t = busy.compute(ready, cf[:, 1 + k])
        note("fwd", "compute", ready, t, f"stage {k}")
    fwd, fwd_busy = t, cf.sum(1) + busy.extra
    busy, t, free = Busy(w, share), np.zeros(w), np.zeros(w)
    for k in reversed(range(nstages)):  # a fused segment of stage k holds earlier stages' keys
        end = busy.compute(t, cb[:, 1 + k])
        note("bwd", "compute", t, end, f"stage {k}")
        t = end
        end, start = exchange(np.maximum(t, free), k, True)
        free = np.where(np.isfinite(start), end, free)
        busy.add(start, end)
        note("bwd", "comm", start, end, f"dKV {k}")
    end = busy.compute(t, cb[:, 0])
    note("bwd", "compute", t, end, "local")
    return fwd, np.maximum(end, free), fwd_busy, cb.sum(1) + busy.extra


def exposed(cf: np.ndarray, cb: np.ndarray, exchange: Exchange,
            note=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`overlapped` for a plan that receives every stage before computing (module doc)."""
    note = note or (lambda *_: None)
    w, nstages = cf.shape[0], cf.shape[1] - 1
    cf, cb, link = cf.sum(1), cb.sum(1), np.zeros(w)
    for k in range(nstages):
        end, start = exchange(link, k, False)
        note("fwd", "comm", start, end, f"stage {k}")
        link = np.where(np.isfinite(start), end, link)
    note("fwd", "compute", link, link + cf, "attention")
    t = cb.copy()
    note("bwd", "compute", np.zeros(w), t, "attention")
    for k in reversed(range(nstages)):
        end, start = exchange(t, k, True)
        note("bwd", "comm", start, end, f"dKV {k}")
        t = np.where(np.isfinite(start), end, t)
    return link + cf, t, cf, cb
