"""Point-to-point exchange of K/V rows (forward) and their gradients (backward) for the FCP engine.

Fixed state only: the default FCP process group (bound once at setup with :func:`set_default_group`).
Per-batch data (the rank view) always travels as an argument.

Wire format: one message per round and direction, a contiguous ``(rows, 2 * Hkv, D)`` tensor holding
K in heads ``[0, Hkv)`` and V in heads ``[Hkv, 2 * Hkv)`` (gradients: dK and dV the same way), in the
dtype of K, packed by one kernel (an ``index_select`` of the K|V rows, a cast-copy of the dK|dV rows).
Messages of one stage go out together with ``dist.batch_isend_irecv``; the returned :class:`Pending` is
waited on where the received data is read, so that attention compute overlaps the transfer.

Peers in a view are ranks of the FCP group (``group_peer``), never global ranks. The backend is the
group's backend for the device of the tensors (:func:`exchange_backend`): a group created as ``"nccl"``,
``"cpu:gloo,cuda:nccl"`` or without a backend runs CUDA tensors on NCCL; CUDA tensors on a gloo-only group
are refused (:func:`check_exchange_device`), since gloo would read device memory as host memory.

Waits differ by backend (:meth:`Pending.wait`):

* gloo (CPU): every wait blocks, bounded by the FCP timeout (:func:`get_timeout`: :func:`set_timeout` /
  ``FCPPlugin(timeout_s=...)``, else ``FCP_TIMEOUT_S``, else 300 s); a wait that expires or a peer whose
  connection drops (its process died) raises :class:`PeerFailureError` naming this rank, stage and peers.
* NCCL: stream-ordered, never a host block. ``Work.wait()`` without a timeout makes the current CUDA stream
  wait for the transfer (with a timeout it would poll on the CPU); exchanges whose received data nothing
  reads (send-only ones) are not waited at all: their handles are kept until they complete. A dead or
  stalled peer is then caught by NCCL's watchdog after the group's timeout (``FCPPlugin`` creates the group
  with the job's timeout), which tears the process down: see docs/failures.md.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..plan.checks import check_number
from . import comm_trace
from .comm_trace import CommCounter, track_comm  # noqa: F401 — re-exported (benchmarks, tests)

_DEFAULT_GROUP: dist.ProcessGroup | None = None
_RETIRED: list[tuple[list, list]] = []  # (works, tensors) of NCCL exchanges nobody waits on, until complete
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
    env = env_timeout()
    return DEFAULT_TIMEOUT_S if env is None else env


def env_timeout() -> float | None:
    """The ``FCP_TIMEOUT_S`` environment variable (validated), None when unset or empty."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = raw
    return check_timeout(value, TIMEOUT_ENV)


# ----------------------------------------------------------------------------- process group
def set_default_group(group: dist.ProcessGroup | None) -> None:
    """Bind the process group FCP traffic runs on (once, at setup). ``None`` unbinds it, so calls
    fall back to the default (WORLD) group when torch.distributed is initialised."""
    global _DEFAULT_GROUP
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: got {type(group).__name__}, expected a torch.distributed.ProcessGroup or None")
    _DEFAULT_GROUP = group


def bound_group() -> dist.ProcessGroup | None:
    """The group bound by :func:`set_default_group` (``FCPPlugin.setup``), or None: not WORLD."""
    return _DEFAULT_GROUP


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



# ----------------------------------------------------------------------------- backend and device
def device_backends(group) -> dict[str, str]:
    """``{device type: backend name}`` of ``group`` (e.g. ``{"cpu": "gloo", "cuda": "nccl"}``), parsed from
    ``dist.get_backend_config``. ``dist.get_backend`` is not enough: for a group created as
    ``"cpu:gloo,cuda:nccl"`` it returns that whole string, and torch.distributed fills the map of a group
    created without a backend from the machine's accelerator."""
    return parse_backend_config(dist.get_backend_config(group))


