"""Cost model the fcp placement balances: attention-kernel work per rank, in units of causal pairs.

A rank runs, per sequence it holds, one causal kernel segment over its held tokens (the local task) and,
per held run, a non-causal segment of the run's queries against the K/V of earlier tokens it does not
hold (the remote tasks). A FlashAttention-style kernel does not spend time in proportion to the visible
pairs alone: it works in tiles of ``tile`` × ``tile``, pays a whole tile for a partial one, extra for
tiles the causal diagonal crosses, and a fixed set-up per query tile (forward: one thread block per
query tile) and per key tile (backward: one per key tile)::

    work = touched tiles + diag · diagonal tiles + q_tile · ceil(q / tile) + k_tile · ceil(k / tile)

So a 128-token piece at position 400K placed away from its prefix costs far more than its pairs (its
backward runs 3K thread blocks of one query tile each), and a rank of many short documents pays a partial
tile per document. :func:`seq_cost` gives a rank's forward + backward work for one sequence, in pairs.
``balance="pairs"`` (:data:`PAIRS`: unit tiles, no overheads) makes it the plain causal pair count.

The overheads of :data:`FLASH` were fitted to PyTorch's FlashAttention-2 varlen kernel (the
``torch_cuda`` backend) on an H200 by ``benchmarks/calibrate_attention.py``; the simulator's
cluster model (:mod:`hf_fcp.simulate.cluster`) carries the same fields to time segments.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(kw_only=True, frozen=True)
class TileModel:
    """A FlashAttention-style kernel's tile and what it spends beyond full tiles (module doc), forward and
    backward. Shared by the planner's :class:`KernelCost` and the simulator's ``Cluster``."""

    tile: int = 128
    """Queries (and keys) per tile; a partial tile at a segment's edge costs a whole one."""
    fwd_diag: float = 0.0
    """Forward: extra cost of a tile the causal diagonal crosses, in full tiles."""
    fwd_q_tile: float = 0.0
    """Forward: fixed cost per query tile of a segment (a thread block's set-up and epilogue), in tiles."""
    fwd_k_tile: float = 0.0
    """Forward: fixed cost per key tile of a segment, in tiles."""
    bwd_diag: float = 0.0
    """Backward: extra cost of a tile the causal diagonal crosses, in full tiles."""
    bwd_q_tile: float = 0.0
    """Backward: fixed cost per query tile of a segment, in tiles."""
    bwd_k_tile: float = 0.0
    """Backward: fixed cost per key tile of a segment (its thread block loads K/V, writes dK/dV), in tiles."""

    def overheads(self) -> dict[str, float]:
        """The six overhead fields (:data:`OVERHEADS`) by name."""
        return {k: getattr(self, k) for k in OVERHEADS}


@dataclass(kw_only=True, frozen=True)
class KernelCost(TileModel):
    """Relative cost of a kernel's tiles (no absolute speed is needed to balance ranks)."""

    bwd_weight: float = 2.5
    """Time of a full backward tile over a full forward tile (``2.5 × eff_fwd / eff_bwd``)."""
    launch: float = 0.0
    """Fixed cost of one kernel launch, in full forward tiles: a rank runs one kernel per time slot with
    work (its local work, each stage's), forward and backward. 0: not modelled (tile costs alone carry
    no absolute time; :func:`hf_fcp.simulate.engine.planner_model` gives a machine's)."""

    @property
    def tile_work(self) -> float:
        """One full forward tile in the units :func:`.segments.priced` prices in (a tile's pairs, forward and
        backward together): ``tile² / (1 + bwd_weight)``; a ``launch`` costs ``launch × tile_work``."""
        return float(self.tile ** 2) / (1.0 + self.bwd_weight)

    @classmethod
    def of_kernel(cls, tile: int, eff_fwd: float, eff_bwd: float, **overheads: float) -> "KernelCost":
        """From a measured kernel: its tile, full-tile efficiencies (fractions of peak) and the six
        :data:`OVERHEADS`; the backward weight follows from the FLOP ratio and the two efficiencies."""
        return cls(tile=int(tile), **{k: float(overheads[k]) for k in OVERHEADS},
                   bwd_weight=BWD_FLOP_RATIO * eff_fwd / eff_bwd)

    @cached_property
    def coefficients(self) -> tuple[float, float, float, float]:
        """Pairs charged per (touched tile, diagonal tile, query tile, key tile), forward + backward."""
        w, t2 = self.bwd_weight, float(self.tile ** 2)
        per = lambda f, b: (f + w * b) * t2 / (1.0 + w)  # noqa: E731
        return t2, per(self.fwd_diag, self.bwd_diag), per(self.fwd_q_tile, self.bwd_q_tile), per(self.fwd_k_tile,
                                                                                                  self.bwd_k_tile)


