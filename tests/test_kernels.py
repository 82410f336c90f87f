"""Block attention kernels (hf_fcp.engine.kernels) against a float64 dense per-segment reference."""

from __future__ import annotations

import math

import pytest
import torch

from hf_fcp.engine import kernels, kernels_cpu, kernels_cuda
from hf_fcp.engine.kernels import (
    merge_partial,
    select_backend,
    varlen_backward,
    varlen_forward,
)
from hf_fcp.testing.reference import offsets, segment_inputs, segment_reference

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_flash = pytest.mark.skipif(not CUDA or kernels_cuda._flash_module() is None,
                                 reason="needs CUDA and flash-attn >= 2.6 / FA3")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# (q_len, k_len) per segment: q_len 1, k_len >> q_len, q_len > k_len, equal, empty on either side
LAYOUT = [(1, 37), (5, 5), (7, 3), (0, 4), (3, 0), (16, 64), (0, 0), (9, 9), (1, 1), (4, 2)]
HEADS = [(4, 4), (8, 2), (8, 1)]  # (Hq, Hkv): MHA, GQA 4:1, MQA 8:1


def assert_elementwise_close(got, want, tol, name):
    got = got.detach().cpu().double()
    assert not got.isnan().any(), f"{name} has NaN"
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def check_against_reference(layout, hq, hkv, causal, backend, dtype=torch.float32, tol=1e-5, cu_dtype=None,
                            head_major=False, **options):
    q, k, v, dout, cu_q, cu_k = segment_inputs(layout, hq, hkv, dtype=dtype)
    if head_major:  # non-contiguous inputs: (H, N, D) memory seen as (N, H, D)
        q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
    if cu_dtype is not None:
        cu_q, cu_k = cu_q.to(cu_dtype), cu_k.to(cu_dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=causal, scale=scale, backend=backend, **options)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, scale=scale, backend=backend,
                            **options)
    want = segment_reference(q, k, v, dout, cu_q, cu_k, causal, scale, **options)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert_elementwise_close(g, w, tol, name)
    for g, t in zip(grads, (q, k, v)):
        assert g.dtype == t.dtype and g.shape == t.shape


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_fp32_matches_reference(backend, causal, hq, hkv):
    check_against_reference(LAYOUT, hq, hkv, causal, backend)


WINDOW_LAYOUT = [(1, 37), (5, 5), (16, 64), (9, 9), (40, 40), (3, 90), (70, 75), (1, 1), (4, 2)]


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
@pytest.mark.parametrize("window", [1, 3, 8, 33, 200])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_sliding_window_matches_reference(backend, window, hq, hkv):
    """Bottom-right causal with a window of ``window`` keys (itself included), on square and rectangular
    segments, windows shorter and longer than the segments."""
    check_against_reference(WINDOW_LAYOUT, hq, hkv, True, backend, window=window)


def test_windowed_cpu_blocks_stay_bounded(monkeypatch):
    """A long segment under a small window runs in query chunks whose masks stay small (and exact)."""
    from hf_fcp.engine import kernels_cpu

    monkeypatch.setattr(kernels_cpu, "_MASK_ELEMENTS", 64 * 40)
    shapes = []
    real = kernels_cpu._float_mask
    monkeypatch.setattr(kernels_cpu, "_float_mask", lambda *a: shapes.append(real(*a).shape) or real(*a))
    check_against_reference([(300, 320)], 4, 2, True, "torch_cpu", window=16)
    assert len(shapes) > 4 and max(s[-1] * s[-2] for s in shapes) <= 64 * 40


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("softcap", [0.5, 5.0])
def test_softcap_matches_reference_on_naive(causal, softcap):
    check_against_reference(LAYOUT, 8, 2, causal, "naive", softcap=softcap, tol=2e-5)
    check_against_reference(WINDOW_LAYOUT, 8, 2, True, "naive", softcap=softcap, window=5, tol=2e-5)