def parse_backend_config(text: str) -> dict[str, str]:
    """``"cpu:gloo,cuda:nccl"`` -> ``{"cpu": "gloo", "cuda": "nccl"}``; a bare name (``"gloo"``) maps
    the device types torch.distributed gives it (gloo: cpu and cuda, nccl: cuda)."""
    text = str(text).strip().lower()
    if ":" not in text:
        capable = dist.Backend.backend_capability.get(text, ["cpu", "cuda"])
        return dict.fromkeys(capable, text)
    pairs = (part.split(":", 1) for part in text.split(",") if part.strip())
    return {device.strip(): name.strip() for device, name in pairs}


def exchange_backend(group, device: torch.device | str) -> str | None:
    """The backend ``group`` runs tensors on ``device`` with ("nccl", "gloo", ...), None if it has none."""
    return device_backends(group).get(torch.device(device).type)


def check_exchange_device(group, device: torch.device | str) -> str | None:
    """The problem with exchanging tensors on ``device`` over ``group`` as a "got X, expected Y" message,
    or None. Local and cheap (no communication): run it before the plan check, which routes the
    answer to every rank."""
    device = torch.device(device)
    backends = device_backends(group)
    backend = backends.get(device.type)
    config = ",".join(f"{d}:{b}" for d, b in backends.items())
    if backend is None:
        return (f"FCP process group: got backends {config!r}, expected one for {device.type} tensors (q is on "
                f"{device}); create the group for that device, e.g. new_group(backend='nccl') on GPUs")
    if device.type == "cuda" and backend != "nccl":
        return (f"FCP process group backend for cuda tensors: got {backend!r}, expected 'nccl' ({backend}'s "
                f"send reads CUDA memory as host memory); create the FCP group with backend='nccl'")
    if device.type == "cuda":
        current, wanted = torch.cuda.current_device(), device.index
        if wanted is not None and current != wanted:
            return (f"torch.cuda.current_device(): got {current}, expected {wanted} (q is on {device}); call "
                    f"torch.cuda.set_device({wanted}) (the local rank) before the first FCP exchange: NCCL "
                    f"point-to-point calls need it")
    return None


def plan_check_device(group, device: torch.device | str) -> torch.device:
    """Where the plan check's all-gather runs: on ``device`` when the group's backend for it is NCCL (so
    every rank takes part in the group's first NCCL call, as batched P2P requires), else on the CPU."""
    device = torch.device(device)
    backends = device_backends(group)
    if device.type == "cuda" and backends.get("cuda") == "nccl":
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    if "cpu" in backends or backends.get("cuda") != "nccl":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())  # a CUDA-only group (q is not on CUDA: refused)


# ----------------------------------------------------------------------------- P2P primitives
class Pending:
    """Handles of one posted exchange plus the tensors it uses (kept alive until :meth:`wait`).

    ``stream_ordered`` (NCCL): :meth:`wait` never blocks the CPU. ``ops`` are ("send to"/"receive from",
    peer) labels for error messages; ``what`` names the exchange.
    """

    def __init__(self, works: list, tensors: list[Tensor], ops: Sequence[tuple[str, int]] = (),
                 group=None, what: str = "FCP exchange", stream_ordered: bool = False):
        self._works, self._tensors = works, tensors
        self._ops, self._group, self._what = list(ops), group, what
        self._stream_ordered = stream_ordered
        self.receives = any(op != "send to" for op, _ in self._ops)  # "receive from", "exchange with"

    def wait(self, consume: bool = True) -> None:
        """The data received in this exchange is about to be read (``consume=False``: nothing this rank
        runs reads it). gloo: block until every op completed, bounded by the FCP timeout. NCCL: the current
        CUDA stream waits for the exchange (no host block); an exchange that is not consumed, or receives
        nothing, is not waited at all — its handles are kept until it completes (:func:`release_retired`)."""
        if not self._works:
            return
        if not self._stream_ordered:
            self._bounded_wait()
        elif consume and self.receives:
            self._stream_wait()
        else:
            _RETIRED.append((self._works, self._tensors))
        self._works, self._tensors = [], []

    def _stream_wait(self) -> None:
        start, timeout = time.monotonic(), get_timeout()
        for i, w in enumerate(self._works):
            try:
                w.wait()  # no timeout argument: with one, ProcessGroupNCCL polls on the CPU until done
            except RuntimeError as err:  # raised here only with TORCH_NCCL_BLOCKING_WAIT=1 or error handling 0/2
                expired = time.monotonic() - start >= timeout - _EXPIRY_SLACK_S
                raise PeerFailureError(self.describe(i, err, timeout, expired)) from err

    def _bounded_wait(self) -> None:
        timeout = get_timeout()
        deadline = time.monotonic() + timeout
        for i, w in enumerate(self._works):
            try:
                done = w.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
            except RuntimeError as err:
                expired = time.monotonic() >= deadline - _EXPIRY_SLACK_S
                raise PeerFailureError(self.describe(i, err, timeout, expired)) from err
            if done is False:
                raise PeerFailureError(self.describe(i, None, timeout, True))

    def describe(self, index: int | None, err: BaseException | None, timeout: float, expired: bool) -> str:
        """The message of a failed wait on op ``index`` (None: unknown op); ``expired``: the FCP timeout
        ran out (else the transfer failed before it)."""
        mapped = len(self._works) == len(self._ops)  # coalesced backends (NCCL) return one handle for all
        return failure_message(self._group, self._what, self._ops, index if mapped else None, err, timeout,
                               expired)


