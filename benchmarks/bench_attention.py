"""Benchmark of the FCP attention engine on CPU (gloo): prints figures, asserts nothing.

For W in --worlds, on mixed lognormal-like batches (lengths ~ lognormal(mu, sigma) clipped to half the
batch, filled to W × tokens_per_rank), it runs forward+backward of

* ``fcp``        fcp placement, hf_fcp.fcp_attention (P2P rounds), executed as the plan decides
* ``fcp_split``  the same op with every sequence run split and overlapped (the previous release)
* ``ring_attn``  zigzag placement, the classic ring-attention baseline (hf_fcp.baselines.ring_attention)
* ``allgather``  contiguous shards, all-gather traffic through hf_fcp.fcp_attention
* ``ring_p2p``   zigzag placement through hf_fcp.fcp_attention (ring traffic pattern, FCP engine)

and reports the median step time (per step, the slowest rank), the K/V bytes actually sent (counted in
hf_fcp.engine.comm) against ``plan.stats()['comm_bytes']``, and the peak resident memory of a step per rank
(Linux VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before the step: everything
the step allocated, torch tensors included; glibc is told to mmap every block ≥ 64 KiB so that freed
tensors leave RSS at once). Then W=1: fcp_attention against the bare varlen kernels on
the same packed batch (the engine's overhead).

    python benchmarks/bench_attention.py            # defaults: W=2,4; 2048 tokens/rank, block 256, 3 batches
    python benchmarks/bench_attention.py --write    # and the table in docs/performance.md
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import numpy as np
import torch

from hf_fcp import plan_batch
from hf_fcp.testing import run_workers
from hf_fcp.testing.markers import replace_block, table
from hf_fcp.workloads import Distribution, make_batch

METHODS = {  # name -> (placement strategy, attention op, planner settings)
    "fcp": ("fcp", "fcp", {}),
    "fcp_split": ("fcp", "fcp", {"fusion": "none", "overlap": "always"}),  # the previous release's execution
    "ring_attn": ("ring", "ring", {"fusion": "none", "overlap": "always"}),
    "allgather": ("allgather", "fcp", {}),
    "ring_p2p": ("ring", "fcp", {}),
}


def lognormal_batch(budget: int, mu: float, sigma: float, seed: int, max_len: int) -> list[int]:
    """Sequence lengths ~ lognormal(mu, sigma) up to ``max_len`` (hf_fcp.workloads), filled to exactly
    ``budget`` tokens (the last one is cut to fit)."""
    dist = Distribution(name="bench", kind="lognormal", mu=mu, sigma=sigma, max_len=max_len)
    return make_batch(dist, budget, np.random.default_rng(seed))


def _mem_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def _inputs(n, args, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, args.hq, args.d, generator=gen)
    k, v = (torch.randn(n, args.hkv, args.d, generator=gen) for _ in range(2))
    return q, k, v, torch.randn(n, args.hq, args.d, generator=gen)


def _plan(lens, world, strategy, args, **settings):
    return plan_batch(lens, world_size=world, block_size=args.block, strategy=strategy, kv_heads=args.hkv,
                      head_dim=args.d, kv_dtype="fp32", rounds_per_stage=args.rounds_per_stage, **settings)


def kernel_calls(view, op_name: str) -> tuple[int, int]:
    """(varlen kernel calls, segments) of one forward + backward on this rank's view."""
    if op_name == "ring":
        from hf_fcp.baselines.ring_attention import _local_step, _step_tasks, _zigzag_check

        layout: list = []
        _zigzag_check(view, layout)
        lists = _step_tasks(view, layout[0]) if view.world_size > 1 else [_local_step(view)]
    else:
        lists = [view.local_tasks] + [t for st in view.stages for t in (st.tasks, st.fused)]
    used = [t for t in lists if t.num_segments]
    return 2 * len(used), 2 * sum(t.num_segments for t in used)


def _op(name):
    from hf_fcp.baselines import ring_attention
    from hf_fcp.engine.attention import fcp_attention

    return fcp_attention if name == "fcp" else ring_attention


