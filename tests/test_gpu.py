"""The CUDA paths (marked ``gpu``; skipped without CUDA): each CUDA kernel backend against the float64
reference, fcp_attention on a GPU at world size 1, and a real transformers model with
attn_implementation="fcp" on a GPU against sdpa (forward and backward, bf16).

Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``; results are in the README.
"""

from __future__ import annotations

import pytest
import torch

from hf_fcp import plan_batch
from hf_fcp.engine import kernels, kernels_cuda
from hf_fcp.engine.attention import fcp_attention
from hf_fcp.engine.kernels import varlen_backward, varlen_forward
from hf_fcp.testing import packed_causal_reference, random_qkv
from hf_fcp.testing.cases import run_local
from hf_fcp.testing.reference import segment_inputs, segment_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (q_len, k_len): 1 query vs long keys, more queries than keys, tile remainders, lengths > one 128 tile
RECT = [(1, 300), (5, 5), (7, 3), (129, 129), (64, 700), (300, 200), (1, 1), (257, 1000)]
BACKENDS = ["flash_attn", "torch_cuda"]


def _needs(backend: str) -> None:
    if backend not in kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available on this machine")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude; non-finite values fail."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "non-finite values where the reference has none (or v.v.)"
    return ((got - want)[fin].abs().max() / want[fin].abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 128), (8, 1, 64)])
def test_cuda_backend_matches_reference(backend, causal, hq, hkv, d):
    _needs(backend)
    q, k, v, dout, cu_q, cu_k = segment_inputs(RECT, hq, hkv, d=d, dtype=torch.bfloat16, device="cuda", seed=d)
    scale = d ** -0.5
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=causal, scale=scale, backend=backend)
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, scale=scale, backend=backend)
    want = segment_reference(q, k, v, dout, cu_q, cu_k, causal, scale)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert _rel(g, w) < 3e-2, name
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == q.shape[:2]


def test_default_cuda_backend_is_a_flash_kernel():
    assert kernels.select_backend("cuda", torch.bfloat16) in BACKENDS
    assert kernels.select_backend("cuda", torch.float32) == "naive"
    if not kernels_cuda.flash_attn_available():
        assert kernels.select_backend("cuda", torch.bfloat16) == "torch_cuda"


@pytest.mark.parametrize("block", [16, 128])
def test_fcp_attention_world1_on_cuda(block):
    lens = [1, 7, 333, 2, 640, 1, 190]
    q, k, v, dout = random_qkv(lens, 8, 2, d=64, seed=block)
    ref = packed_causal_reference(q, k, v, lens, dout)
    view = plan_batch(lens, world_size=1, block_size=block).for_rank(0)
    got = run_local(fcp_attention, view, *(t.cuda() for t in (q, k, v, dout)), torch.bfloat16)
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert _rel(g, r) < 3e-2, name


def test_llama_fcp_matches_sdpa_on_cuda():
    from hf_fcp.integrations.collator import FCPCollator
    from hf_fcp.testing.helpers import assert_close, examples, make_model
    from hf_fcp.testing.models import grads

    batch = FCPCollator(world_size=1, rank=0, block_size=16)(examples())
    plan = batch.pop("fcp_plan")
    batch = {k: v.cuda() for k, v in batch.items()}
    results = []
    for impl, extra in (("sdpa", {}), ("fcp", {"fcp_plan": plan})):
        model = make_model("llama", impl).cuda().to(torch.bfloat16)
        loss = model(**batch, **extra, use_cache=False).loss
        loss.backward()
        results.append((loss.detach().float(), {n: g.float() for n, g in grads(model).items()}))
    (l_ref, g_ref), (l_fcp, g_fcp) = results
    assert torch.isfinite(l_fcp) and abs(l_fcp - l_ref).item() < 2e-2 * abs(l_ref).item()
    for name in g_ref:
        assert_close(g_fcp[name], g_ref[name], 6e-2, name)