def test_softcap_picks_a_kernel_that_computes_it_or_names_one():
    assert select_backend("cpu", torch.float32, softcap=30.0) == "naive"
    with pytest.raises(ValueError, match="softcap: got 30.0 with kernel 'torch_cpu'.*'naive' on CPU"):
        select_backend("cpu", torch.float32, "torch_cpu", softcap=30.0)


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
@pytest.mark.parametrize("causal", [True, False])
def test_random_layouts(backend, causal):
    gen = torch.Generator().manual_seed(7)
    for trial in range(3):
        n = int(torch.randint(1, 6, (), generator=gen))
        layout = [tuple(int(x) for x in torch.randint(0, 20, (2,), generator=gen)) for _ in range(n)]
        check_against_reference(layout, 4, 2, causal, backend, cu_dtype=torch.int32 if trial else None,
                                head_major=trial == 2)


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
def test_low_precision(backend):
    check_against_reference(LAYOUT, 8, 2, True, backend, dtype=torch.bfloat16, tol=6e-2)
    check_against_reference(LAYOUT, 8, 2, True, backend, dtype=torch.float16, tol=1e-2)


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
def test_float64(backend):
    check_against_reference(LAYOUT, 8, 2, True, backend, dtype=torch.float64, tol=1e-6)


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
def test_batched_and_chunked_paths(backend, monkeypatch):
    """Many equal-shape segments (batched into one call) next to segments run one by one."""
    monkeypatch.setattr(kernels, "_GROUP_MAX_LEN", 6)
    monkeypatch.setattr(kernels, "_GROUP_MAX_TOKENS", 12)
    monkeypatch.setattr(kernels_cpu, "_NAIVE_MAX_SCORES", 64)
    layout = [(3, 5)] * 9 + [(1, 1)] * 5 + [(2, 2), (8, 9), (4, 2), (4, 2), (2, 2)]
    for causal in (True, False):
        check_against_reference(layout, 4, 1, causal, backend)


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
@pytest.mark.parametrize("layout", [[(5, 5)] * 4, [(3, 8)], [(6, 6)]])
def test_single_call_paths(backend, layout):
    """Layouts served by one kernel call that covers every row (outputs returned without copies)."""
    for causal in (True, False):
        check_against_reference(layout, 8, 2, causal, backend)
        check_against_reference(layout, 8, 2, causal, backend, head_major=True)


def test_empty_inputs():
    q, k, v, dout, cu_q, cu_k = segment_inputs([(0, 3), (0, 0)], 2, 1)
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=True, scale=0.5)
    assert out.shape == (0, 2, 16) and lse.shape == (0, 2)
    q, k, v, dout, cu_q, cu_k = segment_inputs([(3, 0), (2, 0)], 2, 1)
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=False, scale=0.5)
    assert (out == 0).all() and (lse == -math.inf).all()
    dq, dk, dv = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=False, scale=0.5)
    assert (dq == 0).all() and dk.shape == (0, 1, 16)


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_split_then_merge_is_exact(backend, dtype, tol):
    """Keys of each segment in two calls (non-causal prefix, causal diagonal), merged with merge_partial;
    backward per chunk with the merged out/lse, summed, equals the reference gradients."""
    lq, prefix = [6, 1, 4], [10, 3, 0]  # diagonal chunk: Lq x Lq causal; prefix chunk: unmasked
    layout = [(a, a + p) for a, p in zip(lq, prefix)]
    q, k, v, dout, cu_q, cu_k = segment_inputs(layout, 8, 2, dtype=dtype)
    scale = 0.3
    pre_rows = torch.cat([torch.arange(cu_k[i], cu_k[i] + p) for i, p in enumerate(prefix)])
    diag_rows = torch.cat([torch.arange(cu_k[i] + p, cu_k[i + 1]) for i, p in enumerate(prefix)])
    chunks = [(pre_rows, offsets(prefix), False), (diag_rows, offsets(lq), True)]
    out_acc = torch.zeros(q.shape, dtype=torch.float32)
    lse_acc = torch.full(q.shape[:2], -math.inf)
    rows = torch.arange(q.shape[0])
    for krows, cu_c, causal in chunks:
        o, l = varlen_forward(q, k[krows], v[krows], cu_q, cu_c, causal=causal, scale=scale, backend=backend)
        merge_partial(out_acc, lse_acc, rows, o, l)
    dq = torch.zeros(q.shape, dtype=torch.float64)
    dk, dv = torch.zeros(k.shape, dtype=torch.float64), torch.zeros(v.shape, dtype=torch.float64)
    for krows, cu_c, causal in chunks:
        gq, gk, gv = varlen_backward(dout, q, k[krows], v[krows], out_acc, lse_acc, cu_q, cu_c,
                                     causal=causal, scale=scale, backend=backend)
        dq += gq.double()
        dk[krows] += gk.double()
        dv[krows] += gv.double()
    want = segment_reference(q, k, v, dout, cu_q, cu_k, True, scale)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out_acc, lse_acc, dq, dk, dv), want):
        assert_elementwise_close(g, w, tol, name)


