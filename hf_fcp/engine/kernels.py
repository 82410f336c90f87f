"""Block attention kernels with a varlen interface, plus the log-sum-exp (LSE) merge.

Plain functions without autograd (the caller's autograd Function calls them). Tensors are packed:

* ``q``: (Nq, Hq, D), ``k``/``v``: (Nk, Hkv, D), Hq % Hkv == 0 (GQA/MQA; KV heads are never repeated);
* ``cu_q``/``cu_k``: int32/int64 (S+1,) cumulative offsets, any device; segment ``i`` owns queries
  ``q[cu_q[i]:cu_q[i+1]]`` and keys ``k[cu_k[i]:cu_k[i+1]]``; lengths may differ and may be 0;
* ``lse``: (Nq, Hq) float32, natural-log sum of ``exp(scale * q.k)`` over the visible keys (−inf: none).

``causal=True`` is BOTTOM-RIGHT aligned (flash-attn ≥ 2.1): in a segment with lengths (Lq, Lk), query
``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)``. Rows that see no key give out 0 and lse −inf::

    Lq=2, Lk=5 (queries at the end of a longer KV)     Lq=5, Lk=2 (the first 3 rows see nothing)
        1 1 1 1 0                                           0 0
        1 1 1 1 1                                           0 0
                                                            0 0
                                                            1 0
                                                            1 1

Options: ``window`` (int) — a causal sliding window: query ``i`` sees only keys
``i + (Lk - Lq) - window < j <= i + (Lk - Lq)`` (transformers' ``sliding_window``: ``window`` keys, itself
included); ``softcap`` (float) — logits ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2).

Backends: ``torch_cpu`` (aten's CPU flash kernel; windows through bounded masks; no softcap) and ``naive``
(plain torch, any dtype/device, every option; the reference) in :mod:`.kernels_cpu`; ``flash_attn`` (FA2 ≥
2.6 or FA3 varlen on CUDA, imported lazily; windows and softcap) and ``torch_cuda`` (PyTorch's built-in
FlashAttention-2 varlen kernel, no extra install; windows, no softcap) in :mod:`.kernels_cuda`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ..plan.settings import KERNELS as BACKENDS
from . import kernels_cuda as _cuda
from .kernels_cpu import BLOCKS
from .kernels_cpu import lse_merge as _lse_merge

TORCH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
_GROUP_MAX_LEN = 512  # segments up to this length with equal (Lq, Lk) share one batched kernel call
_GROUP_MAX_TOKENS = 1 << 16  # ... with at most this many (query or key) tokens per call
_INF = float("inf")


# ----------------------------------------------------------------------------- backend selection
def available_backends(device: torch.device | str) -> list[str]:
    """Backends usable on ``device`` (a torch.device or string), best first."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return ["torch_cpu", "naive"]
    if dev.type != "cuda":
        return ["naive"]
    fast = (["flash_attn"] if _cuda.flash_attn_available() else []) + (
        ["torch_cuda"] if _cuda.torch_cuda_available(dev.index) else [])
    return fast + ["naive"]


SOFTCAP_BACKENDS = ("flash_attn", "naive")
"""Backends that compute logit soft-capping."""