BWD_FLOP_RATIO = 2.5
"""Backward / forward FLOPs of attention (FlashAttention's benchmark convention: 5 matmuls vs 2)."""

OVERHEADS = ("fwd_diag", "fwd_q_tile", "fwd_k_tile", "bwd_diag", "bwd_q_tile", "bwd_k_tile")
"""The overhead fields of :class:`TileModel`."""

PAIRS = KernelCost(tile=1)
"""Visible (query, key) pairs only: the cost ``balance="pairs"`` equalises."""

FLASH = KernelCost(tile=128, fwd_diag=0.6785, fwd_q_tile=0.5272, fwd_k_tile=0.0285, bwd_diag=0.0, bwd_q_tile=1.1339,
                   bwd_k_tile=0.9039, bwd_weight=2.6925)
"""PyTorch's FlashAttention-2 varlen kernel measured on an H200 (``docs/measurements/h200_torch_flash.json``; the
``h200`` cluster preset of the simulator holds the same numbers)."""


def tiles(q: int, k: int, causal: bool, tile: int) -> tuple[float, float, float, float]:
    """``(touched, diagonal, query tiles, key tiles)`` of one segment (causal: bottom-right aligned).
    ``diagonal``: touched tiles of a causal segment that need masking (crossed by the diagonal, or a
    partial key tile at the segment's end).

    Causal: with ``n = ceil(q / tile)`` query tiles and offset ``o = k - q``, query tile ``r < n - 1``
    touches ``r + 1 + ceil(o / tile)`` key tiles and the last one ``ceil(k / tile)``; of these
    ``r + floor((o + 1) / tile)`` are fully visible to every row of the tile."""
    if causal:
        q = min(q, k)
    if q <= 0 or k <= 0:
        return 0.0, 0.0, 0.0, 0.0
    nq, nk = -(-q // tile), -(-k // tile)
    if not causal:
        return float(nq * nk), 0.0, float(nq), float(nk)
    o = k - q
    touched = (nq - 1) * nq // 2 + (nq - 1) * -(-o // tile) + nk
    full = nq * (nq - 1) // 2 + nq * ((o + 1) // tile)
    return float(touched), float(touched - full), float(nq), float(nk)


def tile_counts(q, k, causal, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`tiles` of many segments at once (arrays broadcast; float64) — the simulator's form."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    causal = np.asarray(causal, bool)
    q = np.where(causal, np.minimum(q, k), q)  # rows before the first key see nothing: no tiles
    nq, nk = np.ceil(q / tile), np.ceil(k / tile)
    o = k - q
    touched_c = (nq - 1) * nq / 2 + (nq - 1) * np.ceil(o / tile) + nk
    full_c = nq * (nq - 1) / 2 + nq * np.floor((o + 1) / tile)
    touched = np.where(causal, touched_c, nq * nk)
    diagonal = np.where(causal, touched_c - full_c, 0.0)
    empty = (q <= 0) | (k <= 0)
    zero = lambda x: np.where(empty, 0.0, x)  # noqa: E731
    return zero(touched), zero(diagonal), zero(nq), zero(nk)


def work(q, k, causal, tile: int, diag_extra: float, q_overhead: float, k_overhead: float) -> np.ndarray:
    """Cost of each segment in full-tile units (see the module doc)."""
    touched, diagonal, nq, nk = tile_counts(q, k, causal, tile)
    return touched + diag_extra * diagonal + q_overhead * nq + k_overhead * nk


def segment_cost(q: int, k: int, causal: bool, kernel: KernelCost) -> float:
    """Forward + backward work of one segment in pairs (a visible pair of a full tile costs 1)."""
    return _in_pairs(*tiles(q, k, causal, kernel.tile), kernel)


def segment_costs(q, k, causal, kernel: KernelCost) -> np.ndarray:
    """:func:`segment_cost` of many segments at once (arrays broadcast)."""
    return _in_pairs(*tile_counts(q, k, causal, kernel.tile), kernel)


def segment_parts(q: int, k: int, causal: bool, kernel: KernelCost) -> tuple[float, float]:
    """(forward, backward) work of one segment in pairs; they add up to :func:`segment_cost`."""
    touched, diag, nq, nk = tiles(q, k, causal, kernel.tile)
    w, t2 = kernel.bwd_weight, kernel.tile_work
    fwd = touched + kernel.fwd_diag * diag + kernel.fwd_q_tile * nq + kernel.fwd_k_tile * nk
    bwd = touched + kernel.bwd_diag * diag + kernel.bwd_q_tile * nq + kernel.bwd_k_tile * nk
    return fwd * t2, w * bwd * t2


def _in_pairs(touched, diag, nq, nk, kernel: KernelCost):
    ct, cd, cq, ck = kernel.coefficients
    return ct * touched + cd * diag + cq * nq + ck * nk


def seq_cost(runs: list[tuple[int, int]], kernel: KernelCost) -> float:
    """Work of one rank for one sequence it holds as the token ranges ``runs`` (``(start, end)``, any
    order): a causal segment over all held tokens plus, per run, its queries against the earlier tokens
    held elsewhere. With :data:`PAIRS` this is exactly the runs' causal pairs."""
    if len(runs) == 1:  # the common case, kept cheap: the planner calls this per piece placed
        return one_run_cost(*runs[0], kernel)
    merged: list[list[int]] = []
    for a, b in sorted(runs):  # touching runs are one run (one remote segment)
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    held = 0
    total = 0.0
    for a, b in merged:
        if a > held:
            total += segment_cost(b - a, a - held, False, kernel)
        held += b - a
    return total + segment_cost(held, held, True, kernel)


def one_run_cost(a, b, kernel: KernelCost):
    """:func:`seq_cost` of one held run ``[a, b)`` in closed form (inlined tiles). Also of many runs at once:
    int64 arrays ``a > 0``, ``b`` give a float64 array of the same values."""
    t = kernel.tile
    ct, cd, cq, ck = kernel.coefficients
    nq = -(-(b - a) // t)
    diag = nq if t > 1 else 0  # causal square: one masked tile per query tile
    local = ct * (nq * (nq - 1) // 2 + nq) + cd * diag + (cq + ck) * nq
    if not isinstance(a, np.ndarray) and a == 0:
        return local
    nk = -(-a // t)
    return local + ct * nq * nk + cq * nq + ck * nk


def run_cost(a: int, b: int, kernel: KernelCost) -> float:
    """Work of the fused segment of a held run ``[a, b)``: its queries against all keys ``[0, b)``, causal
    (bottom-right), in pairs — ``segment_cost(b - a, b, True, kernel)`` in closed form (the planner's hot
    path). With :data:`PAIRS` it is the run's causal pairs. Also of many runs at once: ``a``, ``b`` int64
    arrays give a float64 array of the same values."""
    t = kernel.tile
    ct, cd, cq, ck = kernel.coefficients
    nq, nk = -(-(b - a) // t), -(-b // t)
    touched = (nq - 1) * nq // 2 + (nq - 1) * -(-a // t) + nk
    full = nq * (nq - 1) // 2 + nq * ((a + 1) // t)
    return ct * touched + cd * (touched - full) + cq * nq + ck * nk


@functools.lru_cache(maxsize=1 << 16)
def window_tiles(q: int, k: int, window: int, tile: int) -> tuple[float, float, float, float]:
    """:func:`tiles` of a causal (bottom-right) segment under a sliding window of ``window`` keys: query
    ``i`` sees keys ``i + k - q - window < j <= i + k - q``. Counted per query tile (numpy), so a long
    segment under a small window costs about ``q × window`` pairs, not ``q²``."""
    q = min(q, k)
    if q <= 0 or k <= 0:
        return 0.0, 0.0, 0.0, 0.0
    off = k - q
    r0 = np.arange(0, q, tile, dtype=np.int64)
    r1 = np.minimum(r0 + tile, q)  # rows [r0, r1) of each query tile
    lo = np.maximum(0, r0 + off - window + 1) // tile
    hi = np.minimum(k - 1, r1 - 1 + off) // tile
    full_lo = -(-(r1 - 1 + off - window + 1).clip(min=0) // tile)
    full_hi = (r0 + off + 1) // tile - 1
    touched = (hi - lo + 1).sum()
    full = np.maximum(0, np.minimum(full_hi, hi) - np.maximum(full_lo, lo) + 1).sum()
    return float(touched), float(touched - full), float(len(r0)), float(hi.max() - lo.min() + 1)


def run_cost_window(a: int, b: int, window: int | None, kernel: KernelCost) -> float:
    """Work of the fused segment of the held run ``[a, b)`` for a layer with a sliding ``window`` (None:
    full causal attention, :func:`run_cost`): its queries against keys ``[max(0, a - window + 1), b)``."""
    if window is None or window >= b:
        return run_cost(a, b, kernel)
    k0 = max(0, a - window + 1)
    return _in_pairs(*window_tiles(b - a, b - k0, window, kernel.tile), kernel)


def layered_run_cost(a: int, b: int, layers, kernel: KernelCost) -> float:
    """Work of the fused run ``[a, b)`` in an average layer of the model's ``layers`` (``((window or None,
    count), ...)``): :func:`run_cost_window` per kind, weighted by its number of layers."""
    if len(layers) == 1:
        return run_cost_window(a, b, layers[0][0], kernel)
    return sum(n * run_cost_window(a, b, w, kernel) for w, n in layers) / sum(n for _, n in layers)


def has_windows(layers) -> bool:
    """Whether the model's ``layers`` include a sliding window."""
    return any(w is not None for w, _ in layers)


def rank_work(spans, kernel: KernelCost, fused=frozenset(), layers=((None, 1),)) -> float:
    """Work of one rank holding ``spans`` (``(seq, start, end)`` triples) in an average attention layer of
    the model's ``layers`` (``((window or None, count), ...)``, ``PlanSettings.attention_layers``): under
    full attention :func:`run_cost` per run of the sequences in ``fused`` and :func:`seq_cost` for the
    others (executed split); under a sliding window every run fused, :func:`run_cost_window`."""
    by_seq: dict[int, list[tuple[int, int]]] = {}
    for s, a, b in spans:
        by_seq.setdefault(s, []).append((a, b))
    total = 0.0
    for window, count in layers:
        if window is None:
            total += count * sum(sum(run_cost(a, b, kernel) for a, b in touching_runs(runs)) if s in fused
                                 else seq_cost(runs, kernel) for s, runs in by_seq.items())
        else:
            total += count * sum(run_cost_window(a, b, window, kernel) for runs in by_seq.values()
                                 for a, b in touching_runs(runs))
    return total / sum(count for _, count in layers)


def touching_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs in position order with touching ones merged (the rank views run them as one)."""
    out: list[list[int]] = []
    for a, b in sorted(runs):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def load_kernel_cost(path: str) -> KernelCost:
    """The :class:`KernelCost` of a calibration file written by ``benchmarks/calibrate_attention.py``
    (a cluster JSON: ``tile``, the six overheads, ``eff_fwd`` and ``eff_bwd``)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as e:
        raise ValueError(f"kernel_cost: cannot read calibration file {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"kernel_cost: {path!r} is not JSON ({e.msg} at line {e.lineno})") from None
    need = ("tile", *OVERHEADS, "eff_fwd", "eff_bwd")
    missing = [k for k in need if not isinstance(data.get(k) if isinstance(data, dict) else None, (int, float))]
    if missing:
        raise ValueError(f"kernel_cost: {path!r} lacks numeric field(s) {missing}; expected a file written by "
                         f"benchmarks/calibrate_attention.py")
    if data["tile"] < 1 or data["eff_fwd"] <= 0 or data["eff_bwd"] <= 0 or min(data[k] for k in OVERHEADS) < 0:
        raise ValueError(f"kernel_cost: {path!r} needs tile >= 1, positive efficiencies and overheads >= 0")
    return KernelCost.of_kernel(data["tile"], data["eff_fwd"], data["eff_bwd"], **{k: data[k] for k in OVERHEADS})


def kernel_for(balance: str, kernel_cost: KernelCost | None = None) -> KernelCost:
    """The cost model of the ``balance`` and ``kernel_cost`` planner options."""
    if balance == "pairs":
        return PAIRS
    return FLASH if kernel_cost is None else kernel_cost