@pytest.mark.parametrize("backend", ["torch_cpu", "naive"])
def test_backward_rows_with_infinite_lse_get_zero_grads(backend):
    """A row whose (merged) lse is -inf contributes nothing, even where this call has visible keys."""
    q, k, v, dout, cu_q, cu_k = segment_inputs([(4, 6), (3, 3)], 4, 2)
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=True, scale=0.5, backend=backend)
    dead = torch.tensor([1, 5])
    out[dead], lse[dead] = 0.0, -math.inf
    call = dict(causal=True, scale=0.5, backend=backend)
    dq, dk, dv = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **call)
    assert not any(g.isnan().any() for g in (dq, dk, dv))
    assert (dq[dead] == 0).all()
    live = torch.ones(q.shape[0], dtype=torch.bool)
    live[dead] = False
    dout2, lse2 = dout * live[:, None, None], lse.masked_fill(~live[:, None], 9.0)
    _, dk2, dv2 = varlen_backward(dout2, q, k, v, out, lse2, cu_q, cu_k, **call)
    torch.testing.assert_close(dk, dk2)
    torch.testing.assert_close(dv, dv2)


def test_merge_partial_handles_empty_rows():
    inf = math.inf
    out_acc = torch.zeros(5, 2, 3)
    out_acc[1], out_acc[3] = 1.0, 2.0
    lse_acc = torch.tensor([[-inf, -inf], [0.5, -inf], [-inf, 1.0], [2.0, 3.0], [7.0, 7.0]])
    before = out_acc.clone(), lse_acc.clone()
    rows = torch.tensor([3, 0, 1, 2])
    part = torch.full((4, 2, 3), 4.0)
    part[1] = 0.0
    lse_part = torch.tensor([[2.0, -inf], [-inf, -inf], [-inf, 0.2], [1.0, 1.0]])
    merge_partial(out_acc, lse_acc, rows, part, lse_part)
    assert not out_acc.isnan().any() and not lse_acc.isnan().any()
    assert (lse_acc[0] == -inf).all() and (out_acc[0] == 0).all()  # -inf on both sides stays empty
    assert torch.equal(lse_acc[4], before[1][4]) and torch.equal(out_acc[4], before[0][4])  # untouched
    want_lse = torch.logaddexp(before[1][rows], lse_part)
    torch.testing.assert_close(lse_acc[rows], want_lse)
    w_acc = (before[1][rows] - want_lse).exp().nan_to_num(0.0).unsqueeze(-1)
    w_part = (lse_part - want_lse).exp().nan_to_num(0.0).unsqueeze(-1)
    torch.testing.assert_close(out_acc[rows], (before[0][rows] * w_acc + part * w_part).nan_to_num(0.0))
    merge_partial(out_acc, lse_acc, None, torch.zeros(5, 2, 3), torch.full((5, 2), -inf))  # all rows
    torch.testing.assert_close(lse_acc[rows], want_lse)


def test_select_backend_defaults():
    assert select_backend("cpu", torch.float32) == "torch_cpu"
    assert select_backend("cpu", torch.bfloat16) == "torch_cpu"
    assert select_backend(torch.device("cpu"), torch.float64, "naive") == "naive"
    if not CUDA:  # no GPU: only the naive backend can serve a CUDA device (test_gpu.py covers the GPU case)
        assert select_backend("cuda", torch.bfloat16) == "naive"
        assert kernels.available_backends("cuda") == ["naive"]
        with pytest.raises(ValueError, match="backend 'torch_cuda': got device cpu, expected a cuda device"):
            select_backend("cpu", torch.bfloat16, "torch_cuda")
    assert kernels.available_backends("cpu") == ["torch_cpu", "naive"]


