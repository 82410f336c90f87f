"""A lower bound of a placement's modelled layer time, known before its messages are coloured and priced.

The planner skips an alternative whose bound is above the fastest plan so far (it could not win), so the
bound must never exceed :func:`.schedule.layer_time` of the placement in any execution, stage count or
colouring. It is the timeline's own structure (:mod:`.timeline`) with the slack removed:

* **Compute.** Whatever the execution, a rank computes every visible (query, key) pair of its runs (a
  touched tile costs at least the pairs it holds), every segment pays the set-up of each of its query
  tiles — at least ``ceil(held / t)`` for the tokens a rank holds of a sequence, however they are cut
  into segments — and each sequence at least one key-tile set-up (:class:`.cost.KernelCost`, tile ``t``).
* **Communication.** A rank's exchanges run one after another on its link, so its forward ends no earlier
  than the larger of what it sends and what it receives (tokens × the link cost of each message, inside or
  across nodes), and its backward no earlier than the same dK/dV returned. Where the exchange may be
  relayed (:mod:`.relay`: a piece may reach a rank from a rank of its own node instead of its owner), only
  what a rank receives counts, each token at the cheaper link cost.

The layer time is the slowest forward plus the slowest backward, each no earlier than its compute or its
communication.
"""

from __future__ import annotations

import numpy as np

from .cost import OVERHEADS, KernelCost
from .relay import relays
from .settings import PlanSettings
from .spans import Span, span_cost
from .topology import kv_tokens


def work_bound(spans: list[list[Span]], kernel: KernelCost, settings: PlanSettings) -> float | None:
    """Lower bound of :func:`.schedule.layer_time` (kernel-work units) of any plan of ``spans``
    (``spans[r]``: rank r's ``(seq, start, end)`` runs) under ``settings``' link model (module doc); None
    when the kernel has a negative overhead (then no bound is claimed)."""
    if min(kernel.bwd_weight, *(getattr(kernel, k) for k in OVERHEADS)) < 0:
        return None
    world = len(spans)
    rows = [(r, s, a, b) for r, x in enumerate(spans) for s, a, b in x]
    if not rows:
        return 0.0
    fwd, bwd = _compute(np.asarray(rows, np.int64).T, world, kernel)
    comm = _comm(kv_tokens(spans), settings, relays(settings, world))
    return float(np.maximum(fwd, comm).max() + np.maximum(bwd, comm).max())


def _compute(rows: np.ndarray, world: int, kernel: KernelCost) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) per rank: the least kernel work of its runs in any execution (module doc)."""
    rank, seq, a, b = rows
    t = kernel.tile
    nseq = int(seq.max()) + 1
    held_key, at = np.unique(rank * nseq + seq, return_inverse=True)
    q_tiles = np.ceil(np.bincount(at, weights=(b - a).astype(np.float64)) / t)  # per (rank, sequence)
    owner = held_key // nseq
    tiles = np.bincount(owner, weights=q_tiles, minlength=world)
    seqs = np.bincount(owner, minlength=world).astype(np.float64)
    pairs = np.bincount(rank, weights=span_cost(a, b), minlength=world) / t ** 2  # in tiles
    area = kernel.tile_work  # as segments.priced: a tile's pairs, forward + backward
    fwd = (pairs + kernel.fwd_q_tile * tiles + kernel.fwd_k_tile * seqs) * area
    bwd = kernel.bwd_weight * (pairs + kernel.bwd_q_tile * tiles + kernel.bwd_k_tile * seqs) * area
    return fwd, bwd


def _comm(tokens: np.ndarray, settings: PlanSettings, relay: bool = False) -> np.ndarray:
    """Per rank, the larger of its send and receive time (``tokens``: (W, W) K/V tokens i sends j); ``relay``:
    its receive time at the cheaper link cost."""
    world = len(tokens)
    if relay:
        inside = settings.link_cost if settings.node_link_cost is None else settings.node_link_cost
        return tokens.sum(0) * min(settings.link_cost, inside)
    cost = np.full((world, world), float(settings.link_cost))
    if settings.node_link_cost is not None:
        node = np.arange(world) // settings.node_size
        cost[node[:, None] == node[None, :]] = settings.node_link_cost
    time = tokens * cost
    return np.maximum(time.sum(1), time.sum(0))
