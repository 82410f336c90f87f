"""Attention work of one rank as varlen batches (:class:`TaskList`), built once per view from the plan.

Three kinds of segments, all exact causal attention within a sequence:

* **local** (causal, keys = this rank's K/V): per sequence executed *split*, one segment over all its held
  runs joined in position order — "query i sees keys 0..i of the joined runs" is exactly the causal mask,
  because the positions missing between runs are not in the segment::

      queries = keys:  [ a1 .. b1 | a2 ....... b2 ]     (tokens b1..a2 live on other ranks)

  and per sequence executed *fused*, each held run whose keys are all local (e.g. the run at position 0).
* **remote** (not causal, keys = rows of the receive buffer): per split sequence and communication stage,
  the held runs that see pieces which arrived in that stage. A piece is either wholly before a held run
  (all pairs visible) or wholly after it (none); consecutive runs that see the same pieces share one
  segment, so each query row appears once per stage.
* **fused** (causal, bottom-right aligned, keys = rows of the K/V buffer ``[receive buffer | local K/V]``):
  per fused sequence, one segment per held run ``[a, b)`` against all keys ``[0, b)`` in position order —
  received pieces and local runs interleaved — run once the last piece it needs has arrived. One kernel
  segment instead of a local one plus remote ones, so fewer partial tiles and per-tile set-ups::

      keys  (position order):  [ piece | local run | piece | a ........ b )
      queries:                                              [ a ........ b )   (bottom-right causal)

  Under a sliding window (the views of ``plan.for_window(w)``) every sequence runs fused and a run's keys
  start at ``max(0, a - w + 1)``: the exchange brings only those, and the kernels mask the window.

Everything here is host-side arithmetic on the plan; the tensors are int64 row indices and int32 offsets,
moved to the device once with the view, so the engine never reads device memory back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .spans import ranges


def index_tensor(a, dtype=np.int64) -> torch.Tensor:
    """``a`` as a contiguous CPU tensor of ``dtype`` (row indices, offsets)."""
    return torch.as_tensor(np.ascontiguousarray(a, dtype=dtype))


class Movable:
    """``.to(device)`` for dataclasses holding tensors, nested views and tuples of views."""

    def to(self, device):
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, Movable)):
                changes[f.name] = value.to(device)
            elif isinstance(value, tuple) and value and isinstance(value[0], Movable):
                changes[f.name] = tuple(v.to(device) for v in value)
        return replace(self, **changes)


@dataclass(frozen=True)
class TaskList(Movable):
    """A varlen batch of attention segments. Segment ``i`` has queries ``q[q_rows[cu_q[i]:cu_q[i+1]]]`` and
    keys/values ``kv[k_rows[cu_k[i]:cu_k[i+1]]]`` (``kv``: local K/V, the receive buffer or the K/V buffer,
    by kind). Offsets are kept on the host (``offs_*``, ``max_*``) and on the device (``cu_*``)."""

    q_rows: torch.Tensor  # int64 (Nq,)
    k_rows: torch.Tensor  # int64 (Nk,)
    cu_q: torch.Tensor  # int32 (S+1,)
    cu_k: torch.Tensor  # int32 (S+1,)
    offs_q: tuple[int, ...]  # the same offsets as Python ints (host)
    offs_k: tuple[int, ...]
    max_q: int  # longest query / key run of a segment
    max_k: int
    causal: bool  # bottom-right aligned causal mask when True
    q_all: bool  # q_rows is 0..n-1 of the whole query source: no gather needed
    k_all: bool  # k_rows is 0..n-1 of the whole key source

    @property
    def num_segments(self) -> int:
        return len(self.offs_q) - 1

    @staticmethod
    def build(q_runs: list[np.ndarray], k_runs: list[np.ndarray], causal: bool, n_q: int, n_k: int) -> "TaskList":
        """From per-segment row arrays; ``n_q``/``n_k``: rows of the query / key source."""
        cat = lambda runs: np.concatenate(runs) if runs else np.zeros(0, np.int64)  # noqa: E731
        q_rows, k_rows = cat(q_runs), cat(k_runs)
        offs_q = np.concatenate([[0], np.cumsum([len(r) for r in q_runs], dtype=np.int64)])
        offs_k = np.concatenate([[0], np.cumsum([len(r) for r in k_runs], dtype=np.int64)])
        whole = lambda rows, n: len(rows) == n and bool((rows == np.arange(n)).all())  # noqa: E731
        return TaskList(q_rows=index_tensor(q_rows), k_rows=index_tensor(k_rows),
                        cu_q=index_tensor(offs_q, np.int32), cu_k=index_tensor(offs_k, np.int32),
                        offs_q=tuple(offs_q.tolist()), offs_k=tuple(offs_k.tolist()),
                        max_q=int(np.diff(offs_q).max(initial=0)), max_k=int(np.diff(offs_k).max(initial=0)),
                        causal=causal, q_all=whole(q_rows, n_q), k_all=whole(k_rows, n_k))


def rows_of(runs) -> np.ndarray:
    """Local rows of ``runs`` ((start, end, local offset), in position order), concatenated."""
    return ranges(np.array([o for _, _, o in runs], np.int64), np.array([b - a for a, b, _ in runs], np.int64))


def local_tasks(by_seq: dict, fused: frozenset, n_local: int, extra=()) -> TaskList:
    """Slot 0 (causal, local K/V): per split sequence its held runs joined, plus ``extra`` (query rows, key
    rows) segments: the fused runs whose keys are all local (:func:`fused_segments`, stage −1).
    ``by_seq``: seq -> held runs (start, end, local offset) in position order."""
    runs = [rows_of(held) for s, held in by_seq.items() if s not in fused]
    return TaskList.build(runs + [q for q, _ in extra], runs + [k for _, k in extra], True, n_local, n_local)


def remote_tasks(by_seq: dict, fused: frozenset, pieces, n_local: int, n_buf: int) -> TaskList:
    """One stage's non-causal segments of the split sequences. ``pieces``: (seq, start, end, buffer row)
    that arrived in the stage. For a sequence whose held runs start at a_1 < a_2 < ..., the pieces ending
    in (a_{j-1}, a_j] are seen by runs j, j+1, ...: one segment per such group, each piece once."""
    got_by_seq: dict[int, list[tuple[int, int, int]]] = {}
    for s, c, d, row in pieces:
        if s not in fused:
            got_by_seq.setdefault(s, []).append((c, d, row))
    q_runs, k_runs = [], []
    for s, got in got_by_seq.items():
        held, keys, group = by_seq.get(s, []), [], []
        got.sort()
        i = 0
        for j, (a, _, _) in enumerate(held):
            new = []
            while i < len(got) and got[i][1] <= a:
                c, d, row = got[i]
                new.append(np.arange(row, row + d - c, dtype=np.int64))
                i += 1
            if new and group:  # this run sees more keys than the runs before it: close their segment
                q_runs.append(rows_of(group))
                k_runs.append(np.concatenate(keys))
                group = []
            keys += new
            if keys:
                group.append(held[j])
        if group:
            q_runs.append(rows_of(group))
            k_runs.append(np.concatenate(keys))
    return TaskList.build(q_runs, k_runs, False, n_local, n_buf)


def fused_segments(by_seq: dict, fused: frozenset, pieces, num_recv: int, window: int | None = None):
    """The fused segments as (stage, query rows, key rows): per fused sequence one per held run ``[a, b)``
    against keys ``[k0, b)`` in position order, ``k0 = 0`` or under a sliding ``window`` ``max(0, a -
    window + 1)``. Stage −1 when every key is local (key rows index the local K/V), else the stage of the
    last piece it reads (key rows index the K/V buffer ``[receive buffer (num_recv rows) | local K/V]``).
    ``pieces``: (seq, start, end, buffer row, stage) of every received piece."""
    got_by_seq: dict[int, list[tuple[int, int, int, int]]] = {}
    for s, c, d, row, stage in pieces:
        if s in fused:
            got_by_seq.setdefault(s, []).append((c, d, row, stage))
    out = []
    for s, held in by_seq.items():
        if s not in fused:
            continue
        got = sorted(got_by_seq.get(s, ()))
        for j, (a, b, o) in enumerate(held):
            k0 = 0 if window is None else max(0, a - window + 1)
            remote = [(max(c, k0), row + max(c, k0) - c, d, stage) for c, d, row, stage in got if k0 < d <= a]
            shift = num_recv if remote else 0
            items = [(c, np.arange(row, row + d - c, dtype=np.int64)) for c, row, d, _ in remote]
            items += [(max(a2, k0), shift + np.arange(o2 + max(a2, k0) - a2, o2 + b2 - a2, dtype=np.int64))
                      for a2, b2, o2 in held[:j + 1] if b2 > k0]
            items.sort(key=lambda item: item[0])
            stage = max((g[3] for g in remote), default=-1)
            out.append((stage, np.arange(o, o + b - a, dtype=np.int64), np.concatenate([r for _, r in items])))
    return out


def fused_tasks(segments, num_stages: int, n_local: int, num_recv: int, overlap: bool = True) -> list[TaskList]:
    """Per stage, the :func:`fused_segments` (stage ≥ 0) whose last needed piece arrived in it (causal, keys
    in the K/V buffer); without ``overlap`` all of them in the last stage (one call once everything
    arrived)."""
    per_stage: list[tuple[list, list]] = [([], []) for _ in range(num_stages)]
    for stage, q, k in segments:
        if stage >= 0:
            q_runs, k_runs = per_stage[stage if overlap else num_stages - 1]
            q_runs.append(q)
            k_runs.append(k)
    return [TaskList.build(q, k, True, n_local, num_recv + n_local) for q, k in per_stage]