def test_error_messages():
    q, k, v, dout, cu_q, cu_k = segment_inputs([(3, 4), (2, 2)], 4, 2)
    call = dict(causal=True, scale=0.5)
    with pytest.raises(ValueError, match="backend.*'bogus'.*torch_cpu"):
        varlen_forward(q, k, v, cu_q, cu_k, backend="bogus", **call)
    if kernels_cuda._flash_module() is None:
        with pytest.raises(ImportError, match=r"pip install 'hf-fcp\[flash\]'.*torch_cpu"):
            select_backend("cuda", torch.bfloat16, "flash_attn")
    with pytest.raises(ValueError, match="torch_cpu.*device cuda"):
        select_backend("cuda", torch.float32, "torch_cpu")
    with pytest.raises(ValueError, match="k: got 3 heads.*4 heads of q"):
        varlen_forward(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu_q, cu_k, **call)
    with pytest.raises(ValueError, match="cu_k: got first/last offsets"):
        varlen_forward(q, k, v, cu_q, torch.tensor([0, 4, 7]), **call)
    with pytest.raises(ValueError, match="cu_k: got 2 offsets, expected 3"):
        varlen_forward(q, k[:4], v[:4], cu_q, torch.tensor([0, 4]), **call)
    with pytest.raises(ValueError, match="cu_q: got torch.float32"):
        varlen_forward(q, k, v, cu_q.float(), cu_k, **call)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_forward(q, k, v, torch.tensor([0, 6, 5]), cu_k, **call)
    with pytest.raises(ValueError, match="v: got torch.float64 on cpu, expected torch.float32"):
        varlen_forward(q, k, v.double(), cu_q, cu_k, **call)
    with pytest.raises(ValueError, match=r"v: got shape \(6, 2, 8\)"):
        varlen_forward(q, k, v[..., :8], cu_q, cu_k, **call)
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, **call)
    with pytest.raises(ValueError, match=r"lse: got \(5, 3\)"):
        varlen_backward(dout, q, k, v, out, lse[:, :3], cu_q, cu_k, **call)
    with pytest.raises(ValueError, match=r"out_part: got \(2, 4, 16\), expected .*\(3, 4, 16\)"):
        merge_partial(out.float(), lse, torch.tensor([0, 1, 2]), out[:2], lse[:3])
    with pytest.raises(ValueError, match="rows: got torch.float32"):
        merge_partial(out.float(), lse, torch.tensor([0.0, 1.0]), out[:2], lse[:2])


# ----------------------------------------------------------------------------- flash-attn adapter on CPU
# Fakes with the signatures of FA 2.6 / 2.7 / FA3, computing with the naive backend in FA's conventions
# (LSE (H, Nq), +inf on rows without keys; backward fills dq/dk/dv in place), check the argument plumbing.
def _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=softmax_scale,
                              backend="naive")
    return out, lse.masked_fill(lse == -math.inf, math.inf).T.contiguous()


def _fake_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    assert softmax_lse.shape == (q.shape[1], q.shape[0]) and not (softmax_lse == -math.inf).any()
    grads = varlen_backward(dout, q, k, v, out, softmax_lse.T, cu_seqlens_q, cu_seqlens_k, causal=causal,
                            scale=softmax_scale, backend="naive")
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(g)


class FakeFA27:
    @staticmethod
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False,
                               block_table=None):
        assert dropout_p == 0.0 and return_attn_probs
        return (*_fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           causal), None)

    @staticmethod
    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                    window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                    rng_state=None):
        _fake_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                  causal)


class FakeFA26(FakeFA27):
    @staticmethod
    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                    softcap, alibi_slopes, deterministic, rng_state=None):
        _fake_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                  causal)


class FakeFA3:
    @staticmethod
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               seqused_q=None, seqused_k=None, softmax_scale=None, causal=False, qv=None,
                               window_size=(-1, -1),
                               num_splits=1, deterministic=False, sm_margin=0, return_attn_probs=False):
        return _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                         causal)

    @staticmethod
    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None,
                             sequed_q=None, sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None,
                             dk=None, dv=None, softmax_scale=None, is_causal=False, window_size_left=-1,
                             window_size_right=-1, softcap=0.0, deterministic=False, sm_margin=0):
        _fake_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                  is_causal)


