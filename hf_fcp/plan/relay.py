"""Relayed exchange: K/V crosses the network once per node that needs it.

In the plain exchange (:func:`.rounds.coloured`) the owner of an early piece of a long sequence sends it to
every later holder, so a piece that several ranks of another node need crosses the network once per rank.
Relayed, it crosses once: it goes to one of those ranks — the *relay* — in the first phase, and the relay
forwards it over the node's own links to the others in a second phase, whose rounds come after every
first-phase round and start a stage of their own (``FCPPlan.relay_from``), so a relay forwards only what
has arrived. In the backward the order reverses: the ranks return the dK/dV of a forwarded piece to its
relay, which adds them to its own and returns the sum to the owner (:mod:`hf_fcp.engine.attention`).

The relays of a node take turns by piece (the node's relayed pieces in order, the ``i``-th to its
``i mod k``-th receiver), so that the network traffic into a node is spread over its ranks. A pair of
ranks has one message per phase at most: a relay's own pieces for a rank it also forwards to go with the
forwards. Each relayed token thus reaches every rank once, as in the plain exchange.
"""

from __future__ import annotations

import numpy as np

from .rounds import Deferred, colour_columns, needed_columns
from .settings import PlanSettings
from .spans import ranges


def relays(settings: PlanSettings, world: int) -> bool:
    """Whether plans under ``settings`` may relay (``PlanSettings.relay``): across more than one node, and —
    unless ``"always"`` — with messages inside a node priced cheaper than between nodes (``node_link_cost <
    link_cost``) and only full-attention layers (the timeline that keeps a relayed plan only where it is
    faster prices no other)."""
    if settings.relay == "never" or world <= settings.node_size:
        return False
    if settings.relay == "always":
        return True
    inside, full = settings.node_link_cost, all(w is None for w, _ in settings.attention_layers)
    return full and inside is not None and inside < settings.link_cost


def relayed(spans, node_size: int):
    """The exchange of placement ``spans`` with its repeated network traffic relayed (module doc), as
    (messages, rounds, pieces, message array, first relay round) like :func:`.rounds.coloured` — or None
    when no piece goes to two ranks of one other node (then the plain exchange is the same)."""
    columns = needed_columns(spans)
    src, dst, span = columns[0], columns[1], columns[5]
    world, node = len(spans), columns[1] // node_size
    inter = np.flatnonzero(src // node_size != node)
    nodes = -(-world // node_size)
    order = inter[np.lexsort((dst[inter], span[inter] * nodes + node[inter]))]  # by (piece, node), then rank
    key = span[order] * nodes + node[order]
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(order) else np.zeros(0, np.int64)
    size = np.diff(np.r_[start, len(order)])
    start, size = start[size > 1], size[size > 1]  # pieces that two ranks of one other node need
    if not len(start):
        return None
    relay = _turns(order, start, size, node)
    rows = order[ranges(start, size)]
    served = rows != np.repeat(relay, size)
    forwarded, via = rows[served], np.repeat(dst[relay], size)[served]
    second = np.zeros(len(src), bool)
    second[forwarded] = True
    first_src = src.copy()
    first_src[forwarded] = via
    pairs = np.unique(via * world + dst[forwarded])
    second |= np.isin(src * world + dst, pairs)  # the relays' own pieces for ranks they forward to
    a_msgs, a_rounds, a_pieces, a_arr = colour_columns([c[~second] for c in columns], spans)
    b_msgs, b_rounds, b_pieces, b_arr = colour_columns([first_src[second], *(c[second] for c in columns[1:])],
                                                       spans, first_round=a_rounds)
    messages = Deferred(len(a_msgs) + len(b_msgs), lambda: tuple(a_msgs) + tuple(b_msgs))
    return messages, a_rounds + b_rounds, np.vstack([a_pieces, b_pieces]), np.vstack([a_arr, b_arr]), a_rounds


def _turns(order: np.ndarray, start: np.ndarray, size: np.ndarray, node: np.ndarray) -> np.ndarray:
    """Per group of rows ``order[start[g]:start[g] + size[g]]`` (one piece's receivers in one node), the row
    of its relay: of the groups of one node, in order, the ``i``-th takes its ``(i mod size)``-th receiver."""
    g_node = node[order[start]]
    by_node = np.argsort(g_node, kind="stable")
    sorted_node = g_node[by_node]
    turn = np.empty(len(start), np.int64)
    turn[by_node] = np.arange(len(start)) - np.searchsorted(sorted_node, sorted_node)
    return order[start + turn % size]
