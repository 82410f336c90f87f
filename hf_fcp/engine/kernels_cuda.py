"""CUDA varlen attention backends behind :mod:`hf_fcp.engine.kernels`: ``flash_attn`` and ``torch_cuda``.

Both take packed tensors and the segments' offsets (see :mod:`hf_fcp.engine.kernels` for layouts):

* q: (Nq, Hq, D), k/v: (Nk, Hkv, D) fp16/bf16 on one CUDA device, D a multiple of 8 up to 256;
* offsets: an ``Offsets`` / ``TaskList`` — int32 ``cu_q``/``cu_k`` (S+1,) already on the device and the
  longest segment lengths ``max_q``/``max_k`` as Python ints, so no call reads device memory back or
  uploads offsets; causal is BOTTOM-RIGHT aligned per segment;
* forward returns out (Nq, Hq, D) in q's dtype and lse (Nq, Hq) float32, −inf where no key is visible;
* backward takes the FINAL out/lse and returns dq, dk, dv in the dtypes of q, k, v.

``flash_attn`` is the flash-attn package (FA3's ``flash_attn_interface`` first, then FA2 ≥ 2.6), imported
lazily because it is an optional extra. ``torch_cuda`` is the FlashAttention-2 kernel that PyTorch itself
ships (``aten._flash_attention_forward/backward`` with cumulative sequence offsets, the op behind
``torch.nn.attention.varlen``): no extra install, sm80 or newer. Both return the LSE as (Hq, Nq) with +inf
on rows that see no key; we hand it back as (Nq, Hq) with −inf there, and invert that for the backward
(+inf makes every probability of such a row 0, so its gradients are 0).
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch
from torch import Tensor

FLASH_ATTN_MIN_VERSION = (2, 6)  # packed (H, total_q) varlen LSE layout
_INF = float("inf")


@functools.lru_cache(maxsize=1)
def _flash_module():
    """The flash-attn varlen module (FA3 ``flash_attn_interface`` first, then FA2), or None."""
    try:
        mod = importlib.import_module("flash_attn_interface")  # FA3 (hopper)
        if hasattr(mod, "flash_attn_varlen_func"):
            return mod
    except ImportError:
        pass
    try:
        import flash_attn
        from flash_attn import flash_attn_interface as mod
    except ImportError:
        return None
    version = tuple(int(p) for p in flash_attn.__version__.split(".")[:2] if p.isdigit())
    return mod if version >= FLASH_ATTN_MIN_VERSION else None


def flash_attn_available() -> bool:
    return _flash_module() is not None


@functools.lru_cache(maxsize=8)
def torch_cuda_available(index: int | None = None) -> bool:
    """PyTorch's own flash kernel: built into this torch and the GPU is sm80 (Ampere) or newer."""
    if not torch.cuda.is_available() or not torch.backends.cuda.is_flash_attention_available():
        return False
    return torch.cuda.get_device_capability(index)[0] >= 8


def check_head_dim(q: Tensor, backend: str) -> None:
    if q.shape[2] % 8 or q.shape[2] > 256:
        raise ValueError(f"q: got head dim {q.shape[2]}, expected a multiple of 8 up to 256 for {backend}")


def _lse_out(lse: Tensor, n_rows: int) -> Tensor:
    """Kernel LSE (Hq, Nq), +inf on empty rows → (Nq, Hq) float32, −inf there."""
    if lse.dim() != 2 or lse.shape[1] != n_rows:
        raise RuntimeError(f"unsupported varlen kernel: LSE of shape {tuple(lse.shape)}, expected (Hq, {n_rows})")
    lse = lse.float().transpose(0, 1)
    return lse.masked_fill(lse == _INF, -_INF).contiguous()


def _lse_in(lse: Tensor) -> Tensor:
    """Inverse of ``_lse_out`` for the backward kernels: (Nq, Hq) −inf → (Hq, Nq) +inf."""
    return lse.float().masked_fill(lse == -_INF, _INF).transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------- flash-attn package
def _call_by_name(fn, values: dict):
    """Call a flash-attn function with the keyword arguments its signature names (versions differ)."""
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    missing = [n for n, p in params.items() if n not in values and p.default is inspect.Parameter.empty]
    if missing:
        name = getattr(fn, "__name__", repr(fn))
        raise RuntimeError(f"unsupported flash-attn version: {name} needs arguments {missing}")
    return fn(**{n: values[n] for n in params if n in values})


def _flash_args(q, k, offsets, causal, scale, window, softcap) -> dict:
    check_head_dim(q, "flash_attn")
    left = -1 if window is None else window - 1  # flash-attn: keys i + off - left .. i + off
    return dict(
        q=q, k=k, cu_seqlens_q=offsets.cu_q, cu_seqlens_k=offsets.cu_k,
        max_seqlen_q=offsets.max_q, max_seqlen_k=offsets.max_k, dropout_p=0.0,
        softmax_scale=scale, causal=causal, is_causal=causal, window_size=(left, -1 if window is None else 0),
        window_size_left=left, window_size_right=-1 if window is None else 0, softcap=softcap or 0.0,
        alibi_slopes=None, deterministic=False, rng_state=None, return_attn_probs=True)


def flash_forward(q, k, v, offsets, causal, scale, window=None, softcap=None):
    mod = _flash_module()
    args = dict(_flash_args(q, k, offsets, causal, scale, window, softcap), v=v)
    res = _call_by_name(mod.flash_attn_varlen_func, args)
    if not isinstance(res, (tuple, list)):
        raise RuntimeError("unsupported flash-attn version: flash_attn_varlen_func returned no LSE")
    return res[0], _lse_out(res[1], q.shape[0])


def flash_backward(dout, q, k, v, out, lse, offsets, causal, scale, window=None, softcap=None):
    mod = _flash_module()
    fn = getattr(mod, "_flash_attn_varlen_backward", None) or mod._flash_attn_backward
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _call_by_name(fn, dict(_flash_args(q, k, offsets, causal, scale, window, softcap), v=v, dout=dout.contiguous(),
                           out=out.contiguous(), softmax_lse=_lse_in(lse), dq=dq, dk=dk, dv=dv, sm_margin=0))
    return dq, dk, dv


# ----------------------------------------------------------------------------- PyTorch's flash kernel
def _torch_args(q, offsets, softcap) -> tuple:
    check_head_dim(q, "torch_cuda")
    if softcap is not None:
        raise ValueError("softcap: kernel 'torch_cuda' does not compute logit soft-capping; use 'flash_attn'")
    return offsets.cu_q, offsets.cu_k, offsets.max_q, offsets.max_k


def _window(window) -> dict:
    return {} if window is None else {"window_size_left": window - 1, "window_size_right": 0}


def torch_cuda_forward(q, k, v, offsets, causal, scale, window=None, softcap=None):
    cu_q, cu_k, max_q, max_k = _torch_args(q, offsets, softcap)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, 0.0, causal, False,
        scale=scale, **_window(window))
    return out, _lse_out(lse, q.shape[0])


def torch_cuda_backward(dout, q, k, v, out, lse, offsets, causal, scale, window=None, softcap=None):
    cu_q, cu_k, max_q, max_k = _torch_args(q, offsets, softcap)
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # read only with dropout > 0
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), _lse_in(lse),
        cu_q, cu_k, max_q, max_k, 0.0, causal, rng, unused, scale=scale, **_window(window))
    return dq, dk, dv
