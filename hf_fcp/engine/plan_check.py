"""The plan check: before the first exchange of a view, every rank of the group learns whether all ranks
hold the same plan, size their messages alike and accepted their inputs — by one tiny all-gather — so
that a mismatch or a bad input on one rank raises on every rank instead of leaving peers waiting.

What is gathered per rank (int64): a digest of the plan's fingerprint, an error flag, and everything else
that sizes a message: the K/V dtype, the number of K/V heads and the head dim. The check runs on the
device the exchange uses (:func:`hf_fcp.engine.comm.plan_check_device`), so on NCCL it is also the first
call every rank makes on the group, as batched P2P requires. It is the one host sync of a batch (its
result decides whether to raise); layers after the first reuse the answer.
"""

from __future__ import annotations

import hashlib
import weakref

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm

WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CHECKED: dict[tuple[int, int], tuple[weakref.ref, set]] = {}  # (id(view), id(group)) -> (view, layouts)
_WHAT = "plan check (all-gather of plan fingerprints before the first exchange of a batch)"


def message_layout(k: Tensor | None) -> tuple[int, int, int]:
    """(dtype code, Hkv, D) of the K/V messages ``k`` makes; (-1, -1, -1) when unknown. The dtype code
    indexes :data:`WIRE_DTYPES` (-2: another dtype)."""
    if k is None or k.dim() != 3:
        return -1, -1, -1
    code = WIRE_DTYPES.index(k.dtype) if k.dtype in WIRE_DTYPES else -2
    return code, int(k.shape[1]), int(k.shape[2])


def needs_plan_check(view, group, k: Tensor | None = None) -> bool:
    """True on the first use of this view object with this group, and when ``k``'s message layout was not
    checked for it yet (models whose layers differ in K/V heads or head dim). Every rank builds its own
    view per batch and runs the same layers, so all ranks agree on when the check runs."""
    entry = _CHECKED.get((id(view), id(group)))
    if entry is None or entry[0]() is not view:
        return True
    return message_layout(k) not in entry[1]


def agree_on_plan(view, group, local_error: str | Exception | None = None, k: Tensor | None = None) -> None:
    """All-gather (plan digest, error flag, message layout of ``k``) on ``group``.

    A rank with ``local_error`` raises it (a message: as ValueError), the others raise :class:`~hf_fcp.
    engine.comm.PlanMismatchError`; with every input fine, differing fingerprints or message layouts raise
    PlanMismatchError on every rank, naming which ranks hold what. The view (and layout) is then remembered.
    """
    layout = message_layout(k)
    fp = "" if local_error is not None else str(view.fingerprint)
    digest = int.from_bytes(hashlib.blake2b(fp.encode(), digest_size=8).digest(), "little", signed=True)
    device = comm.plan_check_device(group, k.device if k is not None else "cpu")
    rows = _all_gather_rows([digest, int(local_error is not None), *layout], group, device)
    if isinstance(local_error, Exception):
        raise local_error
    if local_error is not None:
        raise ValueError(local_error)
    failed = [r for r, row in enumerate(rows) if row[1]]
    if failed:
        raise comm.PlanMismatchError(f"FCP attention: rank(s) {failed} rejected their inputs (see the ValueError "
                                     f"there); every rank raises so that no rank waits for them")
    _raise_if_differ(rows, fp)
    key = (id(view), id(group))
    entry = _CHECKED.get(key)
    if entry is None or entry[0]() is not view:
        entry = (weakref.ref(view, lambda _, k=key: _CHECKED.pop(k, None)), set())
        _CHECKED[key] = entry
    entry[1].add(layout)


def _all_gather_rows(values: list[int], group, device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's ``values``, by group rank; waits like any FCP exchange (bounded on gloo)."""
    code = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(code) for _ in range(dist.get_world_size(group))]
    labels = [("exchange with", p) for p in range(len(parts)) if p != dist.get_rank(group)]
    try:
        work = dist.all_gather(parts, code, group=group, async_op=True)
    except RuntimeError as err:
        raise comm.PeerFailureError(comm.failure_message(group, _WHAT, labels, None, err, comm.get_timeout())) \
            from err
    comm.Pending([work], [], labels, group, _WHAT, stream_ordered=device.type == "cuda").wait()
    return [tuple(r) for r in torch.stack(parts).tolist()]  # the batch's one host sync


def _raise_if_differ(rows: list[tuple[int, ...]], fp: str) -> None:
    by_plan: dict[int, list[int]] = {}
    by_layout: dict[tuple[int, ...], list[int]] = {}
    for r, row in enumerate(rows):
        by_plan.setdefault(row[0], []).append(r)
        by_layout.setdefault(row[2:], []).append(r)
    if len(by_plan) > 1:
        detail = "; ".join(f"one plan on ranks {ranks}" for ranks in by_plan.values())
        raise comm.PlanMismatchError(
            f"FCP plans differ across the ranks of the process group ({detail}; this rank's plan fingerprint is "
            f"{fp}); every rank must use plan_batch(...).for_rank(rank) of the same plan (same seq_lens, "
            f"world_size, block_size, strategy, options)")
    if len(by_layout) > 1:
        detail = "; ".join(f"{_describe(layout)} on ranks {ranks}" for layout, ranks in by_layout.items())
        raise comm.PlanMismatchError(
            f"FCP K/V message layout differs across the ranks of the process group ({detail}); every rank must "
            f"call fcp_attention with k/v of the same dtype, number of heads and head dim, or the messages "
            f"would not match")


def _describe(layout: tuple[int, ...]) -> str:
    code, heads, dim = layout
    dtype = WIRE_DTYPES[code] if 0 <= code < len(WIRE_DTYPES) else ("unknown dtype" if code == -1 else "other dtype")
    return f"k/v {dtype} with {heads} heads of dim {dim}"