def _step(op, view, x, track=False):
    """One fwd+bwd; returns (seconds, bytes sent by kind, peak KiB above the step's start, CPU seconds of
    this process during the step)."""
    import torch.distributed as dist

    from hf_fcp.engine import comm

    q, k, v, dout = (t.clone().requires_grad_(i < 3) for i, t in enumerate(x))
    dist.barrier()
    rss0 = _mem_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    with comm.track_comm() as counter:
        t0, c0 = time.perf_counter(), time.process_time()
        op(q, k, v, view).backward(dout)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dt, dict(counter.by_tag), _mem_kib("VmHWM") - rss0, cpu


def _worker(rank, world, batches, args):
    """Per (method, batch): step times, bytes sent in one step, peak KiB (max over steps). Methods run
    interleaved step by step, so a change in background load hits them alike."""
    out = {}
    for b, lens in enumerate(batches):
        full = _inputs(sum(lens), args, seed=b)
        runs = {}
        for name, (strategy, op_name, settings) in METHODS.items():
            view = _plan(lens, world, strategy, args, **settings).for_rank(rank)
            runs[name] = (_op(op_name), view, [t[view.token_index] for t in full])
            out[name, b, "calls"] = kernel_calls(view, op_name)
            _step(*runs[name])  # warm-up (also the plan agreement check)
        steps = {name: [] for name in METHODS}
        for _ in range(args.iters):
            for name in METHODS:
                steps[name].append(_step(*runs[name]))
        for name, res in steps.items():
            out[name, b] = ([r[0] for r in res], res[0][1], max(r[2] for r in res), [r[3] for r in res])
    return out


