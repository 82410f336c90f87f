"""Sliding-window models: K/V bytes each kind of layer moves, against full causal attention of the same
batch (prints figures; asserts nothing).

For the layer mixes of popular sliding-window models (the window and the number of full / sliding layers
as their configs give them), fcp plans lognormal and stdlib batches at W = 2, 3 and 8 with 32K tokens per
rank; per batch the bytes a full-attention layer moves (``plan.stats().comm_bytes``) and a sliding layer
(``plan.for_window(w).stats().comm_bytes``), their ratio, the whole model's bytes per step against a model
whose layers are all full, and the modelled compute imbalance and plan time of the mixed plan::

    python benchmarks/window_traffic.py            # ~1 min on 2 cores
    python benchmarks/window_traffic.py --write    # and the table in docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from hf_fcp import plan_batch
from hf_fcp.testing.markers import replace_block, table
from hf_fcp.workloads import make_batch, parse_distribution

MODELS = {  # name: attention_layers as transformers' configs give them (layer_types, sliding_window)
    "mistral-7b (all 4096)": ((4096, 32),),
    "gemma-3 (5:1, 1024)": ((1024, 40), (None, 8)),
    "gpt-oss (1:1, 128)": ((128, 18), (None, 18)),
    "cohere2 (3:1, 4096)": ((4096, 30), (None, 10)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="batches per cell (median reported)")
    parser.add_argument("--tokens-per-rank", type=int, default=32768)
    parser.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()
    out = []
    print(f"{'model':<24}{'dist':<11}{'W':>3}{'full MB':>10}{'window MB':>11}{'full/win':>9}"
          f"{'model bytes vs all-full':>24}{'imbalance':>11}{'plan ms':>9}")
    for name, layers in MODELS.items():
        for dist in ("lognormal", "stdlib"):
            for world in (2, 3, 8):
                rows = [_cell(layers, dist, world, args.tokens_per_rank, step) for step in range(args.steps)]
                med = [statistics.median(col) for col in zip(*rows)]
                print(f"{name:<24}{dist:<11}{world:>3}{med[0] / 1e6:>10.1f}{med[1] / 1e6:>11.2f}"
                      f"{med[0] / max(med[1], 1):>9.1f}{med[2]:>24.2f}{med[3]:>10.2%}{med[4]:>9.0f}")
                out.append([name, dist, world, f"{med[0] / 1e6:.1f}", f"{med[1] / 1e6:.1f}",
                            f"{med[0] / max(med[1], 1):.1f}", f"{med[2]:.2f}"])
    if args.write:
        replace_block("docs/performance.md", "window-traffic", "benchmarks/window_traffic.py", table(
            ["layer mix (window)", "workload", "W", "full layer MB", "sliding layer MB", "full / sliding",
             "model bytes vs all layers full"], out, "llrrrrr"))


def _cell(layers, dist: str, world: int, tpr: int, step: int) -> tuple[float, ...]:
    lens = make_batch(parse_distribution(dist), world * tpr, np.random.default_rng([step, world]))
    t0 = time.perf_counter()
    plan = plan_batch(lens, world_size=world, block_size=4096, tokens_per_rank=tpr, attention_layers=layers,
                      kv_heads=8, head_dim=128, kv_dtype="bf16")
    ms = (time.perf_counter() - t0) * 1e3
    full = plan.stats().comm_bytes
    windows = {w: plan.for_window(w).stats().comm_bytes for w, _ in layers if w}
    model = sum(n * (full if w is None else windows[w]) for w, n in layers)
    all_full = plan_batch(lens, world_size=world, block_size=4096, tokens_per_rank=tpr, kv_heads=8, head_dim=128,
                          kv_dtype="bf16").stats().comm_bytes * sum(n for _, n in layers)
    smallest = min(windows.values())
    return full, smallest, model / max(all_full, 1), plan.stats().compute_imbalance, ms


if __name__ == "__main__":
    main()