def select_backend(device: torch.device | str, dtype: torch.dtype, requested: str | None = None, *,
                   softcap: float | None = None) -> str:
    """Validate ``requested`` for (device, dtype, softcap), or pick the default: on CUDA for fp16/bf16
    flash_attn when importable, else torch_cuda (PyTorch's own flash kernel, sm80+); on CPU torch_cpu for
    fp32/bf16/fp16/fp64; naive otherwise. With ``softcap`` only :data:`SOFTCAP_BACKENDS` qualify (on CPU
    the default becomes naive; on CUDA without flash-attn it is an error naming the way out)."""
    dev = torch.device(device)
    if requested is None:
        if dev.type == "cuda" and dtype in FLASH_DTYPES:
            choice = available_backends(dev)[0]
        else:
            choice = "torch_cpu" if dev.type == "cpu" and dtype in TORCH_CPU_DTYPES else "naive"
        if softcap is not None and choice not in SOFTCAP_BACKENDS:
            if dev.type == "cuda":
                raise ValueError(f"softcap: got {softcap}, but no kernel on {dev} computes logit soft-capping: "
                                 "install flash-attn (pip install 'hf-fcp[flash]') or select kernel 'naive' (slow)")
            choice = "naive"
        return choice
    if softcap is not None and requested not in SOFTCAP_BACKENDS:
        raise ValueError(f"softcap: got {softcap} with kernel {requested!r}, which does not compute logit "
                         f"soft-capping; use kernel 'flash_attn' on CUDA or 'naive' on CPU")
    if requested not in BACKENDS:
        raise ValueError(f"backend: got {requested!r}, expected one of {BACKENDS} or None (automatic)")
    if requested == "flash_attn":
        if not _cuda.flash_attn_available():
            raise ImportError(
                "backend 'flash_attn' needs flash-attn >= 2.6 (or FA3's flash_attn_interface): "
                "pip install 'hf-fcp[flash]' (or pip install flash-attn); on CUDA without it use backend "
                "'torch_cuda', on CPU 'torch_cpu'")
        _check_backend_fit(requested, dev, dtype, "cuda", FLASH_DTYPES)
    elif requested == "torch_cuda":
        _check_backend_fit(requested, dev, dtype, "cuda", FLASH_DTYPES)
        if not _cuda.torch_cuda_available(dev.index):
            raise ValueError(f"backend 'torch_cuda': {dev} has no PyTorch flash kernel (needs a torch built "
                             "with flash attention and an sm80+ GPU); use backend 'naive'")
    elif requested == "torch_cpu":
        _check_backend_fit(requested, dev, dtype, "cpu", TORCH_CPU_DTYPES)
    elif not dtype.is_floating_point:
        raise ValueError(f"backend 'naive': got dtype {dtype}, expected a floating dtype")
    return requested


def _check_backend_fit(name, dev, dtype, device_type, dtypes) -> None:
    if dev.type != device_type:
        raise ValueError(f"backend {name!r}: got device {dev}, expected a {device_type} device")
    if dtype not in dtypes:
        raise ValueError(f"backend {name!r}: got dtype {dtype}, expected one of {dtypes}")


