"""Replay every rank's attention kernels of a real plan on ONE GPU: measured compute per rank vs the model.

For each world size and strategy (``fcp``: the planner; ``ring``: per-sequence zigzag over all ranks, the
compute a ring/zigzag CP rank runs), it plans a lognormal batch, then for each rank runs exactly the
varlen kernel calls :func:`hf_fcp.fcp_attention` makes (the local causal task, then one non-causal task
per stage against a receive buffer of the right size), forward and backward, on random bf16 data, and
times them with CUDA events (median of ``--reps``). No communication: this isolates the kernel time that
the simulator models with ``Cluster.efficiency``. Prints, per (W, strategy): the slowest and mean rank,
the compute imbalance in *time* (max/mean − 1), the imbalance in attention pairs, the model's predicted
slowest rank (same segments, ``--cluster``), and the fcp/ring ratio of slowest ranks. Last, at world size 1: fcp_attention forward+backward against the
bare varlen kernels on the same packed batch (the engine's overhead on a GPU).

    python benchmarks/gpu_replay.py --worlds 8,32 --tokens-per-rank 32768 --cluster h200 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from hf_fcp import plan_batch
from hf_fcp.kernels import varlen_backward, varlen_forward
from hf_fcp.simulate.cluster import load_cluster
from hf_fcp.simulate.models import BWD_FLOP_RATIO, get_model
from hf_fcp.simulate.workloads import make_batches, parse_distribution

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the script with fp32
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _pairs(lq: np.ndarray, lk: np.ndarray, causal: bool) -> np.ndarray:
    if not causal:
        return lq * lk
    lq = np.minimum(lq, lk)
    return lq * (lk - lq) + lq * (lq + 1) // 2


def _segments(tasks):
    lq, lk = (np.diff(t.numpy()) for t in (tasks.cu_q, tasks.cu_k))
    keep = (lq > 0) & (lk > 0)
    return lq[keep], lk[keep]


def predict(view, model, cluster) -> float:
    """The model's forward + backward seconds for this rank's segments (no communication slowdown)."""
    total = 0.0
    for tasks in (view.local_tasks, *(s.tasks for s in view.stages)):
        lq, lk = _segments(tasks)
        if len(lq) == 0:
            continue
        flops = _pairs(lq, lk, tasks.causal) * model.fwd_flops_per_pair
        for bwd, ratio in ((False, 1.0), (True, BWD_FLOP_RATIO)):
            total += float((flops * ratio / (cluster.peak_flops * cluster.efficiency(lq, lk, bwd))).sum())
            total += cluster.launch_s
    return total


def replay(view, model, reps: int) -> float:
    """Median forward + backward seconds of this rank's kernel calls on the current GPU."""
    dev, dt, hq, hkv, d = DEVICE, DTYPE, model.num_q_heads, model.num_kv_heads, model.head_dim
    n, m = view.num_local, view.num_recv
    q = torch.randn(n, hq, d, device=dev, dtype=dt)
    kv = torch.randn(n + m, 2, hkv, d, device=dev, dtype=dt)
    calls = []
    for tasks, base in ((view.local_tasks, 0), *((s.tasks, n) for s in view.stages)):
        if tasks.num_segments and tasks.q_rows.numel() and tasks.k_rows.numel():
            qi, ki = tasks.q_rows.to(dev), tasks.k_rows.to(dev) + base
            calls.append((q[qi], kv[ki, 0], kv[ki, 1], tasks.cu_q.to(dev), tasks.cu_k.to(dev), tasks.causal))
    if not calls:
        return 0.0

    def step():
        for qq, k, v, cq, ck, causal in calls:
            out, lse = varlen_forward(qq, k, v, cq, ck, causal=causal, scale=d ** -0.5)
            varlen_backward(out, qq, k, v, out, lse, cq, ck, causal=causal, scale=d ** -0.5)

    return median_time(step, reps)


