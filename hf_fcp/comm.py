"""Point-to-point exchange of K/V rows (forward) and their gradients (backward) for the FCP engine.

Fixed state only: the default FCP process group (bound once at setup with :func:`set_default_group`).
Per-batch data (the rank view) always travels as an argument.

Wire format: one message per round and direction, a contiguous ``(rows, 2 * Hkv, D)`` tensor holding
K in heads ``[0, Hkv)`` and V in heads ``[Hkv, 2 * Hkv)`` (gradients: dK and dV the same way), in the
dtype of K. Messages of one stage go out together with ``dist.batch_isend_irecv``; the returned
:class:`Pending` is waited on later so that attention compute overlaps the transfer.

Peers in a view are ranks of the FCP group (``group_peer``), never global ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

_DEFAULT_GROUP: dist.ProcessGroup | None = None
_COUNTERS: list["CommCounter"] = []  # active byte counters (instrumentation only, see track_comm)
_TAGS = {"kv": 1, "grad": 2}  # message tags per kind of traffic (gloo matches on them; NCCL ignores them)
_CHECKED: dict[tuple[int, int], weakref.ref] = {}  # (id(view), id(group)) -> view whose plan was checked


class PlanMismatchError(RuntimeError):
    """Raised on every rank when the ranks of a group hold views of different plans (or when one rank
    rejected its inputs), instead of letting mismatched P2P traffic hang."""


# ----------------------------------------------------------------------------- process group
def set_default_group(group: dist.ProcessGroup | None) -> None:
    """Bind the process group FCP traffic runs on (once, at setup). ``None`` unbinds it, so calls
    fall back to the default (WORLD) group when torch.distributed is initialised."""
    global _DEFAULT_GROUP
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: got {type(group).__name__}, expected a torch.distributed.ProcessGroup or None")
    _DEFAULT_GROUP = group


def get_default_group() -> dist.ProcessGroup | None:
    """The group bound by :func:`set_default_group`, else WORLD if initialised, else None."""
    if _DEFAULT_GROUP is not None:
        return _DEFAULT_GROUP
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``group`` if given, else :func:`get_default_group` (None: no torch.distributed at all)."""
    return get_default_group() if group is None else group


def group_world_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of ``group``; (1, 0) without a group. Local calls, no communication."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# ----------------------------------------------------------------------------- byte counting
@dataclass
class CommCounter:
    """Bytes and messages this process sent/received through this module while tracking."""

    sent_bytes: int = 0
    recv_bytes: int = 0
    sent_messages: int = 0
    recv_messages: int = 0
    by_tag: dict[str, int] = field(default_factory=dict)
    """Bytes sent per kind of traffic: ``kv`` (K/V) and ``grad`` (dK/dV)."""


