"""Point-to-point exchange of K/V rows (forward) and their gradients (backward) for the FCP engine.

Fixed state only: the default FCP process group (bound once at setup with :func:`set_default_group`).
Per-batch data (the rank view) always travels as an argument.

Wire format: one message per round and direction, a contiguous ``(rows, 2 * Hkv, D)`` tensor holding
K in heads ``[0, Hkv)`` and V in heads ``[Hkv, 2 * Hkv)`` (gradients: dK and dV the same way), in the
dtype of K. Messages of one stage go out together with ``dist.batch_isend_irecv``; the returned
:class:`Pending` is waited on later so that attention compute overlaps the transfer.

Peers in a view are ranks of the FCP group (``group_peer``), never global ranks.

No wait is unbounded: every P2P wait and the plan check are limited by the FCP timeout
(:func:`get_timeout`: :func:`set_timeout` / ``FCPPlugin(timeout_s=...)``, else the ``FCP_TIMEOUT_S``
environment variable, else 300 s). When a wait expires or a peer's connection drops (its process died),
:class:`PeerFailureError` names this rank, the stage and the peers.
On NCCL the CPU thread is not blocked on transfers (that would stall the overlap); there the process
group's own timeout and watchdog bound the wait, so create the group with the timeout you want.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..plan.checks import check_number

_DEFAULT_GROUP: dist.ProcessGroup | None = None
_COUNTERS: list["CommCounter"] = []  # active byte counters (instrumentation only, see track_comm)
_TAGS = {"kv": 1, "grad": 2}  # message tags per kind of traffic (gloo matches on them; NCCL ignores them)
_CHECKED: dict[tuple[int, int], weakref.ref] = {}  # (id(view), id(group)) -> view whose plan was checked
DEFAULT_TIMEOUT_S = 300.0  # FCP wait limit when neither set_timeout nor FCP_TIMEOUT_S says otherwise
TIMEOUT_ENV = "FCP_TIMEOUT_S"
_EXPIRY_SLACK_S = 0.05  # a wait that fails this close to its deadline failed because the deadline passed
_TIMEOUT_S: float | None = None  # set by set_timeout (FCPPlugin.setup)


class PlanMismatchError(RuntimeError):
    """Raised on every rank when the ranks of a group hold views of different plans (or when one rank
    rejected its inputs), instead of letting mismatched P2P traffic hang."""


class PeerFailureError(RuntimeError):
    """An FCP exchange with a peer did not complete: the peer's process died (connection closed) or
    nothing arrived within the FCP timeout. The process group is unusable afterwards: stop every rank
    and restart from the last checkpoint."""


# ----------------------------------------------------------------------------- timeout
def check_timeout(value, name: str) -> float:
    return check_number(name, value, unit="seconds")


def set_timeout(seconds: float | None) -> None:
    """Bound every FCP wait by ``seconds`` (once, at setup); ``None`` restores the default
    (``FCP_TIMEOUT_S``, else 300 s)."""
    global _TIMEOUT_S
    _TIMEOUT_S = None if seconds is None else check_timeout(seconds, "timeout")


def get_timeout() -> float:
    """Seconds any single FCP wait may take: :func:`set_timeout`'s value (``FCPPlugin`` sets it, and
    creates its group with it), else the ``FCP_TIMEOUT_S`` environment variable, else 300 s."""
    if _TIMEOUT_S is not None:
        return _TIMEOUT_S
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = raw
        return check_timeout(value, TIMEOUT_ENV)
    return DEFAULT_TIMEOUT_S


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
    """Handles of posted P2P ops plus the tensors they use (kept alive until :meth:`wait`).

    :meth:`wait` is bounded by the FCP timeout and turns a failed or expired transfer into
    :class:`PeerFailureError` naming this rank, the stage (``what``) and the peers.
    """

    def __init__(self, works: list, tensors: list[Tensor], ops: Sequence[tuple[str, int]] = (),
                 group=None, what: str = "FCP exchange"):
        self._works, self._tensors = works, tensors
        self._ops, self._group, self._what = list(ops), group, what  # ops: ("send to"/"receive from", peer)

    def wait(self) -> None:
        if not self._works:
            return
        timeout = get_timeout()
        bounded = dist.get_backend(self._group) != "nccl"  # NCCL: the watchdog bounds it (module doc)
        deadline = time.monotonic() + timeout
        for i, w in enumerate(self._works):
            try:
                if bounded:
                    left = max(deadline - time.monotonic(), 1e-3)
                    done = w.wait(datetime.timedelta(seconds=left))
                else:
                    done = w.wait()
            except RuntimeError as err:
                expired = bounded and time.monotonic() >= deadline - _EXPIRY_SLACK_S
                raise PeerFailureError(self.describe(i, err, timeout, expired)) from err
            if done is False:
                raise PeerFailureError(self.describe(i, None, timeout, True))
        self._works, self._tensors = [], []

    def describe(self, index: int | None, err: BaseException | None, timeout: float, expired: bool) -> str:
        """The message of a failed wait on op ``index`` (None: unknown op); ``expired``: the FCP timeout
        ran out (else the transfer failed before it)."""
        mapped = len(self._works) == len(self._ops)  # coalesced backends (NCCL) return one handle for all
        return failure_message(self._group, self._what, self._ops, index if mapped else None, err, timeout,
                               expired)


def failure_message(group, what: str, ops: Sequence[tuple[str, int]], index: int | None,
                    err: BaseException | None, timeout: float, expired: bool = False) -> str:
    """The :class:`PeerFailureError` text. The cause is told by the clock, not by the backend's wording:
    ``expired`` (the wait used up the FCP timeout) means the peer made no progress; a failure before that
    means the transfer broke, on gloo because the peer's connection closed (its process died)."""
    size, rank = group_world_rank(group)
    text = str(err) if err is not None else ""
    if expired:
        cause = f"no progress within the FCP timeout of {timeout:g} s"
    else:
        cause = "the transfer failed before the FCP timeout: the connection was closed (the peer process " \
                "probably died) or the backend reported an error"
    if index is not None and index < len(ops):
        op, peer = ops[index]
        culprit, suspects = f"{op} rank {peer}", [peer]
    else:
        culprit, suspects = "the transfers", sorted({p for _, p in ops})
    others = ", ".join(f"{o} rank {p}" for o, p in ops) or "none"
    detail = f" [{text.splitlines()[0][:240]}]" if text else ""
    return (f"FCP rank {rank} of {size}: {what}: {culprit} failed: {cause}{detail}. This stage's "
            f"transfers: {others}. Check the log of rank(s) {suspects} (died, hung, or running a different "
            f"step/plan). The FCP process group cannot be used after this: stop every rank and restart from "
            f"the last checkpoint (FCPTrainer / Trainer: resume_from_checkpoint=True). If the stage is only "
            f"slow, raise the limit ({TIMEOUT_ENV}=seconds or FCPPlugin(timeout_s=...), now {timeout:g} s).")