# ----------------------------------------------------------------------------- validation
def _offsets(name: str, cu: Tensor, n_rows: int, n_segments: int | None) -> list[int]:
    """Check a cumulative-offset tensor against the packed length ``n_rows``; return it as a list."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        raise ValueError(f"{name}: got {got}, expected a 1-D int32/int64 tensor of S+1 offsets")
    offs = cu.tolist()
    if n_segments is not None and len(offs) != n_segments + 1:
        raise ValueError(f"{name}: got {len(offs)} offsets, expected {n_segments + 1} (as many as cu_q)")
    if not offs or offs[0] != 0 or offs[-1] != n_rows:
        raise ValueError(f"{name}: got first/last offsets {offs[:1]}/{offs[-1:]}, expected 0/{n_rows}")
    if any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"{name}: offsets must be non-decreasing, got {offs}")
    return offs


def _check_inputs(q, k, v, cu_q, cu_k) -> tuple[list[int], list[int]]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: got {got}, expected a floating (N, H, D) tensor")
    if v.shape != k.shape:
        raise ValueError(f"v: got shape {tuple(v.shape)}, expected {tuple(k.shape)} (the shape of k)")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: got head dim {k.shape[2]}, expected {q.shape[2]} (the head dim of q)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: got {k.shape[1]} heads, expected a divisor of the {q.shape[1]} heads of q")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: got {t.dtype} on {t.device}, expected {q.dtype} on {q.device} (as q)")
    offs_q = _offsets("cu_q", cu_q, q.shape[0], None)
    return offs_q, _offsets("cu_k", cu_k, k.shape[0], len(offs_q) - 1)


def _check_like(name: str, t, shape: tuple, device: torch.device) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape) or not t.is_floating_point():
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: got {got}, expected a floating tensor of shape {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name}: got device {t.device}, expected {device}")


# ----------------------------------------------------------------------------- LSE merge
@torch.no_grad()
def merge_partial(out_acc: Tensor, lse_acc: Tensor, rows: Tensor | None, out_part: Tensor,
                  lse_part: Tensor) -> None:
    """Merge a partial attention result into accumulator rows, in place (numerically stable LSE merge).

    out_acc: (N, Hq, D) float32 accumulator (start: zeros). lse_acc: (N, Hq) float32 (start: −inf).
    rows: int64 (n,) unique row indices into the accumulators, or None for all rows (n == N).
    out_part: (n, Hq, D) any float dtype. lse_part: (n, Hq) float32, −inf where no key was visible.
    """
    if rows is not None and (rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"rows: got {rows.dtype} of shape {tuple(rows.shape)}, expected a 1-D int64 tensor")
    n = out_acc.shape[0] if rows is None else rows.numel()
    _check_like("lse_acc", lse_acc, out_acc.shape[:2], out_acc.device)
    _check_like("out_part", out_part, (n, *out_acc.shape[1:]), out_acc.device)
    _check_like("lse_part", lse_part, (n, out_acc.shape[1]), out_acc.device)
    o_part, l_part = out_part.to(out_acc.dtype), lse_part.to(lse_acc.dtype)
    if rows is None:
        o, l = _lse_merge(out_acc, lse_acc, o_part, l_part)
        out_acc.copy_(o)
        lse_acc.copy_(l)
        return
    rows = rows.to(device=out_acc.device, dtype=torch.int64)
    o, l = _lse_merge(out_acc.index_select(0, rows), lse_acc.index_select(0, rows), o_part, l_part)
    out_acc.index_copy_(0, rows, o)
    lse_acc.index_copy_(0, rows, l)


# ----------------------------------------------------------------------------- segment grouping
class _Rows(NamedTuple):
    """``count`` segments of ``length`` packed rows each: rows [start, start + count*length) in order when
    ``idx`` is None (gathered as a view), else the rows ``idx`` (count*length,) int64 (gathered by copy)."""

    start: int
    count: int
    length: int
    idx: Tensor | None

    def covers(self, n: int) -> bool:
        return self.idx is None and self.start == 0 and self.count * self.length == n


def _rows(starts: list[int], length: int, device) -> _Rows:
    if all(b - a == length for a, b in zip(starts, starts[1:])):
        return _Rows(starts[0], len(starts), length, None)
    idx = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(length, device=device)
    return _Rows(starts[0], len(starts), length, idx.reshape(-1))


def _batches(offs_q: list[int], offs_k: list[int], causal: bool, device) -> list[tuple[_Rows, _Rows]]:
    """(query rows, key rows) per kernel call. Segments of equal (Lq, Lk) up to _GROUP_MAX_LEN share a
    call. Causal segments with Lq > Lk drop their first Lq − Lk rows (they see nothing), so causal calls
    have Lq <= Lk. Empty segments get no call."""
    groups: dict[tuple[int, int], tuple[list, list]] = {}
    for qa, qb, ka, kb in zip(offs_q, offs_q[1:], offs_k, offs_k[1:]):
        lq, lk = qb - qa, kb - ka
        if causal and lq > lk:
            qa, lq = qa + lq - lk, lk
        if lq and lk:
            starts = groups.setdefault((lq, lk), ([], []))
            starts[0].append(qa)
            starts[1].append(ka)
    out = []
    for (lq, lk), (qs, ks) in groups.items():
        step = 1 if max(lq, lk) > _GROUP_MAX_LEN else max(1, _GROUP_MAX_TOKENS // max(lq, lk))
        for i in range(0, len(qs), step):
            out.append((_rows(qs[i:i + step], lq, device), _rows(ks[i:i + step], lk, device)))
    return out


def _gather(x: Tensor, r: _Rows) -> Tensor:
    """Packed (N, H, ...) → (B, H, L, ...)."""
    rows = x[r.start:r.start + r.count * r.length] if r.idx is None else x.index_select(0, r.idx)
    return rows.unflatten(0, (r.count, r.length)).transpose(1, 2)


def _scatter(dst: Tensor, r: _Rows, val: Tensor) -> None:
    """Inverse of ``_gather``: write val (B, H, L, ...) into the packed rows of dst (N, H, ...)."""
    val = val.transpose(1, 2).flatten(0, 1)
    if r.idx is None:
        dst[r.start:r.start + val.shape[0]] = val
    else:
        dst.index_copy_(0, r.idx, val.to(dst.dtype))


def _packed(val: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, H, L, ...) covering all rows in order → contiguous packed (B*L, H, ...)."""
    return val.transpose(1, 2).flatten(0, 1).to(dtype).contiguous()


