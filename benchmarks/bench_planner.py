"""Planner benchmark (prints figures; not a test).

For each workload and world size: fcp's compute imbalance (modelled kernel work, what the planner balances
by default), its imbalance in causal pairs and in memory, KV bytes moved by fcp vs ``ring``
and ``allgather`` (Llama-3-70B KV: 8 kv heads, head dim 128, bf16), rounds, and plan time (median of
``--repeats`` runs). Batches fill world_size × tokens_per_rank tokens exactly (the weak-scaling setting).

    python benchmarks/bench_planner.py                       # W = 8, 64, 256; 32768 tokens/rank
    python benchmarks/bench_planner.py --world-sizes 8 --repeats 3    # workloads: hf_fcp.simulate.workloads
    python benchmarks/bench_planner.py --world-sizes 8,64,256 --seeds 2 --write   # and docs/performance.md
    python benchmarks/bench_planner.py --world-sizes 256 --machine llama3-70b     # the simulator's settings
"""

from __future__ import annotations

import argparse
import statistics
import sys

from hf_fcp import plan_batch
from hf_fcp.testing.markers import replace_block, table
from hf_fcp.workloads import make_batches, parse_distribution

WORKLOADS = {  # hf_fcp.simulate.workloads specs (see its docstring)
    "lognormal(6.35,2.34,512K)": "paper",
    "lognormal(6.35,1.5,512K)": "lognormal:6.35,1.5,524288",
    "bimodal(0.5-2K + 64-512K)": "bimodal",
    "stdlib .py files": "stdlib",
}


def batches(spec: str, world: int, tpr: int, seeds: int) -> list[list[int]]:
    return make_batches(parse_distribution(spec), world_size=world, tokens_per_rank=tpr, steps=seeds, seed=0)


def machine(model: str | None, world: int) -> dict:
    """Planner settings of the simulator for ``model`` on the h200 preset (kernel, link, node, stages), as
    ``benchmarks/scale.py`` plans; {} (the defaults) for None."""
    if model is None:
        return {}
    from hf_fcp.simulate import get_model, load_cluster
    from hf_fcp.simulate.engine import STAGES, planner_model

    return {**planner_model(get_model(model), load_cluster("h200"), world), "max_stages": STAGES}


def measure(lens, world, tpr, block, repeats, options=None):
    times, plan = [], None
    for _ in range(repeats):
        plan = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=tpr, **(options or {}))
        times.append(plan.plan_ms)
    st = plan.stats()
    ring = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=tpr, strategy="ring").stats()
    ag = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=tpr, strategy="allgather").stats()
    return {"seqs": len(lens), "ci": st["compute_imbalance"], "pi": st["pairs_imbalance"], "mi": st["memory_imbalance"],
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
    ap.add_argument("--write", action="store_true", help="write the table into docs/performance.md (block 'planner')")
    ap.add_argument("--machine", metavar="MODEL", help="plan fcp with the simulator's settings for MODEL "
                    "(e.g. llama3-70b, h200 preset) instead of the defaults; not with --write")
    args = ap.parse_args(argv)
    if args.machine and args.write:
        ap.error("--write records the default settings' table; leave out --machine")
    rows = []
    print(f"{'workload':<27} {'W':>4} {'seqs':>5} {'comp.imb':>9} {'pairs.imb':>9} {'mem.imb':>8} {'fcp GB':>8} "
          f"{'ring/fcp':>9} {'ag/fcp':>7} {'rounds':>6} {'plan ms':>8} {'(max)':>7}")
    for name, spec in WORKLOADS.items():
        for world in [int(w) for w in args.world_sizes.split(",")]:
            cell = []
            for lens in batches(spec, world, args.tokens_per_rank, args.seeds):
                r = measure(lens, world, args.tokens_per_rank, args.block_size, args.repeats,
                            machine(args.machine, world))
                cell.append(r)
                print(f"{name:<27} {world:>4} {r['seqs']:>5} {r['ci']:>8.2%} {r['pi']:>8.2%} {r['mi']:>7.2%} "
                      f"{r['gb']:>8.2f} {r['ring_x']:>8.1f}x {r['ag_x']:>6.1f}x {r['rounds']:>6} {r['ms']:>8.1f} "
                      f"{r['ms_max']:>7.1f}",
                      flush=True)
            rows.append(table_row(name, world, cell))
    if args.write:
        replace_block("docs/performance.md", "planner", "benchmarks/bench_planner.py", table(
            ["workload", "W", "compute imbalance", "pairs imbalance", "memory imbalance", "fcp K/V moved",
             "ring / fcp bytes", "rounds", "plan ms"], rows))
    return 0


def span(values, fmt: str, unit: str = "") -> str:
    """``lo–hi`` over a cell's batches (one value when they agree at this precision)."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"


def table_row(name: str, world: int, cell: list[dict]) -> list:
    def col(key):
        return [r[key] for r in cell]

    return [name, world, span(col("ci"), ".2%"), span(col("pi"), ".1%"), span(col("mi"), ".2%"),
            span(col("gb"), ".3g", " GB"), span(col("ring_x"), ".1f", "×"), span(col("rounds"), "d"),
            span(col("ms"), ".1f")]


if __name__ == "__main__":
    sys.exit(main())