def release_retired(wait: bool = False) -> int:
    """Drop the kept handles of unwaited NCCL exchanges that completed (``wait=True``: make the current
    stream wait for the others first, then drop all). Returns how many are still kept. ``is_completed``
    only queries a CUDA event: no host sync."""
    if wait:
        for works, _ in _RETIRED:
            for w in works:
                w.wait()
        _RETIRED.clear()
    _RETIRED[:] = [(w, t) for w, t in _RETIRED if not all(x.is_completed() for x in w)]
    return len(_RETIRED)


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
        culprit, suspects = f"{op} rank {_global(group, peer)}", [peer]
    else:
        culprit, suspects = "the transfers", sorted({p for _, p in ops})
    others = ", ".join(f"{o} rank {_global(group, p)}" for o, p in ops) or "none"
    detail = f" [{text.splitlines()[0][:240]}]" if text else ""
    return (f"FCP rank {_global(group, rank)} of {size}: {what}: {culprit} failed: {cause}{detail}. This stage's "
            f"transfers: {others}. Check the log of rank(s) {suspects} (died, hung, or running a different "
            f"step/plan). The FCP process group cannot be used after this: stop every rank and restart from "
            f"the last checkpoint (FCPTrainer / Trainer: resume_from_checkpoint=True). If the stage is only "
            f"slow, raise the limit ({TIMEOUT_ENV}=seconds or FCPPlugin(timeout_s=...), now {timeout:g} s).")


def _global(group, rank: int) -> str:
    """``rank`` of ``group`` for messages: "3", or "3 (global rank 11)" when the job's numbering differs."""
    try:
        glob = dist.get_global_rank(group, rank) if group is not None else rank
    except (RuntimeError, ValueError):
        glob = rank
    return str(rank) if glob == rank else f"{rank} (global rank {glob})"


def post(sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]],
         group: dist.ProcessGroup, tag: str = "kv", what: str | None = None) -> Pending:
    """Post async sends/receives: ``sends``/``recvs`` are (group rank of the peer, contiguous tensor).

    Empty tensors are skipped (both sides derive sizes from the same plan, so they skip together);
    with nothing left no op is posted at all (``batch_isend_irecv`` raises on an empty list).
    ``what`` names the exchange in error messages (e.g. "forward K/V exchange, stage 2 of 5").
    """
    sends = [(p, t) for p, t in sends if t.numel()]
    recvs = [(p, t) for p, t in recvs if t.numel()]
    what = what or f"{tag} exchange"
    num = comm_trace.tag_number(tag)
    comm_trace.note(tag, what, sends, recvs)
    if not sends and not recvs:
        return Pending([], [])
    labels = [("send to", p) for p, _ in sends] + [("receive from", p) for p, _ in recvs]
    nccl = exchange_backend(group, (sends or recvs)[0][1].device) == "nccl"
    if nccl and _RETIRED:
        release_retired()
    post_ops = _post_batch if nccl else _post_each
    works = post_ops(sends, recvs, group, num, what, labels)
    return Pending(works, [t for _, t in sends] + [t for _, t in recvs], labels, group, what, stream_ordered=nccl)