def _run(block, batches, q_side, k_side, outs) -> tuple[Tensor, ...]:
    """Run ``block(*q_side blocks, *k_side blocks)`` per batch and assemble its results into packed tensors.
    outs: per result (like, side 0=q/1=k, fill for rows no call writes, dtype)."""
    def call(rq, rk):
        return block(*(_gather(t, rq) for t in q_side), *(_gather(t, rk) for t in k_side))

    if len(batches) == 1 and all(batches[0][side].covers(like.shape[0]) for like, side, _, _ in outs):
        return tuple(_packed(r, dtype) for r, (_, _, _, dtype) in zip(call(*batches[0]), outs))  # no copies
    bufs = []
    for like, side, fill, dtype in outs:
        covered = sum(b[side].count * b[side].length for b in batches) == like.shape[0]
        kw = dict(dtype=dtype, device=like.device)
        bufs.append(torch.empty(like.shape, **kw) if covered else torch.full(like.shape, fill, **kw))
    for rows in batches:
        for buf, res, (_, side, _, _) in zip(bufs, call(*rows), outs):
            _scatter(buf, rows[side], res)
    return tuple(bufs)


# ----------------------------------------------------------------------------- entry points
_BLOCKS = BLOCKS
_CUDA_BLOCKS = {"flash_attn": (_cuda.flash_forward, _cuda.flash_backward),
                "torch_cuda": (_cuda.torch_cuda_forward, _cuda.torch_cuda_backward)}


class Offsets(NamedTuple):
    """Segment offsets of one varlen call, on the host and on the device. :class:`hf_fcp.plan.tasks.TaskList`
    carries the same fields, precomputed once per view, so the engine passes its task lists as they are."""

    offs_q: tuple[int, ...]  # S+1 cumulative query offsets (host)
    offs_k: tuple[int, ...]
    cu_q: Tensor  # int32 (S+1,) on the tensors' device (the CUDA kernels read these)
    cu_k: Tensor
    max_q: int  # longest query / key run of a segment
    max_k: int


def _offsets_of(q, k, v, cu_q, cu_k) -> Offsets:
    """Validated :class:`Offsets` of the public API's inputs (reads the offsets back to the host once)."""
    offs_q, offs_k = _check_inputs(q, k, v, cu_q, cu_k)

    def longest(offs) -> int:
        return max((b - a for a, b in zip(offs, offs[1:])), default=0)

    cu_q, cu_k = (cu.to(device=q.device, dtype=torch.int32) for cu in (cu_q, cu_k))
    return Offsets(tuple(offs_q), tuple(offs_k), cu_q, cu_k, longest(offs_q), longest(offs_k))


