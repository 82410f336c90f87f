"""Measure the attention-kernel efficiency curve on this GPU and write a cluster file for ``hf-fcp simulate``.

    python benchmarks/calibrate_attention.py --out my_gpu.json [--base h100] [--peak-tflops 989.4]
    hf-fcp simulate --cluster my_gpu.json ...

Times the kernels fcp runs — flash-attn's varlen kernel when installed, else PyTorch's own flash kernel
(``torch_cuda``) — on causal varlen attention of Llama-3-70B shape (64 q heads, 8 kv heads, head dim 128,
bf16): batches of equal square segments of n tokens (64K tokens per call), forward and backward
separately, and fits ``eff(n) = eff_inf / (1 + (n_half / n) ** shape)``
with :func:`hf_fcp.simulate.cluster.fit_efficiency`. It also times rectangular segments (512 or 2048 queries
at the end of 2K–32K keys) to check the model's sqrt(q·k) rule. The measurements go into the file under
``_measured``.
Needs CUDA; not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from gpu_replay import median_time  # benchmarks/ is the script directory, so on sys.path
from hf_fcp.simulate.cluster import PRESETS, fit_efficiency

SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
RECT_Q = (512, 2048)  # query runs against longer key runs (an FCP block against its sequence's prefix)
RECT_K = (2048, 8192, 32768)
TOTAL = 65536
HQ, HKV, D = 64, 8, 128


def _kernels():
    """(name, fwd(q, k, v, cu_q, cu_k, max_q, max_k) -> (out, lse), bwd(dout, q, k, v, out, lse, ...))."""
    from hf_fcp import kernels_cuda

    if kernels_cuda.flash_attn_available():
        def fwd(q, k, v, cu_q, cu_k, mq, mk):
            return kernels_cuda.flash_forward(q, k, v, cu_q.tolist(), cu_k.tolist(), True, D ** -0.5)

        def bwd(do, q, k, v, o, lse, cu_q, cu_k, mq, mk):
            return kernels_cuda.flash_backward(do, q, k, v, o, lse, cu_q.tolist(), cu_k.tolist(), True, D ** -0.5)
        return "flash_attn (" + kernels_cuda._flash_module().__name__ + ")", fwd, bwd
    ops = torch.ops.aten
    rng, unused = torch.zeros(2, dtype=torch.uint64, device="cuda"), torch.empty(0, device="cuda")

    def fwd(q, k, v, cu_q, cu_k, mq, mk):  # the raw op: no per-call offset upload in the timing
        return ops._flash_attention_forward(q, k, v, cu_q, cu_k, mq, mk, 0.0, True, False, scale=D ** -0.5)[:2]

    def bwd(do, q, k, v, o, lse, cu_q, cu_k, mq, mk):
        return ops._flash_attention_backward(do, q, k, v, o, lse, cu_q, cu_k, mq, mk, 0.0, True, rng, unused,
                                             scale=D ** -0.5)
    return "torch_cuda (aten._flash_attention_forward/backward)", fwd, bwd


def _efficiency(fwd, bwd, lq: int, lk: int, peak: float) -> tuple[float, float]:
    """(forward, backward) fraction of peak for TOTAL // lk segments of lq queries × lk keys (causal,
    bottom-right: the queries are the last lq tokens of an lk-token sequence)."""
    segs = TOTAL // lk
    q = torch.randn(segs * lq, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(segs * lk, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu_q = torch.arange(0, segs * lq + 1, lq, device="cuda", dtype=torch.int32)
    cu_k = torch.arange(0, segs * lk + 1, lk, device="cuda", dtype=torch.int32)
    flops = 4 * D * HQ * segs * (lq * (lk - lq) + lq * (lq + 1) / 2)
    t_fwd = median_time(lambda: fwd(q, k, v, cu_q, cu_k, lq, lk), 10, warmup=3)
    out, lse = fwd(q, k, v, cu_q, cu_k, lq, lk)
    dout = torch.randn_like(out)
    t_bwd = median_time(lambda: bwd(dout, q, k, v, out, lse, cu_q, cu_k, lq, lk), 10, warmup=3)
    return flops / (t_fwd * peak), 2.5 * flops / (t_bwd * peak)


def measure(peak: float) -> tuple[str, dict[int, tuple[float, float]], dict[str, tuple[float, float]]]:
    """Square segments {n: (forward, backward) efficiency} and rectangular {"lq x lk": (...)}."""
    name, fwd, bwd = _kernels()
    print(f"kernel: {name}; {torch.cuda.get_device_name()}; {TOTAL} tokens per call", flush=True)
    square = {}
    for n in SIZES:
        square[n] = _efficiency(fwd, bwd, n, n, peak)
        print(f"n={n:>6}: forward {square[n][0]:.1%} of peak, backward {square[n][1]:.1%}", flush=True)
    rect = {}
    for lq in RECT_Q:
        for lk in RECT_K:
            if lk > lq:
                rect[f"{lq}x{lk}"] = _efficiency(fwd, bwd, lq, lk, peak)
                print(f"q={lq:>5} k={lk:>6}: forward {rect[f'{lq}x{lk}'][0]:.1%}, backward "
                      f"{rect[f'{lq}x{lk}'][1]:.1%}", flush=True)
    return name, square, rect


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="cluster JSON file to write")
    ap.add_argument("--base", default="h100", choices=sorted(PRESETS), help="preset for the other fields")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: the base's)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("calibrate_attention: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    peak = args.peak_tflops * 1e12 if args.peak_tflops else PRESETS[args.base].peak_flops
    kernel, eff, rect = measure(peak)
    n = np.array(sorted(eff))
    f_inf, n_half, shape = fit_efficiency(n, [eff[i][0] for i in n])
    b_inf, _, _ = fit_efficiency(n, [eff[i][1] for i in n])
    data = {"base": args.base, "peak_flops": peak, "eff_fwd": min(f_inf, 1.0), "eff_bwd": min(b_inf, 1.0),
            "n_half": n_half, "shape": shape,
            "_measured": {"device": torch.cuda.get_device_name(), "kernel": kernel, "torch": torch.__version__,
                          "efficiency_fwd_bwd": {str(k): v for k, v in eff.items()},
                          "rectangular_fwd_bwd": rect}}
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=2)
    print(f"wrote {args.out}: eff_fwd {data['eff_fwd']:.3f}, eff_bwd {data['eff_bwd']:.3f}, n_half {n_half:.0f}, "
          f"shape {shape:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