def median_time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after ``warmup`` runs (CUDA events on a GPU, the wall
    clock on CPU). Also used by calibrate_attention.py."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if DEVICE == "cpu":
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def world1_overhead(lens, model, block: int, reps: int) -> tuple[float, float]:
    """(fcp_attention fwd+bwd seconds, bare varlen kernel fwd+bwd seconds) at world size 1, one batch."""
    from hf_fcp.attention import fcp_attention

    n, d = sum(lens), model.head_dim
    view = plan_batch(lens, world_size=1, block_size=block).for_rank(0).to(DEVICE)
    x = [torch.randn(n, h, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
         for h in (model.num_q_heads, model.num_kv_heads, model.num_kv_heads)]
    local = [t.detach()[view.token_index].requires_grad_() for t in x]  # the view's token order
    dout = torch.randn_like(x[0])
    cu = torch.tensor([0, *np.cumsum(lens)], device=DEVICE)

    def fcp():
        torch.autograd.backward(fcp_attention(*local, view), dout)

    def bare():
        out, lse = varlen_forward(*x, cu, cu, causal=True, scale=d ** -0.5)
        varlen_backward(dout, *x, out, lse, cu, cu, causal=True, scale=d ** -0.5)
    return median_time(fcp, reps), median_time(bare, reps)


def run_one(lens, world, strategy, args, model, cluster) -> dict:
    plan = plan_batch(lens, world_size=world, block_size=args.block, strategy=strategy,
                      kv_heads=model.num_kv_heads, head_dim=model.head_dim, kv_dtype="bf16",
                      rounds_per_stage=args.rounds_per_stage)
    measured, predicted = [], []
    for r in range(world):
        view = plan.for_rank(r)
        measured.append(replay(view, model, args.reps))
        predicted.append(predict(view, model, cluster))
    pairs = plan.rank_loads()["cost"]
    m, p = np.array(measured), np.array(predicted)
    return {"world": world, "strategy": strategy, "max_ms": m.max() * 1e3, "mean_ms": m.mean() * 1e3,
            "imbalance_time": m.max() / m.mean() - 1, "model_max_ms": p.max() * 1e3,
            "model_error": p.max() / m.max() - 1,
            "imbalance_pairs": pairs.max() / pairs.mean() - 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="8,32")
    ap.add_argument("--tokens-per-rank", type=int, default=32768)
    ap.add_argument("--distribution", default="lognormal")
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--rounds-per-stage", type=int, default=4)
    ap.add_argument("--model", default="llama3-70b")
    ap.add_argument("--cluster", default="h200")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    model, cluster = get_model(args.model), load_cluster(args.cluster)
    rows = []
    print(f"{'W':>4} {'strategy':>8} {'max ms':>8} {'mean ms':>8} {'imb time':>9} {'imb pairs':>9} "
          f"{'model max':>9} {'model err':>9}")
    for world in (int(w) for w in args.worlds.split(",")):
        lens = make_batches(parse_distribution(args.distribution), world_size=world,
                            tokens_per_rank=args.tokens_per_rank, steps=1, seed=0)[0]
        for strategy in ("fcp", "ring"):
            row = run_one(lens, world, strategy, args, model, cluster)
            rows.append(row)
            print(f"{world:>4} {strategy:>8} {row['max_ms']:>8.2f} {row['mean_ms']:>8.2f} "
                  f"{row['imbalance_time']:>9.1%} {row['imbalance_pairs']:>9.1%} {row['model_max_ms']:>9.2f} "
                  f"{row['model_error']:>+9.1%}", flush=True)
        ring = rows[-1]["max_ms"]
        print(f"{world:>4} fcp/ring slowest-rank kernel time: {rows[-2]['max_ms'] / ring:.3f}", flush=True)
    lens = make_batches(parse_distribution(args.distribution), world_size=1, tokens_per_rank=args.tokens_per_rank,
                        steps=1, seed=1)[0]
    t_fcp, t_bare = world1_overhead(lens, model, args.block, max(args.reps, 5))
    print(f"W=1, {len(lens)} sequences, {sum(lens)} tokens: fcp_attention {t_fcp * 1e3:.2f} ms, bare kernel "
          f"{t_bare * 1e3:.2f} ms, overhead {t_fcp / t_bare - 1:+.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "rows": rows,
                       "world1_fcp_s": t_fcp, "world1_bare_s": t_bare}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