@torch.no_grad()
def forward_segments(q: Tensor, k: Tensor, v: Tensor, offsets, *, causal: bool, scale: float, backend: str,
                     window: int | None = None, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`varlen_forward` without checks, for the engine: ``offsets`` is an :class:`Offsets` or a
    ``TaskList`` (already validated when the plan's view was built); ``backend`` already selected. Reads
    nothing from the device: no host synchronisation."""
    if backend in _CUDA_BLOCKS and q.shape[0] and k.shape[0]:
        return _CUDA_BLOCKS[backend][0](q, k, v, offsets, causal, scale, window, softcap)
    block = functools.partial(_BLOCKS.get(backend, _BLOCKS["naive"])[0], causal=causal, scale=scale, window=window,
                              softcap=softcap)
    outs = ((q, 0, 0.0, q.dtype), (q[..., 0], 0, -_INF, torch.float32))
    return _run(block, _batches(offsets.offs_q, offsets.offs_k, causal, q.device), (q,), (k, v), outs)


@torch.no_grad()
def backward_segments(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, offsets, *,
                      causal: bool, scale: float, backend: str, window: int | None = None,
                      softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`varlen_backward` without checks, for the engine (as :func:`forward_segments`)."""
    if backend != "naive":  # the kernels want one dtype; naive computes in >= float32 anyway
        dout, out = dout.to(q.dtype), out.to(q.dtype)
    if backend in _CUDA_BLOCKS and q.shape[0] and k.shape[0]:
        return _CUDA_BLOCKS[backend][1](dout, q, k, v, out, lse, offsets, causal, scale, window, softcap)
    lse = lse.masked_fill(lse == -_INF, _INF)  # exp(s - inf) = 0: rows without keys get 0
    block = functools.partial(_BLOCKS.get(backend, _BLOCKS["naive"])[1], causal=causal, scale=scale, window=window,
                              softcap=softcap)
    outs = ((q, 0, 0.0, q.dtype), (k, 1, 0.0, k.dtype), (v, 1, 0.0, v.dtype))
    return _run(block, _batches(offsets.offs_q, offsets.offs_k, causal, q.device), (dout, q, out, lse), (k, v), outs)


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, *, causal: bool,
                   scale: float, backend: str | None = None, window: int | None = None,
                   softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention of packed segments (see the module docstring for layouts and the causal mask).

    q: (Nq, Hq, D); k, v: (Nk, Hkv, D), same dtype/device as q. cu_q, cu_k: int32/int64 (S+1,).
    Returns out (Nq, Hq, D) in q's dtype (0 where no key is visible) and lse (Nq, Hq) float32 (−inf there).
    """
    offsets = _offsets_of(q, k, v, cu_q, cu_k)
    backend = select_backend(q.device, q.dtype, backend, softcap=softcap)
    return forward_segments(q.detach(), k.detach(), v.detach(), offsets, causal=causal, scale=float(scale),
                            backend=backend, window=window, softcap=softcap)


def varlen_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                    cu_k: Tensor, *, causal: bool, scale: float, backend: str | None = None,
                    window: int | None = None, softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one varlen attention call, given the FINAL (merged over all key chunks) out and lse.

    dout, out: (Nq, Hq, D) any float dtype (cast to q's); lse: (Nq, Hq) float32, −inf rows get zero grads.
    q, k, v, cu_q, cu_k, causal, scale: as in ``varlen_forward``. Summing dk/dv (and dq) over calls on
    disjoint key chunks gives the exact gradients of the merged attention.
    Returns dq (Nq, Hq, D), dk (Nk, Hkv, D), dv (Nk, Hkv, D) in the dtypes of q, k, v.
    """
    offsets = _offsets_of(q, k, v, cu_q, cu_k)
    for name, t in (("dout", dout), ("out", out)):
        _check_like(name, t, q.shape, q.device)
    _check_like("lse", lse, q.shape[:2], q.device)
    backend = select_backend(q.device, q.dtype, backend, softcap=softcap)
    return backward_segments(dout.detach(), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), offsets,
                             causal=causal, scale=float(scale), backend=backend, window=window, softcap=softcap)