@pytest.mark.parametrize("fake", [FakeFA26, FakeFA27, FakeFA3])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_adapter_with_fake_module(fake, causal, monkeypatch):
    monkeypatch.setattr(kernels_cuda, "_flash_module", lambda: fake)
    q, k, v, dout, cu_q, cu_k = segment_inputs(LAYOUT, 8, 2, d=16)
    offsets = kernels._offsets_of(q, k, v, cu_q, cu_k)
    out, lse = kernels_cuda.flash_forward(q, k, v, offsets, causal, 0.25)
    grads = kernels_cuda.flash_backward(dout, q, k, v, out, lse, offsets, causal, 0.25)
    want = segment_reference(q, k, v, dout, cu_q, cu_k, causal, 0.25)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert_elementwise_close(g, w, 1e-5, name)
    assert lse.shape == q.shape[:2] and lse.is_contiguous()


def test_flash_adapter_rejects_unknown_signature(monkeypatch):
    class Odd:
        @staticmethod
        def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mystery):
            raise AssertionError("must not be called")

    monkeypatch.setattr(kernels_cuda, "_flash_module", lambda: Odd)
    q, k, v, _, cu_q, cu_k = segment_inputs([(2, 2)], 2, 2, d=8)
    with pytest.raises(RuntimeError, match="unsupported flash-attn version.*mystery"):
        kernels_cuda.flash_forward(q, k, v, kernels._offsets_of(q, k, v, cu_q, cu_k), True, 0.5)


@gpu
@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_naive_on_cuda(causal):
    q, k, v, dout, cu_q, cu_k = segment_inputs(LAYOUT, 8, 2, device="cuda")
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=causal, scale=0.25, backend="naive")
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, scale=0.25, backend="naive")
    want = segment_reference(q, k, v, dout, cu_q, cu_k, causal, 0.25)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert_elementwise_close(g, w, 1e-4, name)


@gpu
@needs_flash
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_flash_attn_matches_reference(causal, hq, hkv):
    layout = [(a, b) for a, b in LAYOUT if a or b]
    q, k, v, dout, cu_q, cu_k = segment_inputs(layout, hq, hkv, d=64, dtype=torch.bfloat16, device="cuda")
    assert select_backend(q.device, q.dtype) == "flash_attn"
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=causal, scale=0.125)
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, scale=0.125)
    want = segment_reference(q, k, v, dout, cu_q, cu_k, causal, 0.125)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert_elementwise_close(g, w, 6e-2, name)


@gpu
@needs_cuda
@pytest.mark.parametrize("window", [1, 8, 33])
def test_torch_cuda_sliding_window(window):
    layout = [(a, b) for a, b in WINDOW_LAYOUT if a and b]
    q, k, v, dout, cu_q, cu_k = segment_inputs(layout, 8, 2, d=64, dtype=torch.bfloat16, device="cuda")
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=True, scale=0.125, backend="torch_cuda", window=window)
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True, scale=0.125, backend="torch_cuda",
                            window=window)
    want = segment_reference(q, k, v, dout, cu_q, cu_k, True, 0.125, window=window)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert_elementwise_close(g, w, 6e-2, name)


@gpu
@needs_flash
@pytest.mark.parametrize("window,softcap", [(8, None), (None, 2.0), (33, 5.0)])
def test_flash_attn_window_and_softcap(window, softcap):
    layout = [(a, b) for a, b in WINDOW_LAYOUT if a and b]
    q, k, v, dout, cu_q, cu_k = segment_inputs(layout, 8, 2, d=64, dtype=torch.bfloat16, device="cuda")
    kw = {"window": window, "softcap": softcap}
    out, lse = varlen_forward(q, k, v, cu_q, cu_k, causal=True, scale=0.125, backend="flash_attn", **kw)
    grads = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True, scale=0.125, backend="flash_attn",
                            **kw)
    want = segment_reference(q, k, v, dout, cu_q, cu_k, True, 0.125, **kw)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert_elementwise_close(g, w, 6e-2, name)
