"""Measure the attention kernel's tile model on this GPU and write a cluster file for ``hf-fcp simulate``.

    python benchmarks/calibrate_attention.py --out my_gpu.json [--base h100] [--peak-tflops 989.4]
    hf-fcp simulate --cluster my_gpu.json ...

Times the kernels fcp runs — flash-attn's varlen kernel when installed, else PyTorch's own flash kernel
(``torch_cuda``) — at Llama-3-70B shape (64 q heads, 8 kv heads, head dim 128, bf16), forward and
backward separately, on one varlen call per shape holding equal segments (about 64K tokens on the longer
side): causal squares of 128–32K tokens, non-causal rectangles of 128–8K queries × 128–32K keys, causal
rectangles (queries at the end of longer key runs) and a few shapes that are not multiples of the tile.
:func:`hf_fcp.simulate.kernel_model.fit` then finds each pass's full-tile efficiency and overheads; the
file keeps every timed call under ``_measured`` (refit with ``--refit FILE`` and no GPU).
Needs CUDA (except ``--refit``); not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from gpu_replay import (
    median_time,  # benchmarks/ is the script directory, so on sys.path
)

from hf_fcp.simulate import kernel_model
from hf_fcp.simulate.cluster import PRESETS
from hf_fcp.simulate.models import BWD_FLOP_RATIO

SQUARES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
RECT_Q = (128, 256, 512, 1024, 2048, 4096, 8192)
RECT_K = (128, 512, 2048, 8192, 32768)
CAUSAL_RECT = ((512, 2048), (512, 8192), (2048, 8192), (2048, 32768), (300, 5000), (1000, 1500))
ODD = ((300, 5000), (1500, 700), (77, 4096), (4096, 77), (3000, 3000))  # non-causal, partial tiles
TOTAL = 65536
TILE = 128
HQ, HKV, D = 64, 8, 128


def _kernels():
    """(name, fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal) -> (out, lse), bwd(dout, q, k, v, out, lse, ...))."""
    from hf_fcp.engine import kernels_cuda

    if kernels_cuda.flash_attn_available():
        def fwd(q, k, v, cu_q, cu_k, mq, mk, causal):
            return kernels_cuda.flash_forward(q, k, v, cu_q.tolist(), cu_k.tolist(), causal, D ** -0.5)

        def bwd(do, q, k, v, o, lse, cu_q, cu_k, mq, mk, causal):
            return kernels_cuda.flash_backward(do, q, k, v, o, lse, cu_q.tolist(), cu_k.tolist(), causal, D ** -0.5)
        return "flash_attn (" + kernels_cuda._flash_module().__name__ + ")", fwd, bwd
    ops = torch.ops.aten
    rng, unused = torch.zeros(2, dtype=torch.uint64, device="cuda"), torch.empty(0, device="cuda")

    def fwd(q, k, v, cu_q, cu_k, mq, mk, causal):  # the raw op: no per-call offset upload in the timing
        return ops._flash_attention_forward(q, k, v, cu_q, cu_k, mq, mk, 0.0, causal, False, scale=D ** -0.5)[:2]

    def bwd(do, q, k, v, o, lse, cu_q, cu_k, mq, mk, causal):
        return ops._flash_attention_backward(do, q, k, v, o, lse, cu_q, cu_k, mq, mk, 0.0, causal, rng, unused,
                                             scale=D ** -0.5)
    return "torch_cuda (aten._flash_attention_forward/backward)", fwd, bwd


def _time(fwd, bwd, lq: int, lk: int, causal: bool) -> dict:
    """One timed call: ``TOTAL // max(lq, lk)`` segments of lq queries × lk keys (causal: bottom-right)."""
    segs = max(1, TOTAL // max(lq, lk))
    q = torch.randn(segs * lq, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(segs * lk, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu_q = torch.arange(0, segs * lq + 1, lq, device="cuda", dtype=torch.int32)
    cu_k = torch.arange(0, segs * lk + 1, lk, device="cuda", dtype=torch.int32)
    t_fwd = median_time(lambda: fwd(q, k, v, cu_q, cu_k, lq, lk, causal), 10, warmup=3)
    out, lse = fwd(q, k, v, cu_q, cu_k, lq, lk, causal)
    dout = torch.randn_like(out)
    t_bwd = median_time(lambda: bwd(dout, q, k, v, out, lse, cu_q, cu_k, lq, lk, causal), 10, warmup=3)
    return {"q": lq, "k": lk, "causal": causal, "segments": segs, "fwd_s": t_fwd, "bwd_s": t_bwd}


def shapes() -> list[tuple[int, int, bool]]:
    out = [(n, n, True) for n in SQUARES] + [(q, k, False) for q in RECT_Q for k in RECT_K]
    return out + [(q, k, True) for q, k in CAUSAL_RECT] + [(q, k, False) for q, k in ODD]


def measure() -> tuple[str, list[dict]]:
    name, fwd, bwd = _kernels()
    print(f"kernel: {name}; {torch.cuda.get_device_name()}; {TOTAL} tokens per call", flush=True)
    calls = []
    for lq, lk, causal in shapes():
        calls.append(_time(fwd, bwd, lq, lk, causal))
        c = calls[-1]
        print(f"q={lq:>6} k={lk:>6} {'causal' if causal else 'full  '} x{c['segments']:<4}: forward "
              f"{c['fwd_s'] * 1e6:>9.1f} us, backward {c['bwd_s'] * 1e6:>9.1f} us", flush=True)
    return name, calls


def fit_calls(calls: list[dict], peak: float, flops_per_pair: float = 4 * D * HQ) -> dict:
    """Cluster fields (eff_fwd, fwd_*, eff_bwd, bwd_*, tile) fitted to timed calls."""
    segs = [{"q": [c["q"]] * c["segments"], "k": [c["k"]] * c["segments"], "causal": c["causal"]} for c in calls]
    fields, errors, launch = {}, {}, {}
    for p, ratio in (("fwd", 1.0), ("bwd", BWD_FLOP_RATIO)):
        f = kernel_model.fit(segs, [c[f"{p}_s"] for c in calls], TILE, TILE ** 2 * flops_per_pair * ratio, peak)
        fields.update({f"eff_{p}": min(f["eff"], 1.0), f"{p}_diag": f["diag_extra"], f"{p}_q_tile": f["q_overhead"],
                       f"{p}_k_tile": f["k_overhead"]})
        launch[p] = f["launch_s"]
        errors[p] = f["rms_rel_error"]
    fields["tile"] = TILE
    # The launch cost is fitted (so it does not bias the tiles) but not written: calls of ~64K tokens
    # cannot resolve a few microseconds; the base's launch_s stays.
    return {**fields, "_fit_rms_rel_error": errors, "_fit_launch_s": launch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="cluster JSON file to write")
    ap.add_argument("--base", default="h100", choices=sorted(PRESETS), help="preset for the other fields")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: the base's)")
    ap.add_argument("--refit", default=None, help="refit the calls stored in this cluster file (no GPU)")
    args = ap.parse_args(argv)
    if args.refit:
        old = json.load(open(args.refit))
        measured = old["_measured"]
        calls, peak = measured["calls"], old["peak_flops"]
    elif not torch.cuda.is_available():
        print("calibrate_attention: error: needs a CUDA GPU (or --refit FILE)", file=sys.stderr)
        return 2
    else:
        peak = args.peak_tflops * 1e12 if args.peak_tflops else PRESETS[args.base].peak_flops
        kernel_name, calls = measure()
        measured = {"device": torch.cuda.get_device_name(), "kernel": kernel_name, "torch": torch.__version__,
                    "calls": calls}
    fields = fit_calls(calls, peak)
    data = {"base": args.base, "peak_flops": peak, **fields, "_measured": measured}
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=1)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:.3g}" for k, v in fields.items() if not k.startswith("_"))
          + f"; fit rms error forward {fields['_fit_rms_rel_error']['fwd']:.1%}, backward "
          f"{fields['_fit_rms_rel_error']['bwd']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
