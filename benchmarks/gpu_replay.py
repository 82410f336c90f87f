"""Replay every rank's attention kernels of a real plan on ONE GPU: measured compute per rank vs the model.

For each world size and strategy (``fcp``: the planner, balancing kernel work; ``fcp-pairs``: the planner
balancing causal pairs; ``ring``: per-sequence zigzag over all ranks, the compute a ring/zigzag CP rank
runs), it plans a batch (``--distribution``), then for each rank runs exactly the
varlen kernel calls :func:`hf_fcp.fcp_attention` makes (the local causal task, then one non-causal task
per stage against a receive buffer of the right size), forward and backward, on random bf16 data, and
times each call with CUDA events (median of ``--reps``). No communication: this isolates the kernel time
that the simulator models with ``Cluster.kernel_seconds``. Prints, per (W, strategy): the slowest and mean
rank, the compute imbalance in *time* (max/mean − 1), the imbalance in attention pairs, the model's
slowest rank (same segments, ``--cluster``) and its error, the model's imbalance and its per-rank rms
error, and fcp's slowest rank over the others'. ``--json`` keeps every timed call (segment lengths,
forward and backward seconds) for refitting the model offline. Last, at world size 1: fcp_attention
forward+backward against the bare varlen kernels on the same packed batch (the engine's overhead).

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
from hf_fcp.engine.kernels import varlen_backward, varlen_forward
from hf_fcp.simulate.cluster import load_cluster
from hf_fcp.simulate.models import BWD_FLOP_RATIO, get_model
from hf_fcp.workloads import make_batches, parse_distribution

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the script with fp32
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


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
        for bwd, ratio in ((False, 1.0), (True, BWD_FLOP_RATIO)):
            fpp = model.fwd_flops_per_pair * ratio
            total += float(cluster.kernel_seconds(lq, lk, tasks.causal, fpp, bwd).sum()) + cluster.launch_s
    return total


def replay(view, model, reps: int) -> tuple[float, list[dict]]:
    """This rank's kernel calls on the current GPU: (forward + backward seconds, per call
    ``{"q", "k", "causal", "fwd_s", "bwd_s"}`` with the call's segment lengths and median times)."""
    dev, dt, hq, hkv, d = DEVICE, DTYPE, model.num_q_heads, model.num_kv_heads, model.head_dim
    n, m = view.num_local, view.num_recv
    q = torch.randn(n, hq, d, device=dev, dtype=dt)
    kv = torch.randn(n + m, 2, hkv, d, device=dev, dtype=dt)
    calls, info = [], []
    for tasks, base in ((view.local_tasks, 0), *((s.tasks, n) for s in view.stages)):
        if tasks.num_segments and tasks.q_rows.numel() and tasks.k_rows.numel():
            qi, ki = tasks.q_rows.to(dev), tasks.k_rows.to(dev) + base
            calls.append((q[qi], kv[ki, 0], kv[ki, 1], tasks.cu_q.to(dev), tasks.cu_k.to(dev), tasks.causal))
            lq, lk = _segments(tasks)
            info.append({"q": lq.tolist(), "k": lk.tolist(), "causal": bool(tasks.causal)})
    if not calls:
        return 0.0, []

    def fwd(c):
        return lambda: varlen_forward(c[0], c[1], c[2], c[3], c[4], causal=c[5], scale=d ** -0.5)

    def bwd(c):
        out, lse = fwd(c)()
        return lambda: varlen_backward(out, c[0], c[1], c[2], out, lse, c[3], c[4], causal=c[5], scale=d ** -0.5)

    for c, rec in zip(calls, info):
        rec["fwd_s"] = median_time(fwd(c), reps)
        rec["bwd_s"] = median_time(bwd(c), reps)
    return sum(r["fwd_s"] + r["bwd_s"] for r in info), info


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
    from hf_fcp.engine.attention import fcp_attention

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
    """``strategy``: fcp (default planner: balances kernel work), fcp-pairs (balances pairs), ring."""
    name, _, balance = strategy.partition("-")
    plan = plan_batch(lens, world_size=world, block_size=args.block, strategy=name,
                      kv_heads=model.num_kv_heads, head_dim=model.head_dim, kv_dtype="bf16",
                      rounds_per_stage=args.rounds_per_stage, balance=balance or "kernel")
    measured, predicted, calls = [], [], []
    for r in range(world):
        view = plan.for_rank(r)
        seconds, info = replay(view, model, args.reps)
        measured.append(seconds)
        calls.append(info)
        predicted.append(predict(view, model, cluster))
    pairs = plan.rank_loads()["cost"]
    m, p = np.array(measured), np.array(predicted)
    return {"world": world, "strategy": strategy, "max_ms": m.max() * 1e3, "mean_ms": m.mean() * 1e3,
            "imbalance_time": m.max() / m.mean() - 1, "model_max_ms": p.max() * 1e3,
            "model_error": p.max() / m.max() - 1, "model_imbalance": p.max() / p.mean() - 1,
            "model_rank_error_rms": float(np.sqrt(np.mean((p / m - 1) ** 2))),
            "imbalance_pairs": pairs.max() / pairs.mean() - 1, "rank_calls": calls}


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
    ap.add_argument("--strategies", default="fcp,ring",
                    help="comma-separated: fcp (balances kernel work), fcp-pairs (balances pairs), ring")
    ap.add_argument("--skip-world1", action="store_true", help="skip the world-size-1 overhead measurement")
    ap.add_argument("--json", default=None, help="also write the rows (with every timed call) to this file")
    args = ap.parse_args(argv)
    model, cluster = get_model(args.model), load_cluster(args.cluster)
    rows = []
    print(f"{'W':>4} {'strategy':>8} {'max ms':>8} {'mean ms':>8} {'imb time':>9} {'imb pairs':>9} "
          f"{'model max':>9} {'model err':>9} {'model imb':>9} {'rank err':>8}")
    for world in (int(w) for w in args.worlds.split(",")):
        lens = make_batches(parse_distribution(args.distribution), world_size=world,
                            tokens_per_rank=args.tokens_per_rank, steps=1, seed=0)[0]
        strategies = args.strategies.split(",")
        for strategy in strategies:
            row = run_one(lens, world, strategy, args, model, cluster)
            rows.append(row)
            print(f"{world:>4} {strategy:>8} {row['max_ms']:>8.2f} {row['mean_ms']:>8.2f} "
                  f"{row['imbalance_time']:>9.1%} {row['imbalance_pairs']:>9.1%} {row['model_max_ms']:>9.2f} "
                  f"{row['model_error']:>+9.1%} {row['model_imbalance']:>9.1%} {row['model_rank_error_rms']:>8.1%}",
                  flush=True)
        mine = {r["strategy"]: r["max_ms"] for r in rows if r["world"] == world}
        for other in ("ring", "fcp-pairs"):
            if "fcp" in mine and other in mine:
                print(f"{world:>4} fcp/{other} slowest-rank kernel time: {mine['fcp'] / mine[other]:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:  # written before the world-1 step, so a timeout keeps the rows
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                       "rows": rows}, fh)
    if args.skip_world1:
        return 0
    lens = make_batches(parse_distribution(args.distribution), world_size=1, tokens_per_rank=args.tokens_per_rank,
                        steps=1, seed=1)[0]
    t_fcp, t_bare = world1_overhead(lens, model, args.block, max(args.reps, 5))
    print(f"W=1, {len(lens)} sequences, {sum(lens)} tokens: fcp_attention {t_fcp * 1e3:.2f} ms, bare kernel "
          f"{t_bare * 1e3:.2f} ms, overhead {t_fcp / t_bare - 1:+.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                       "rows": rows, "world1_fcp_s": t_fcp, "world1_bare_s": t_bare}, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
