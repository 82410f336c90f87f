"""Multi-process exactness harness of the attention engine: a layout (:class:`AttentionCase`) runs through
:func:`hf_fcp.fcp_attention` (or the ring-attention baseline) on every rank of a spawned gloo group, and
the gathered forward output, LSE and dq/dk/dv are compared with the float64 single-process reference,
and the bytes that moved with the plan's prediction. Used by the distributed tests and the fuzz suite::

    per_rank = run_workers(run_cases, world, cases)            # worker side: one spawn, every case
    errors = compare_to_reference(case, world, [per_rank[r][i] for r in range(world)])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import plan_batch
from .reference import packed_causal_reference, random_qkv

WIRE = {torch.float32: "fp32", torch.bfloat16: "bf16"}
TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}  # max error relative to max(1, max |reference|)


@dataclass(frozen=True)
class AttentionCase:
    """One layout: a global batch of ``lens`` planned over the group, with the attention settings."""

    name: str
    lens: tuple[int, ...]
    block: int
    strategy: str = "fcp"
    rounds_per_stage: int = 1
    heads: tuple[int, int] = (8, 2)
    """(Hq, Hkv)."""
    dtype: torch.dtype = torch.float32
    op: str = "fcp"
    """``fcp``: :func:`hf_fcp.fcp_attention`; ``ring``: the ring-attention baseline."""
    layers: int = 1
    """> 1: chained calls on the same view (out is the next q), one backward through all."""
    local: bool = False
    """Every rank runs the whole batch with a world-size-1 view inside the group."""
    seed: int = 0
    prefetch: int | None = None
    """fcp_attention's forward stages in flight (None: all)."""
    fusion: str = "auto"
    """``PlanSettings.fusion``: run sequences fused, split or as the plan decides."""
    overlap: str = "auto"
    """``PlanSettings.overlap``: compute while K/V arrive, after, or as the plan decides."""
    window: int | None = None
    """Sliding window of every call (the plan is made for full and this window's layers)."""
    softcap: float | None = None
    """Logit soft-capping of every call."""
    sinks: bool = False
    """Every call adds seeded per-head sink logits (their gradient is compared too)."""
    node_size: int | None = None
    """Ranks per node, the exchange relayed (:mod:`hf_fcp.plan.relay`) where a piece goes to two ranks of
    another node. None: the default settings."""


def case_sinks(case: AttentionCase) -> torch.Tensor | None:
    """The case's float64 (Hq,) sink logits (the same on every rank), or None."""
    if not case.sinks:
        return None
    return torch.randn(case.heads[0], generator=torch.Generator().manual_seed(case.seed + 7), dtype=torch.float64)


def plan_for(case: AttentionCase, world: int):
    """The plan every rank of a ``world``-rank group uses for ``case`` (head dim 16)."""
    layers = ((None, 1),) if case.window is None else ((None, 1), (case.window, 1))
    nodes = {} if case.node_size is None else {"node_size": case.node_size, "relay": "always"}
    return plan_batch(case.lens, world_size=1 if case.local else world, block_size=case.block, strategy=case.strategy,
                      rounds_per_stage=case.rounds_per_stage, kv_heads=case.heads[1], head_dim=16,
                      kv_dtype=WIRE[case.dtype], fusion=case.fusion, overlap=case.overlap, attention_layers=layers,
                      **nodes)


def _op(name: str):
    from ..baselines import ring_attention
    from ..engine.attention import fcp_attention

    return {"fcp": fcp_attention, "ring": ring_attention}[name]