def post(sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]],
         group: dist.ProcessGroup, tag: str = "kv", what: str | None = None) -> Pending:
    """Post async sends/receives: ``sends``/``recvs`` are (group rank of the peer, contiguous tensor).

    Empty tensors are skipped (both sides derive sizes from the same plan, so they skip together);
    with nothing left no op is posted at all (``batch_isend_irecv`` raises on an empty list).
    ``what`` names the exchange in error messages (e.g. "forward K/V exchange, stage 2 of 5").
    """
    sends = [(p, t) for p, t in sends if t.numel()]
    recvs = [(p, t) for p, t in recvs if t.numel()]
    num = _TAGS.get(tag, 0)
    ops = [dist.P2POp(dist.isend, t, group=group, tag=num, group_peer=p) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, tag=num, group_peer=p) for p, t in recvs]
    _count(tag, [t for _, t in sends], [t for _, t in recvs])
    if not ops:
        return Pending([], [])
    labels = [("send to", p) for p, _ in sends] + [("receive from", p) for p, _ in recvs]
    what = what or f"{tag} exchange"
    try:
        works = dist.batch_isend_irecv(ops)
    except RuntimeError as err:  # gloo posts sends eagerly: a dead peer fails here already
        raise PeerFailureError(failure_message(group, what, labels, None, err, get_timeout())) from err
    return Pending(works, [t for _, t in sends] + [t for _, t in recvs], labels, group, what)


def post_kv(rounds, k: Tensor, v: Tensor, recv_buf: Tensor, group, what: str = "forward K/V exchange") -> Pending:
    """Forward exchange of one stage (``what`` names it in error messages).

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
    return post(sends, recvs, group, tag="kv", what=what)


def post_grads(rounds, dk_buf: Tensor, dv_buf: Tensor, group, wire_dtype: torch.dtype,
               what: str = "backward dK/dV exchange") -> tuple[Pending, list[tuple[Tensor, Tensor]]]:
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
    return post(sends, recvs, group, tag="grad", what=what), incoming


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
    peers = [r for r in range(len(parts)) if r != dist.get_rank(group)]
    what = "plan check (all-gather of plan fingerprints before the first exchange of a batch)"
    labels = [("exchange with", p) for p in peers]
    try:
        work = dist.all_gather(parts, code, group=group, async_op=True)
    except RuntimeError as err:
        raise PeerFailureError(failure_message(group, what, labels, None, err, get_timeout())) from err
    Pending([work], [], labels, group, what).wait()
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
