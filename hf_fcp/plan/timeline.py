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
    """Per rank, the intervals its transfers run in (stream order: they never overlap on one rank and come
    in time order); compute that runs inside one gets ``share`` of the GPU (the communication kernels hold
    the rest). A rank without a transfer in an exchange has no interval there: its compute is slowed only
    by the intervals it has."""

    def __init__(self, world: int, share: float):
        self.share = share
        # column r: rank r's intervals in time order; the slots after its count are empty (-inf)
        self._start, self._end = np.full((4, world), -np.inf), np.full((4, world), -np.inf)
        self._count, self._next = np.zeros(world, np.int64), np.zeros(world, np.int64)  # next: first not over
        self.extra = np.zeros(world)  # compute time lost to the communication kernels, per rank

    def add(self, start: np.ndarray, end: np.ndarray) -> None:
        """One exchange's transfers: per rank its ``start`` and ``end`` (start = inf: no transfer)."""
        ranks = np.flatnonzero(np.isfinite(start))
        at = self._count[ranks]
        if len(ranks) and at.max() + 1 >= len(self._start):  # keep an empty slot after every rank's last
            more = np.full_like(self._start, -np.inf)
            self._start, self._end = np.vstack([self._start, more]), np.vstack([self._end, more])
        self._start[at, ranks], self._end[at, ranks] = start[ranks], end[ranks]
        self._count[ranks] += 1

    def compute(self, t: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        """End of ``seconds`` of full-speed compute started at ``t`` (per rank), slowed inside busy intervals.
        Calls come in time order per rank (each starts at or after the previous one's end)."""
        t0 = t.astype(np.float64)
        now, left, first, width = t0.copy(), seconds.astype(np.float64), self._next.copy(), 4
        end = now + left
        todo = np.flatnonzero((left > 0) & (first < self._count))
        while len(todo):  # a window of each rank's next intervals at a time, wider each time
            rows = np.minimum(first[todo] + np.arange(width)[:, None], len(self._start) - 1)
            got, rest, after, at = _through(self._start[rows, todo], self._end[rows, todo], now[todo], left[todo],
                                            self.share)
            end[todo] = got
            # the intervals before the one it ended in (or after) are over for every later call
            self._next[todo] = np.minimum(first[todo] + at, self._count[todo])
            first[todo] += width
            more = (rest > 0) & (first[todo] < self._count[todo])  # work left, and intervals
            now[todo[more]], left[todo[more]] = after[more], rest[more]
            todo = todo[more]
            width *= 2
        self.extra += end - t0 - seconds
        return end


def _through(starts: np.ndarray, ends: np.ndarray, t: np.ndarray, work: np.ndarray, share: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per column, ``work`` of full-speed compute started at ``t``, run at ``share`` of the speed inside the
    intervals ``[starts[j], ends[j])`` (rows in time order; an empty one: -inf): (when it ends, the work
    left after the last interval, where that interval ended, the row it ends in or before: ``len(starts)``
    when after the last)."""
    lo = np.maximum(starts, t)  # each interval's part after t
    hi = np.maximum(ends, lo)
    reach = np.maximum.accumulate(hi, axis=0)
    before = np.vstack([t, reach[:-1]])  # where the previous interval ended
    lo = np.maximum(lo, before)
    busy = np.maximum(hi - lo, 0.0)
    done = np.cumsum((lo - before) + share * busy, axis=0)  # work done by each interval's end
    at_start = done - share * busy  # ... and by its start
    reached = done >= work
    inside = reached.any(0)
    j = np.where(inside, reached.argmax(0), len(starts) - 1)
    col = np.arange(len(t))
    s, d0, d1, last = lo[j, col], at_start[j, col], done[j, col], reach[-1]
    end = np.where(work <= d0, s - (d0 - work), np.where(work <= d1, s + (work - d0) / share, last + (work - d1)))
    return end, np.maximum(work - done[-1], 0.0), last, np.where(inside, j, len(starts))


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
