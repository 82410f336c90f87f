"""Which ranks of a placement share a node: rank order chosen so that K/V stays inside nodes.

Every rank of an fcp placement is alike — balance, memory and the K/V each rank needs do not depend on
its number — but a message between two ranks of one node crosses NVLink, one between nodes the slower
network. :func:`by_nodes` relabels the ranks of a placement (rank ``r`` is on node ``r // node``) so that
ranks exchanging much K/V land on one node. Compute and token balance are unchanged by construction (the
same span lists, on other ranks); only which messages cross the network changes.

The relabelling is a greedy graph partition. The weight between two ranks is the K/V tokens one sends
the other (:func:`kv_tokens`; dK/dV go back along the same pairs). Nodes are filled one after another:
a node starts with the unassigned rank that exchanges most with the other unassigned ranks, then takes,
``node − 1`` times, the unassigned rank that exchanges most with the ranks already on it (ties: the
lower rank). The new order is kept only when fewer tokens cross between nodes than in the old one.
``O(world²)`` operations on a dense weight matrix.

Why after the placement, not inside it: a rule in the greedy that sends a piece to a nearly as needy rank
(≥ 0.5-0.95 × the neediest's need) on a node already holding its sequence moved as many tokens between
nodes as before (median 1.00× over W = 64 and 256 ``bimodal`` and ``light`` batches): by the time it could
act, every rank of those nodes holds dense pieces of other long documents and is no longer needy.
"""

from __future__ import annotations

import numpy as np

from .rounds import needed_columns
from .spans import Span


def kv_tokens(spans: list[list[Span]]) -> np.ndarray:
    """float64 (W, W): K/V tokens rank i (row) sends rank j (column) when every rank receives the causal
    prefix of each of its runs that it does not hold (:func:`.rounds.needed_rows`' columns)."""
    world = len(spans)
    src, dst, _, a, b, _ = needed_columns(spans)
    return np.bincount(src * world + dst, (b - a).astype(np.float64), minlength=world * world).reshape(world, world)


def node_order(weights: np.ndarray, node: int) -> list[int]:
    """``order[new] = old``: ranks grouped into nodes of ``node`` consecutive new ranks so that ranks with
    heavy ``weights`` (float (W, W), any direction) between them share a node (module doc)."""
    sym = weights + weights.T
    world = len(sym)
    free = np.ones(world, bool)
    total = sym.sum(axis=1)  # weight to the unassigned ranks
    order: list[int] = []
    while len(order) < world:
        conn = None
        for _ in range(min(node, world - len(order))):
            score = total if conn is None else conn
            u = int(np.argmax(np.where(free, score, -1.0)))
            order.append(u)
            free[u] = False
            total -= sym[u]  # symmetric: the row is the column
            conn = sym[u].copy() if conn is None else conn + sym[u]
    return order


def by_nodes(spans: list[list[Span]], node: int | None) -> list[list[Span]]:
    """``spans`` with its ranks relabelled so that K/V stays inside nodes of ``node`` consecutive ranks
    (module doc); unchanged when ``node`` is None, or at least the world size, or nothing is exchanged."""
    if node is None or node >= len(spans):
        return spans
    weights = kv_tokens(spans)
    if not weights.any():
        return spans
    order = node_order(weights, node)
    before = crossing(weights, list(range(len(spans))), node)
    return [spans[r] for r in order] if crossing(weights, order, node) < before else spans


def crossing(weights: np.ndarray, order: list[int], node: int) -> float:
    """Tokens of ``weights`` (float (W, W)) sent between ranks on different nodes when new rank ``i`` is
    old rank ``order[i]``."""
    where = np.empty(len(order), np.int64)
    where[np.asarray(order)] = np.arange(len(order)) // node
    return float(weights[where[:, None] != where[None, :]].sum())
