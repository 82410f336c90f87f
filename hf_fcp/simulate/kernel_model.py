"""Fitting the tile model of :mod:`hf_fcp.plan.cost` to timed kernel calls (``benchmarks/calibrate_attention.py``).

A call's seconds are modelled as ``launch + s × Σ work`` over its segments, with ``work`` in full tiles
(tiles touched + ``diag_extra`` × diagonal tiles + ``q_overhead`` × query tiles + ``k_overhead`` × key
tiles); ``s`` gives the full-tile efficiency ``eff`` = tile FLOPs / (s × peak)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..plan.cost import tile_counts


def features(calls: Sequence[dict], tile: int) -> np.ndarray:
    """(n_calls, 5) design matrix of timed calls: [touched, diagonal, query tiles, key tiles, 1 launch].

    Each call is ``{"q": [...], "k": [...], "causal": bool, ...}``: the segments of one kernel launch."""
    rows = []
    for c in calls:
        t, d, nq, nk = tile_counts(c["q"], c["k"], c["causal"], tile)
        rows.append([t.sum(), d.sum(), nq.sum(), nk.sum(), 1.0])
    return np.asarray(rows, np.float64)


def fit(calls: Sequence[dict], seconds: Sequence[float], tile: int, tile_flops: float, peak: float) -> dict:
    """Fit ``seconds ≈ launch + s · work`` (relative least squares, every coefficient ≥ 0).

    ``tile_flops``: FLOPs of one full tile in the pass timed (``tile² × flops per pair``). Returns
    ``{"eff", "diag_extra", "q_overhead", "k_overhead", "launch_s", "rms_rel_error"}``."""
    x = features(calls, tile)
    y = np.asarray(seconds, np.float64)
    if len(y) != len(x) or len(y) < 5 or (y <= 0).any():
        raise ValueError(f"need >= 5 timed calls with positive seconds, got {len(y)} calls for {len(x)} segment lists")
    from scipy.optimize import (
        nnls,  # offline calibration only: pip install 'hf-fcp[calibrate]'
    )

    coef = nnls(x / y[:, None], np.ones(len(y)))[0]
    if coef[0] <= 0:
        raise ValueError("fit found no cost per tile: the timed calls do not grow with their work")
    pred = x @ coef
    s = coef[0]
    return {"eff": float(tile_flops / (s * peak)), "diag_extra": float(coef[1] / s), "q_overhead": float(coef[2] / s),
            "k_overhead": float(coef[3] / s), "launch_s": float(coef[4]),
            "rms_rel_error": float(np.sqrt(np.mean((pred / y - 1) ** 2)))}
