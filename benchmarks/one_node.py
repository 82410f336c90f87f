"""One node first: fcp against every baseline at 8 GPUs, against the one-GPU ceiling, and the planner
against its simple alternatives (prints figures; asserts nothing).

1. Simulator (``h200`` preset: the kernel measured on an H200; CP sizes chosen per batch in hindsight),
   W=8, Llama-3-8B and -70B heads, 8K and 32K tokens per GPU, lognormal and stdlib workloads: attention
   MFU of fcp, of the best other strategy, and of ``ideal`` (the same batches on one modelled GPU: whole
   documents, one kernel per document, no communication).
2. Planner at W = 2, 4, 8 and 2K / 8K / 32K tokens per rank, block = min(4096, T/4): batches of one
   document, three long documents, lognormal and stdlib documents filling the budget exactly. fcp's
   modelled kernel-work imbalance next to the zigzag placement's (``strategy="ring"``) of the same batch,
   both as the engine runs them, and each one's busiest rank over the ideal mean (whole documents).
3. With ``--scale``: fcp / ring at 16, 64 and 256 GPUs (32K tokens per GPU, Llama-3-70B heads).

    python benchmarks/one_node.py            # parts 1 and 2, ~1 min
    python benchmarks/one_node.py --scale    # and part 3, several more minutes
    python benchmarks/one_node.py --free-exchange   # part 1 with communication free (the kernels' ceiling)
    python benchmarks/one_node.py --write    # parts 1 and 2, and their tables in docs/performance.md + README
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import numpy as np

from hf_fcp import plan_batch
from hf_fcp.plan.cost import FLASH, segment_cost
from hf_fcp.plan.fcp_plan import imbalance
from hf_fcp.simulate import SimSettings, get_model, load_cluster, parse_distribution, run
from hf_fcp.testing.markers import replace_block, table
from hf_fcp.workloads import make_batch

SCRIPT = "benchmarks/one_node.py"

OTHERS = ("ring", "allgather", "bytescale", "wlb", "magi", "packing")


def simulator_cells(steps: int, free_exchange: bool = False) -> list[list[str]]:
    """Part 1; returns the table's rows (workload, model, tokens/GPU, fcp MFU, ideal, of ideal, best other, ratio)."""
    cluster = load_cluster("h200")
    if free_exchange:  # what the placements' kernels alone reach: NVLink at 10^16 B/s, no latency to speak of
        cluster = replace(cluster, nvlink_bw=1e16, nvlink_latency=1e-12)
    print(f"## 1. Simulator, W=8, h200{' with a free exchange' if free_exchange else ''}, --cp-size best")
    print(f"{'workload':<10}{'model':<12}{'T':>6}{'fcp MFU':>9}{'ideal':>8}{'of ideal':>10}"
          f"{'best other':>20}{'fcp/best':>10}{'fcp imb':>9}")
    out = []
    for dist in ("lognormal", "stdlib"):
        for model in ("llama3-8b", "llama3-70b"):
            for tpr in (8192, 32768):
                rep = run(SimSettings(distribution=parse_distribution(dist), model=get_model(model),
                                      cluster=cluster, world_sizes=(8,), tokens_per_rank=tpr,
                                      steps=steps, cp_size="best", strategies=("fcp", *OTHERS)), progress=False)
                rows = {r.strategy: r for r in rep.rows}
                best = max((r for n, r in rows.items() if n in OTHERS), key=lambda r: r.attention_mfu)
                fcp = rows["fcp"]
                print(f"{dist:<10}{model:<12}{tpr:>6}{fcp.attention_mfu:>9.1%}{rows['ideal'].attention_mfu:>8.1%}"
                      f"{fcp.of_ideal:>10.1%}{best.strategy:>12} {best.attention_mfu:>6.1%}"
                      f"{fcp.attention_mfu / best.attention_mfu:>9.3f}x{fcp.compute_imbalance:>9.2%}", flush=True)
                out.append([dist, model, f"{tpr // 1024}K", f"{fcp.attention_mfu:.1%}",
                            f"{rows['ideal'].attention_mfu:.1%}", f"{fcp.of_ideal:.1%}",
                            f"{best.strategy} {best.attention_mfu:.1%}",
                            f"{fcp.attention_mfu / best.attention_mfu:.3f}×"])
    return out


