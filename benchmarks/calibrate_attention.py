"""Measure the attention-kernel efficiency curve on this GPU and write a cluster file for ``hf-fcp simulate``.

    python benchmarks/calibrate_attention.py --out my_gpu.json [--base h100] [--peak-tflops 989.4]
    hf-fcp simulate --cluster my_gpu.json ...

Times causal varlen attention (flash-attn's ``flash_attn_varlen_func`` when installed, else torch SDPA) of
Llama-3-70B shape (64 q heads, 8 kv heads, head dim 128, bf16) on batches of equal segments of n tokens
(32K tokens per call), forward and forward+backward, and fits ``eff(n) = eff_inf / (1 + (n_half / n) ** shape)``
with :func:`hf_fcp.simulate.cluster.fit_efficiency`. The measurements go into the file under ``_measured``.
Needs CUDA; not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from hf_fcp.simulate.cluster import PRESETS, fit_efficiency

SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
TOTAL = 32768
HQ, HKV, D = 64, 8, 128


def _attention():
    try:
        from flash_attn import flash_attn_varlen_func

        def run(q, k, v, cu, n):
            return flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True)
        return "flash_attn_varlen_func", run
    except ImportError:
        def run(q, k, v, cu, n):  # (B, H, n, D) batches of equal segments; SDPA repeats no kv heads itself
            b = q.shape[0] // n
            qq, kk, vv = (x.view(b, n, -1, D).transpose(1, 2) for x in (q, k, v))
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        return "torch sdpa", run


def _time(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def measure(peak: float) -> tuple[str, dict[int, tuple[float, float]]]:
    """{n: (forward efficiency, backward efficiency)} as fractions of ``peak`` FLOP/s."""
    name, attn = _attention()
    out = {}
    for n in SIZES:
        tokens = TOTAL // n * n
        q = torch.randn(tokens, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(tokens, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        cu = torch.arange(0, tokens + 1, n, device="cuda", dtype=torch.int32)
        flops = 4 * D * HQ * (tokens // n) * n * (n + 1) / 2
        t_fwd = _time(lambda: attn(q, k, v, cu, n))
        o = attn(q, k, v, cu, n)
        grad = torch.randn_like(o)
        t_all = _time(lambda: torch.autograd.grad(attn(q, k, v, cu, n), (q, k, v), grad))
        out[n] = (flops / (t_fwd * peak), 2.5 * flops / (max(t_all - t_fwd, 1e-9) * peak))
        print(f"n={n:>6}: forward {out[n][0]:.1%} of peak, backward {out[n][1]:.1%}", flush=True)
    return name, out


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
    kernel, eff = measure(peak)
    n = np.array(sorted(eff))
    f_inf, n_half, shape = fit_efficiency(n, [eff[i][0] for i in n])
    b_inf, _, _ = fit_efficiency(n, [eff[i][1] for i in n])
    data = {"base": args.base, "peak_flops": peak, "eff_fwd": min(f_inf, 1.0), "eff_bwd": min(b_inf, 1.0),
            "n_half": n_half, "shape": shape,
            "_measured": {"device": torch.cuda.get_device_name(), "kernel": kernel, "torch": torch.__version__,
                          "efficiency_fwd_bwd": {str(k): v for k, v in eff.items()}}}
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=2)
    print(f"wrote {args.out}: eff_fwd {data['eff_fwd']:.3f}, eff_bwd {data['eff_bwd']:.3f}, n_half {n_half:.0f}, "
          f"shape {shape:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
