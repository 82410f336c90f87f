"""Instrumentation of the FCP exchange (benchmarks and tests only; nothing here changes what is sent).

* :func:`track_comm` counts the bytes and messages of every exchange posted inside it.
* :func:`record_messages` keeps, per message, its direction, peer, stage label, kind and size in posting
  order, so the sequence one rank sends to a peer can be compared with the sequence that peer receives.
* :func:`untagged` posts every message on tag 0, as NCCL matches them: NCCL ignores tags, so messages
  between two ranks pair up by their order alone. Under it a gloo run has NCCL's matching rules, and any
  ordering bug that tags would hide on gloo shows up as wrong numerics or mismatched sequences.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ContextManager, Sequence

from torch import Tensor

TAGS = {"kv": 1, "grad": 2}  # message tags per kind of traffic (gloo matches on them; NCCL ignores them)
_UNTAGGED: list[bool] = []  # non-empty while untagged() is active
_COUNTERS: list["CommCounter"] = []  # active byte counters
_RECORDERS: list["MessageLog"] = []  # active message logs


@dataclass
class CommCounter:
    """Bytes and messages this process sent/received through the exchange while tracking."""

    sent_bytes: int = 0
    recv_bytes: int = 0
    sent_messages: int = 0
    recv_messages: int = 0
    by_tag: dict[str, int] = field(default_factory=dict)
    """Bytes sent per kind of traffic: ``kv`` (K/V) and ``grad`` (dK/dV)."""


@dataclass(frozen=True)
class Message:
    """One posted message, as this rank saw it."""

    direction: str  # "send" or "recv"
    peer: int  # group rank of the other end
    stage: str  # the exchange's label, e.g. "forward K/V exchange of stage 2 (of 5; 1 round(s))"
    kind: str  # "kv" or "grad" (the tag name)
    nbytes: int


@dataclass
class MessageLog:
    """Messages this rank posted while recording, in posting order."""

    messages: list[Message] = field(default_factory=list)

    def sequence(self, direction: str, peer: int) -> list[tuple[str, str, int]]:
        """(stage, kind, bytes) of the messages sent to / received from ``peer``, in order."""
        return [(m.stage, m.kind, m.nbytes) for m in self.messages if m.direction == direction and m.peer == peer]


@contextlib.contextmanager
def _registered(registry: list, item):
    registry.append(item)
    try:
        yield item
    finally:
        registry.remove(item)


def track_comm() -> ContextManager[CommCounter]:
    """Count the bytes of every message posted inside the ``with`` block."""
    return _registered(_COUNTERS, CommCounter())


def record_messages() -> ContextManager[MessageLog]:
    """Record every message posted inside the ``with`` block (see :class:`MessageLog`)."""
    return _registered(_RECORDERS, MessageLog())


def untagged() -> ContextManager[bool]:
    """Post every message on tag 0 inside the ``with`` block (NCCL's matching: order per pair only)."""
    return _registered(_UNTAGGED, True)


def tag_number(kind: str) -> int:
    """The tag messages of ``kind`` are posted with (0 for all while :func:`untagged` is active)."""
    return 0 if _UNTAGGED else TAGS.get(kind, 0)


def note(kind: str, stage: str, sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]]) -> None:
    """Account one posted exchange (called by :func:`hf_fcp.engine.comm.post`)."""
    if not (_COUNTERS or _RECORDERS):
        return
    size = [t.numel() * t.element_size() for _, t in sends]
    rsize = [t.numel() * t.element_size() for _, t in recvs]
    for c in _COUNTERS:
        c.sent_bytes += sum(size)
        c.recv_bytes += sum(rsize)
        c.sent_messages += len(sends)
        c.recv_messages += len(recvs)
        c.by_tag[kind] = c.by_tag.get(kind, 0) + sum(size)
    for log in _RECORDERS:
        log.messages += [Message("send", p, stage, kind, n) for (p, _), n in zip(sends, size)]
        log.messages += [Message("recv", p, stage, kind, n) for (p, _), n in zip(recvs, rsize)]


def pair_mismatches(logs: Sequence[MessageLog]) -> list[str]:
    """Compare, for every ordered pair of ranks (a, b), what a sent to b with what b received from a, in
    order (``logs[r]`` is rank r's log). Empty when every pair agrees; else one line per differing pair."""
    problems = []
    for a, log_a in enumerate(logs):
        for b, log_b in enumerate(logs):
            sent, got = log_a.sequence("send", b), log_b.sequence("recv", a)
            if sent != got:
                first = next((i for i, (x, y) in enumerate(zip(sent, got)) if x != y), min(len(sent), len(got)))
                problems.append(f"rank {a} -> rank {b}: {len(sent)} sent vs {len(got)} received; first "
                                f"difference at message {first}: sent {sent[first:first + 1]}, received "
                                f"{got[first:first + 1]}")
    return problems