def _post_batch(sends, recvs, group, tag: int, what: str, labels) -> list:
    """NCCL: every op in one ``batch_isend_irecv`` (one coalesced group); a failure names no single op."""
    ops = [dist.P2POp(dist.isend, t, group=group, tag=tag, group_peer=p) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, tag=tag, group_peer=p) for p, t in recvs]
    try:
        return dist.batch_isend_irecv(ops)
    except RuntimeError as err:
        raise PeerFailureError(failure_message(group, what, labels, None, err, get_timeout())) from err


def _post_each(sends, recvs, group, tag: int, what: str, labels) -> list:
    """Gloo: the ops one by one (what ``batch_isend_irecv`` does there too). Gloo posts a send eagerly, so a
    dead peer fails here already, and the op that raised names it."""
    posts = [(dist.isend, t, {"group_dst": p}) for p, t in sends] + [(dist.irecv, t, {"group_src": p})
                                                                      for p, t in recvs]
    works = []
    for index, (fn, tensor, peer) in enumerate(posts):
        try:
            works.append(fn(tensor, group=group, tag=tag, **peer))
        except RuntimeError as err:
            raise PeerFailureError(failure_message(group, what, labels, index, err, get_timeout())) from err
    return works


def pack_kv(k: Tensor, v: Tensor, stages) -> Tensor | None:
    """K|V of every local row, ``(n_local, 2*Hkv, D)``, in one kernel per attention call, so that each K/V
    message is one ``index_select`` of it (:func:`post_kv`); None when this rank sends nothing in ``stages``."""
    sends = any(rd.send_peer >= 0 and rd.send_rows.numel() for s in stages for rd in s.rounds)
    return torch.cat([k, v], dim=1) if sends else None


def post_kv(rounds, kv: Tensor | None, recv_buf: Tensor, group, what: str = "forward K/V exchange") -> Pending:
    """Forward exchange of one stage (``what`` names it in error messages).

    rounds: the stage's ``RoundView``s. kv: ``pack_kv(k, v, stages)``, (n_local, 2*Hkv, D). recv_buf:
    (num_recv, 2*Hkv, D), K|V; each round's message lands in rows ``[recv_start, recv_start + recv_len)``.
    """
    sends, recvs = [], []
    for rd in rounds:
        if rd.send_peer >= 0 and rd.send_rows.numel():
            sends.append((rd.send_peer, kv.index_select(0, rd.send_rows)))
        if rd.recv_peer >= 0:
            recvs.append((rd.recv_peer, recv_buf[rd.recv_start:rd.recv_start + rd.recv_len]))
    return post(sends, recvs, group, tag="kv", what=what)


def post_grads(rounds, dkv_buf: Tensor, group, wire_dtype: torch.dtype,
               what: str = "backward dK/dV exchange") -> tuple[Pending, list[tuple[Tensor, Tensor]]]:
    """Backward exchange of one stage, along the reverse edges of its rounds.

    dkv_buf: (num_recv, 2*Hkv, D) gradients of the receive buffer rows, dK in heads [0, Hkv) and dV in
    [Hkv, 2*Hkv) (any float dtype); the rows a round received go back to their owner as one message,
    cast-copied to ``wire_dtype`` by one kernel. Returns the pending ops and ``(local rows int64 (m,),
    incoming (m, 2*Hkv, D))`` pairs to ``index_add`` into the owner's dK/dV once :meth:`Pending.wait` ran.
    """
    sends, recvs, incoming = [], [], []
    for rd in rounds:
        if rd.recv_peer >= 0 and rd.recv_len:
            rows = dkv_buf[rd.recv_start:rd.recv_start + rd.recv_len]
            sends.append((rd.recv_peer, rows.to(wire_dtype, copy=True)))
        if rd.send_peer >= 0 and rd.send_rows.numel():
            buf = dkv_buf.new_empty((rd.send_rows.numel(), *dkv_buf.shape[1:]), dtype=wire_dtype)
            recvs.append((rd.send_peer, buf))
            incoming.append((rd.send_rows, buf))
    return post(sends, recvs, group, tag="grad", what=what), incoming