def run_case(rank: int, world: int, case: AttentionCase) -> dict:
    """Worker side: this rank's local rows of out, lse and dq/dk/dv (float64), its token index and the bytes
    it sent per kind of traffic."""
    from ..engine import comm

    view = plan_for(case, world).for_rank(0 if case.local else rank)
    q, k, v, dout = random_qkv(case.lens, *case.heads, seed=case.seed)
    idx = view.token_index
    xs = [t[idx].to(case.dtype).requires_grad_() for t in (q, k, v)]
    sinks = case_sinks(case)
    sinks = None if sinks is None else sinks.float().requires_grad_()
    kw = {"prefetch": case.prefetch, "window": case.window, "softcap": case.softcap, "sinks": sinks} \
        if case.op == "fcp" else {}
    with comm.track_comm() as counter:
        out = xs[0]
        for _ in range(case.layers):
            out, lse = _op(case.op)(out, xs[1], xs[2], view, return_lse=True, **kw)
        (out.float() * dout[idx].float()).sum().backward()
    return {"index": idx, "out": out.detach().double(), "lse": lse.double(),
            "grads": [x.grad.double() for x in xs], "bytes": dict(counter.by_tag),
            "recv_bytes": counter.recv_bytes, "dtype_ok": out.dtype == case.dtype,
            "dsinks": None if sinks is None else sinks.grad.double()}


def run_cases(rank: int, world: int, cases: list[AttentionCase]) -> list[dict]:
    """Worker side: :func:`run_case` for every case, in order (one spawn serves them all)."""
    return [run_case(rank, world, c) for c in cases]


def gather(parts: list[dict], n: int, key: str, i: int | None = None) -> torch.Tensor:
    """Scatter each rank's local rows of ``parts[r][key]`` (``[i]`` of a list) into global batch order;
    asserts that the ranks' token indices cover every token exactly once."""
    first = parts[0][key] if i is None else parts[0][key][i]
    full = torch.full((n, *first.shape[1:]), float("nan"), dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.int64)
    for p in parts:
        full[p["index"]] = p[key] if i is None else p[key][i]
        seen[p["index"]] += 1
    assert torch.equal(seen, torch.ones(n, dtype=torch.int64)), "token_index does not cover the batch once"
    return full


def compare_to_reference(case: AttentionCase, parts: list[dict], tol: float | None = None) -> list[str]:
    """What differs between one case's per-rank results and the float64 reference (empty: all match).
    ``tol`` defaults to :data:`TOL` of the case's dtype (the LSE is compared to at least 2e-6)."""
    tol = TOL[case.dtype] if tol is None else tol
    n = sum(case.lens)
    q, k, v, dout = random_qkv(case.lens, *case.heads, seed=case.seed)
    sinks = case_sinks(case)
    ref = packed_causal_reference(q, k, v, case.lens, dout, layers=case.layers, window=case.window,
                                  softcap=case.softcap, sinks=None if sinks is None else sinks.float())
    got = [gather(parts, n, "out"), gather(parts, n, "lse")] + [gather(parts, n, "grads", i) for i in range(3)]
    if sinks is not None:  # each rank's share of d sinks: its queries' terms
        got.append(sum(p["dsinks"] for p in parts))
    errors = [] if all(p["dtype_ok"] for p in parts) else [f"output dtype is not {case.dtype}"]
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, ref):
        limit = max(tol, 2e-6) if name == "lse" else tol
        err = ((g - r).abs().max() / r.abs().max().clamp(min=1.0)).item()
        if not err <= limit:  # also catches NaN
            errors.append(f"{name}: relative error {err:.2e} > {limit:.0e}")
    return errors


def run_local(op, view, q, k, v, dout, dtype, **kw):
    """Run ``op`` (e.g. :func:`hf_fcp.fcp_attention`) on this view's rows of the global q/k/v (cast to
    ``dtype``), backward with ``dout``; returns float64 out, lse, dq, dk, dv of the local rows."""
    idx = view.token_index
    xs = [t[idx].to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = op(*xs, view, return_lse=True, **kw)
    (out.float() * dout[idx].float()).sum().backward()
    assert out.dtype == dtype and out.shape == xs[0].shape
    return [t.detach().double() for t in (out, lse, *(x.grad for x in xs))]