def planner_batches(world: int, tpr: int) -> dict[str, list[int]]:
    rng = np.random.default_rng([world, tpr])
    total = world * tpr
    return {"one document": [total], "three long": [total // 3, total // 3, total - 2 * (total // 3)],
            "lognormal": make_batch(parse_distribution("paper"), total, rng),
            "stdlib files": make_batch(parse_distribution("stdlib"), total, rng)}


def planner_grid(repeats: int) -> list[list[str]]:
    """Part 2; returns the table's rows."""
    print("\n## 2. Planner vs zigzag, kernel-model work as the engine runs each plan")
    print(f"{'W':>2}{'T':>6}  {'batch':<13}{'fcp imb':>9}{'zigzag imb':>11}{'fcp max/ideal':>14}"
          f"{'zigzag max/ideal':>17}{'plan ms':>9}")
    worse, out = 0, []
    for world in (2, 4, 8):
        for tpr in (2048, 8192, 32768):
            for name, lens in planner_batches(world, tpr).items():
                block = min(4096, tpr // 4)
                times = []
                for _ in range(repeats):
                    plan = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=tpr)
                    times.append(plan.plan_ms)
                ring = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=tpr, strategy="ring")
                ideal = sum(segment_cost(n, n, True, FLASH) for n in lens) / world
                w, z = plan.rank_loads().work, ring.rank_loads().work
                worse += imbalance(w) > imbalance(z) + 0.0025
                print(f"{world:>2}{tpr:>6}  {name:<13}{imbalance(w):>9.2%}{imbalance(z):>11.2%}"
                      f"{w.max() / ideal:>14.3f}{z.max() / ideal:>17.3f}{statistics.median(times):>9.1f}", flush=True)
                out.append([world, f"{tpr // 1024}K", name, f"{imbalance(w):.2%}", f"{imbalance(z):.2%}",
                            f"{w.max() / ideal:.3f}", f"{z.max() / ideal:.3f}", f"{statistics.median(times):.1f}"])
    print(f"batches where fcp's imbalance is more than 0.25 points above zigzag's: {worse} of 36")
    return out


def scale(steps: int) -> None:
    print("\n## 3. Scale: fcp / ring, 32K tokens per GPU, Llama-3-70B heads, h200")
    for dist in ("lognormal", "stdlib"):
        rep = run(SimSettings(distribution=parse_distribution(dist), model=get_model("llama3-70b"),
                              cluster=load_cluster("h200"), world_sizes=(16, 64, 256), tokens_per_rank=32768,
                              steps=steps), progress=False)
        for w in (16, 64, 256):
            rows = {r.strategy: r for r in rep.rows if r.world_size == w}
            best = max((r for n, r in rows.items() if n in OTHERS), key=lambda r: r.attention_mfu)
            print(f"{dist:<10} W={w:<4} fcp {rows['fcp'].attention_mfu:.1%}  fcp/ring "
                  f"{rows['fcp'].attention_mfu / rows['ring'].attention_mfu:.2f}x  best other {best.strategy} "
                  f"{best.attention_mfu:.1%}  fcp imbalance {rows['fcp'].compute_imbalance:.2%}", flush=True)


def write_tables(cells: list[list[str]], grid: list[list[str]]) -> None:
    replace_block("docs/performance.md", "one-node", SCRIPT, table(
        ["workload", "model", "tokens/GPU", "fcp MFU", "ideal", "fcp of ideal", "best other", "fcp / best other"],
        cells, "lllrrrlr"))
    replace_block("README.md", "one-node-summary", SCRIPT, table(
        ["workload", "model", "tokens/GPU", "fcp of ideal", "best other (MFU)", "fcp / best other"],
        [[c[0], c[1], c[2], c[5], c[6], c[7]] for c in cells], "lllrlr"))
    replace_block("docs/performance.md", "one-node-planner", SCRIPT, table(
        ["W", "tokens/rank", "batch", "fcp imbalance", "zigzag imbalance", "fcp max / ideal", "zigzag max / ideal",
         "plan ms"], grid, "rrlrrrrr"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="simulated batches per cell (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="plan-time repeats (median; default 3)")
    ap.add_argument("--scale", action="store_true", help="also simulate 16, 64 and 256 GPUs")
    ap.add_argument("--free-exchange", action="store_true",
                    help="part 1 only, with communication free: what the placements' kernels alone reach")
    ap.add_argument("--write", action="store_true",
                    help="write the tables of parts 1 and 2 into docs/performance.md and the README's summary")
    args = ap.parse_args(argv)
    if args.write and args.free_exchange:
        ap.error("--write: the tables are of the real exchange; leave out --free-exchange")
    cells = simulator_cells(args.steps, args.free_exchange)
    if args.free_exchange:
        return 0
    grid = planner_grid(args.repeats)
    if args.write:
        write_tables(cells, grid)
    if args.scale:
        scale(args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