@contextlib.contextmanager
def track_comm() -> Iterator[CommCounter]:
    """Count the bytes of every message posted inside the ``with`` block (benchmarks and tests)."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count(tag: str, sends: Sequence[Tensor], recvs: Sequence[Tensor]) -> None:
    for c in _COUNTERS:
        sent = sum(t.numel() * t.element_size() for t in sends)
        c.sent_bytes += sent
        c.recv_bytes += sum(t.numel() * t.element_size() for t in recvs)
        c.sent_messages += len(sends)
        c.recv_messages += len(recvs)
        c.by_tag[tag] = c.by_tag.get(tag, 0) + sent


# ----------------------------------------------------------------------------- P2P primitives
class Pending:
    """Handles of posted P2P ops plus the tensors they use (kept alive until :meth:`wait`)."""

    def __init__(self, works: list, tensors: list[Tensor]):
        self._works, self._tensors = works, tensors

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works, self._tensors = [], []


def post(sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]],
         group: dist.ProcessGroup, tag: str = "kv") -> Pending:
    """Post async sends/receives: ``sends``/``recvs`` are (group rank of the peer, contiguous tensor).

    Empty tensors are skipped (both sides derive sizes from the same plan, so they skip together);
    with nothing left no op is posted at all (``batch_isend_irecv`` raises on an empty list).
    """
    sends = [(p, t) for p, t in sends if t.numel()]
    recvs = [(p, t) for p, t in recvs if t.numel()]
    num = _TAGS.get(tag, 0)
    ops = [dist.P2POp(dist.isend, t, group=group, tag=num, group_peer=p) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, tag=num, group_peer=p) for p, t in recvs]
    _count(tag, [t for _, t in sends], [t for _, t in recvs])
    if not ops:
        return Pending([], [])
    return Pending(dist.batch_isend_irecv(ops), [t for _, t in sends] + [t for _, t in recvs])


def post_kv(rounds, k: Tensor, v: Tensor, recv_buf: Tensor, group) -> Pending:
    """Forward exchange of one stage.

    rounds: the stage's ``RoundView``s. k, v: (n_local, Hkv, D) local keys/values. recv_buf:
    (num_recv, 2*Hkv, D), K|V; each round's message lands in rows ``[recv_start, recv_start + recv_len)``.
    """
    sends, recvs = [], []
    for rd in rounds:
        if rd.send_peer >= 0:
            sends.append((rd.send_peer, torch.cat([k.index_select(0, rd.send_rows),
                                                   v.index_select(0, rd.send_rows)], dim=1)))
        if rd.recv_peer >= 0:
            recvs.append((rd.recv_peer, recv_buf[rd.recv_start:rd.recv_start + rd.recv_len]))
    return post(sends, recvs, group, tag="kv")


def post_grads(rounds, dk_buf: Tensor, dv_buf: Tensor, group,
               wire_dtype: torch.dtype) -> tuple[Pending, list[tuple[Tensor, Tensor]]]:
    """Backward exchange of one stage, along the reverse edges of its rounds.

    dk_buf, dv_buf: (num_recv, Hkv, D) gradients of the receive buffer rows (any float dtype); the rows
    a round received go back to their owner as one (rows, 2*Hkv, D) dK|dV message in ``wire_dtype``.
    Returns the pending ops and ``(local rows int64 (m,), incoming (m, 2*Hkv, D))`` pairs to
    ``index_add`` into the owner's dK/dV once the ops completed.
    """
    sends, recvs, incoming = [], [], []
    for rd in rounds:
        if rd.recv_peer >= 0:
            rows = slice(rd.recv_start, rd.recv_start + rd.recv_len)
            sends.append((rd.recv_peer, torch.cat([dk_buf[rows], dv_buf[rows]], dim=1).to(wire_dtype)))
        if rd.send_peer >= 0:
            buf = dk_buf.new_empty((rd.send_rows.numel(), 2 * dk_buf.shape[1], dk_buf.shape[2]),
                                   dtype=wire_dtype)
            recvs.append((rd.send_peer, buf))
            incoming.append((rd.send_rows, buf))
    return post(sends, recvs, group, tag="grad"), incoming


# ----------------------------------------------------------------------------- plan agreement
def _exchange_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def needs_plan_check(view, group) -> bool:
    """True on the first use of this view object with this group (every rank builds its own view
    per batch, so all ranks agree on when the check runs)."""
    ref = _CHECKED.get((id(view), id(group)))
    return ref is None or ref() is not view


def agree_on_plan(view, group, local_error: str | None = None) -> None:
    """All-gather (fingerprint, error flag) on ``group``, so that no rank is left waiting for another.

    A rank with ``local_error`` raises it as ValueError, the others raise :class:`PlanMismatchError`;
    if all inputs are fine but the fingerprints differ, every rank raises PlanMismatchError naming the
    ranks of each fingerprint. One tiny collective per view object; the view is then remembered.
    """
    fp = "" if local_error is not None else str(view.fingerprint)
    digest = int.from_bytes(hashlib.blake2b(fp.encode(), digest_size=8).digest(), "little", signed=True)
    code = torch.tensor([digest, int(local_error is not None)], dtype=torch.int64,
                        device=_exchange_device(group))
    parts = [torch.empty_like(code) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, code, group=group)
    rows = [tuple(p.tolist()) for p in parts]
    failed = [r for r, row in enumerate(rows) if row[1]]
    if local_error:
        raise ValueError(local_error)
    if failed:
        raise PlanMismatchError(f"FCP attention: rank(s) {failed} rejected their inputs (see the ValueError "
                                f"there); every rank raises so that no rank waits for them")
    groups: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault(row[0], []).append(r)
    if len(groups) > 1:
        detail = "; ".join(f"one plan on ranks {ranks}" for ranks in groups.values())
        raise PlanMismatchError(f"FCP plans differ across the ranks of the process group ({detail}; this rank's "
                                f"plan fingerprint is {fp}); every rank must use plan_batch(...).for_rank(rank) "
                                f"of the same plan (same seq_lens, world_size, block_size, strategy, options)")
    key = (id(view), id(group))
    _CHECKED[key] = weakref.ref(view, lambda _, k=key: _CHECKED.pop(k, None))