def bench_world(world, args) -> list[list]:
    """Runs every method at world size ``world``, prints its figures and returns the table's rows."""
    budget = world * args.tokens_per_rank
    batches = [lognormal_batch(budget, args.mu, args.sigma, seed=100 * world + i, max_len=budget // 2)
               for i in range(args.batches)]
    t0 = time.perf_counter()
    per_rank = run_workers(_worker, world, batches, args, timeout=args.timeout)
    print(f"\n## W={world}: {args.batches} batches of {world * args.tokens_per_rank} tokens, block "
          f"{args.block}, Hq/Hkv/D = {args.hq}/{args.hkv}/{args.d}, fp32 ({time.perf_counter() - t0:.0f} s)")
    for b, lens in enumerate(batches):
        print(f"batch {b}: {len(lens)} sequences, longest {max(lens)}, top-5 lengths {sorted(lens)[-5:]}")
    print(f"{'method':10} {'median ms':>10} {'vs fcp':>7} {'kv MB sent':>11} {'plan MB':>9} {'grad MB':>8} "
          f"{'peak MiB/rank':>14} {'imbalance':>9} {'CPU ms (sum)':>12} {'CPU ms (max)':>12} {'calls/rank':>10} "
          f"{'segs/rank':>9}")
    medians, rows = {}, []
    for name, (strategy, _, settings) in METHODS.items():
        times, sent, plan_b, grad, peak, imb, cpu_sum, cpu_max = [], 0, 0, 0, 0, 0.0, [], []
        calls = [r[name, b, "calls"] for r in per_rank for b in range(len(batches))]
        for b, lens in enumerate(batches):
            steps = [max(r[name, b][0][i] for r in per_rank) for i in range(args.iters)]
            times.append(statistics.median(steps))
            cpu = [statistics.median(r[name, b][3]) for r in per_rank]  # per rank: median over steps
            cpu_sum.append(sum(cpu))
            cpu_max.append(max(cpu))
            sent += sum(r[name, b][1].get("kv", 0) for r in per_rank)
            grad += sum(r[name, b][1].get("grad", 0) for r in per_rank)
            peak = max(peak, max(r[name, b][2] for r in per_rank))
            stats = _plan(lens, world, strategy, args, **settings).stats()
            plan_b += stats["comm_bytes"]
            imb = max(imb, stats["compute_imbalance"])
        medians[name] = sum(times)
        ratio = medians[name] / medians["fcp"]
        print(f"{name:10} {1e3 * medians[name] / len(batches):10.1f} {ratio:6.2f}x {sent / 1e6:11.2f} "
              f"{plan_b / 1e6:9.2f} {grad / 1e6:8.2f} {peak / 1024:14.1f} {imb:9.3f} "
              f"{1e3 * statistics.mean(cpu_sum):12.1f} {1e3 * statistics.mean(cpu_max):12.1f} "
              f"{statistics.mean(c for c, _ in calls):10.1f} {statistics.mean(g for _, g in calls):9.1f}")
        rows.append([world, name, f"{1e3 * medians[name] / len(batches):.1f}", f"{1e3 * statistics.mean(cpu_max):.1f}",
                     f"{statistics.mean(c for c, _ in calls):.1f}", f"{statistics.mean(g for _, g in calls):.1f}",
                     f"{sent / 1e6:.2f}", f"{plan_b / 1e6:.2f}"])
    print("median ms: mean over batches of the median (over steps) of the slowest rank's fwd+bwd; kv MB: "
          "K/V bytes sent by all ranks in one step (ring_attn re-rotates K/V in backward: 2(W-1) blocks); "
          "plan MB: plan.stats()['comm_bytes'] (forward K/V); grad MB: dK/dV bytes sent; imbalance: plan "
          "compute imbalance (max/mean - 1); CPU ms: process CPU time of a fwd+bwd (median over steps), summed "
          "over ranks (total work, independent of how the ranks share the cores) and of the busiest rank (its "
          "work, what the step would take with a core per rank and no waits), mean over batches; calls/rank, "
          "segs/rank: varlen kernel calls and attention segments of one forward + backward per rank per layer")
    return rows


def bench_world1(args):
    """fcp_attention (W=1, no process group) vs varlen_forward + varlen_backward on one packed batch."""
    from hf_fcp.engine.attention import fcp_attention
    from hf_fcp.engine.kernels import varlen_backward, varlen_forward

    torch.set_num_threads(args.threads_w1)
    lens = lognormal_batch(args.tokens_w1, args.mu, args.sigma, seed=7, max_len=args.tokens_w1 // 2)
    view = _plan(lens, 1, "fcp", args).for_rank(0)
    assert torch.equal(view.token_index, torch.arange(sum(lens)))
    q, k, v, dout = _inputs(sum(lens), args, seed=0)
    cu = torch.tensor([0, *np.cumsum(lens).tolist()])
    scale = args.d ** -0.5

    def bare():
        out, lse = varlen_forward(q, k, v, cu, cu, causal=True, scale=scale)
        varlen_backward(dout, q, k, v, out, lse, cu, cu, causal=True, scale=scale)

    def engine():
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        fcp_attention(*xs, view).backward(dout)

    timings = {"bare": [], "fcp": []}
    for i in range(args.iters_w1 + 2):  # interleaved, the first two rounds discarded (warm-up)
        for name, fn in (("bare", bare), ("fcp", engine)):
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                timings[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in timings.items()}
    best = {n: min(t) for n, t in timings.items()}
    print(f"\n## W=1 overhead: {len(lens)} sequences, {sum(lens)} tokens (longest {max(lens)}), "
          f"{args.threads_w1} threads, fwd+bwd over {len(timings['bare'])} interleaved steps")
    for what, t in (("median", med), ("min", best)):
        print(f"{what:6}: bare kernels {1e3 * t['bare']:.1f} ms, fcp_attention {1e3 * t['fcp']:.1f} ms, "
              f"overhead {100 * (t['fcp'] / t['bare'] - 1):+.1f}%")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens-per-rank", type=int, default=2048)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--mu", type=float, default=6.35)
    p.add_argument("--sigma", type=float, default=2.34)
    p.add_argument("--hq", type=int, default=8)
    p.add_argument("--hkv", type=int, default=2)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--rounds-per-stage", type=int, default=1)
    p.add_argument("--tokens-w1", type=int, default=8192)
    p.add_argument("--threads-w1", type=int, default=2)
    p.add_argument("--iters-w1", type=int, default=10)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks (peak RSS)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; gloo loopback, 1 thread per rank"
          + (" (W > CPUs: ranks oversubscribe the cores)" if max(args.worlds) > (os.cpu_count() or 1) else ""))
    rows = [row for world in args.worlds for row in bench_world(world, args)]
    bench_world1(args)
    if args.write:
        replace_block("docs/performance.md", "attention", "benchmarks/bench_attention.py", table(
            ["W", "method", "median ms", "CPU ms (max)", "kernel calls / rank", "segments / rank", "K/V MB sent",
             "plan's prediction MB"], rows, "rlrrrrrr"))


if __name__ == "__main__":
    main()
