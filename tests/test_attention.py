"""fcp_attention in one process (world size 1, no process group) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hf_fcp import plan_batch
from hf_fcp.baselines import ring_attention
from hf_fcp.engine.attention import fcp_attention
from hf_fcp.testing import packed_causal_reference, random_qkv
from hf_fcp.testing.cases import run_local

LENS = [1, 7, 33, 2, 64, 1, 19]


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float64: 1e-6}  # float64: limited by the float32 lse


def assert_max_close(got, want, dtype, what):
    """Max abs error relative to the reference's scale (lse is always float32)."""
    tol = max(TOL[dtype], 2e-6) if what.endswith("lse") else TOL[dtype]
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block", [4, 16, 4096])
def test_world1_matches_reference(dtype, heads, block):
    assert not dist.is_initialized()
    q, k, v, dout = random_qkv(LENS, *heads)
    ref = packed_causal_reference(q, k, v, LENS, dout)
    view = plan_batch(LENS, world_size=1, block_size=block).for_rank(0)
    got = run_local(fcp_attention, view, q, k, v, dout, dtype)
    lse_ok = torch.isfinite(got[1]).all()
    assert lse_ok
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_max_close(g, r, dtype, name)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "packing"])
def test_world1_other_placements_and_ring_baseline(strategy):
    q, k, v, dout = random_qkv(LENS, 8, 2, seed=1)
    ref = packed_causal_reference(q, k, v, LENS, dout, scale=0.3)
    view = plan_batch(LENS, world_size=1, block_size=8, strategy=strategy).for_rank(0)
    ops = [fcp_attention] + ([ring_attention] if strategy == "ring" else [])
    for op in ops:
        got = run_local(op, view, q, k, v, dout, torch.float32, scale=0.3)
        for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
            assert_max_close(g, r, torch.float32, f"{op.__name__} {name}")


def test_default_scale_and_plain_output():
    q, k, v, _ = random_qkv([5, 3], 2, 1)
    view = plan_batch([5, 3], world_size=1).for_rank(0)
    out = fcp_attention(q.float(), k.float(), v.float(), view)
    explicit = fcp_attention(q.float(), k.float(), v.float(), view, scale=16 ** -0.5)
    assert isinstance(out, torch.Tensor) and torch.equal(out, explicit)
    assert torch.allclose(out[0], v[0].float().repeat_interleave(2, 0))  # first token sees only itself


def _args(n=8, hq=4, hkv=2, d=16, dtype=torch.float32):
    return [torch.randn(n, h, d, dtype=dtype) for h in (hq, hkv, hkv)]


BAD = [
    ("q", lambda q, k, v, vw: (q[:-1], k[:-1], v[:-1], vw), "q: got 7 rows, expected view.num_local=8"),
    ("v shape", lambda q, k, v, vw: (q, k, v[:, :1], vw), "v: got shape"),
    ("k rows", lambda q, k, v, vw: (q, k[:-1], v[:-1], vw), "k: got shape (7, 2, 16)"),
    ("heads", lambda q, k, v, vw: (q[:, :3], k, v, vw), "expected a divisor of q's 3 heads"),
    ("dtype", lambda q, k, v, vw: (q, k.double(), v.double(), vw), "k: got torch.float64"),
    ("ndim", lambda q, k, v, vw: (q[0], k, v, vw), "q: got torch.float32 tensor of shape (4, 16)"),
    ("int", lambda q, k, v, vw: (q.long(), k, v, vw), "expected a floating (n_local, heads, head_dim)"),
    ("view type", lambda q, k, v, vw: (q, k, v, object()), "view: got object, expected a RankView"),
]


@pytest.mark.parametrize("name,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_value_error(name, mutate, message):
    view = plan_batch([5, 3], world_size=1).for_rank(0)
    for op in (fcp_attention, ring_attention):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            op(*mutate(*_args(), view))


def test_bad_scale_and_world_size_raise():
    q, k, v = _args()
    view = plan_batch([5, 3], world_size=1).for_rank(0)
    for scale in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="scale: got"):
            fcp_attention(q, k, v, view, scale=scale)
    for prefetch in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"prefetch: got .*expected an integer >= 1 or None"):
            fcp_attention(q, k, v, view, prefetch=prefetch)
    view2 = plan_batch([5, 3], world_size=2).for_rank(1)
    q2, k2, v2 = _args(n=view2.num_local)
    with pytest.raises(ValueError, match="view for world_size=2, expected a process group"):
        fcp_attention(q2, k2, v2, view2)


def test_ring_baseline_rejects_non_ring_view():
    view = plan_batch([40, 3], world_size=1, block_size=8, strategy="fcp").for_rank(0)
    ring_view = plan_batch([40, 3], world_size=1, strategy="ring").for_rank(0)
    assert view.spans.tolist() != ring_view.spans.tolist()
    with pytest.raises(ValueError, match="expected the zigzag spans"):
        ring_attention(*_args(n=43), view)


def test_unsupported_backend_raises():
    q, k, v = _args()
    view = plan_batch([5, 3], world_size=1).for_rank(0)
    with pytest.raises(ValueError, match="backend"):
        fcp_attention(q, k, v, view, backend="bogus")
