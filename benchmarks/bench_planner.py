"""Planner benchmark (prints figures; not a test).

For each workload and world size: fcp's compute and memory imbalance, KV bytes moved by fcp vs ``ring``
and ``allgather`` (Llama-3-70B KV: 8 kv heads, head dim 128, bf16), rounds, and plan time (median of
``--repeats`` runs). Batches fill world_size × tokens_per_rank tokens exactly (the weak-scaling setting).

    python benchmarks/bench_planner.py                       # W = 8, 64, 256; 32768 tokens/rank
    python benchmarks/bench_planner.py --world-sizes 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
from pathlib import Path

import numpy as np

from hf_fcp import plan_batch


def lognormal(world, tpr, seed, mu=6.35, sigma=2.34, max_len=524288):
    rng = np.random.default_rng(seed)
    budget, lens = world * tpr, []
    while budget > 0:
        n = int(min(max(1, round(rng.lognormal(mu, sigma))), max_len, budget))
        lens.append(n)
        budget -= n
    return lens


def bimodal(world, tpr, seed):
    """Many 0.5–2K documents plus a few 64–512K ones (about 40% of tokens in the long mode)."""
    rng = np.random.default_rng(seed)
    budget, lens = world * tpr, []
    while budget > 0:
        n = int(rng.integers(65536, 524289)) if rng.random() < 0.004 else int(rng.integers(512, 2049))
        n = min(n, budget)
        lens.append(n)
        budget -= n
    return lens


def stdlib_files(world, tpr, seed):
    """Real lengths: Python standard library source files, ~4 bytes per token, shuffled, to fill."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sizes = [max(1, p.stat().st_size // 4) for p in sorted(root.rglob("*.py"))]
    rng = np.random.default_rng(seed)
    budget, lens = world * tpr, []
    while budget > 0:
        for i in rng.permutation(len(sizes)):
            n = min(sizes[i], budget)
            lens.append(n)
            budget -= n
            if budget == 0:
                break
    return lens


WORKLOADS = {
    "lognormal(6.35,2.34,512K)": lognormal,
    "lognormal(6.35,1.5,512K)": lambda w, t, s: lognormal(w, t, s, sigma=1.5),
    "bimodal(0.5-2K + 64-512K)": bimodal,
    "stdlib .py files": stdlib_files,
}


def measure(lens, world, tpr, block, repeats):
    times, plan = [], None
    for _ in range(repeats):
        plan = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=tpr)
        times.append(plan.plan_ms)
    st = plan.stats()
    ring = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=tpr, strategy="ring").stats()
    ag = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=tpr, strategy="allgather").stats()
    return {"seqs": len(lens), "ci": st["compute_imbalance"], "mi": st["memory_imbalance"],
            "gb": st["comm_bytes"] / 1e9, "ring_x": ring["comm_bytes"] / max(st["comm_bytes"], 1),
            "ag_x": ag["comm_bytes"] / max(st["comm_bytes"], 1), "rounds": st["rounds"],
            "ms": statistics.median(times), "ms_max": max(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", default="8,64,256")
    ap.add_argument("--tokens-per-rank", type=int, default=32768)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3, help="batches per (workload, world size)")
    args = ap.parse_args(argv)
    print(f"{'workload':<27} {'W':>4} {'seqs':>5} {'comp.imb':>9} {'mem.imb':>8} {'fcp GB':>8} "
          f"{'ring/fcp':>9} {'ag/fcp':>7} {'rounds':>6} {'plan ms':>8} {'(max)':>7}")
    for name, make in WORKLOADS.items():
        for world in [int(w) for w in args.world_sizes.split(",")]:
            for seed in range(args.seeds):
                lens = make(world, args.tokens_per_rank, seed)
                r = measure(lens, world, args.tokens_per_rank, args.block_size, args.repeats)
                print(f"{name:<27} {world:>4} {r['seqs']:>5} {r['ci']:>8.2%} {r['mi']:>7.2%} {r['gb']:>8.2f} "
                      f"{r['ring_x']:>8.1f}x {r['ag_x']:>6.1f}x {r['rounds']:>6} {r['ms']:>8.1f} {r['ms_max']:>7.1f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
