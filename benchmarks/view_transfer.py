"""What receiving a plan view from a DataLoader worker costs the training process (prints figures; not a test).

One rank's view of a simulated-cluster plan (llama3-70b heads, h200 link figures, 32K tokens per rank,
lognormal lengths) is sent by a DataLoader worker each step, three ways side by side: as FCP sends it
(:class:`hf_fcp.integrations.workers.WorkerCollate`: numpy arrays by value, row indices as runs of
consecutive rows), by value without runs, and as torch sends tensors (one shared-memory segment each). The
batch is ready before ``next()`` is called, so the time is the receipt alone.

    python benchmarks/view_transfer.py                      # W = 256, the busiest rank, 9 steps
    python benchmarks/view_transfer.py --world-size 64 --steps 15
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import numpy as np
from torch.utils.data import DataLoader

from hf_fcp import plan_batch
from hf_fcp.integrations import workers
from hf_fcp.simulate import get_model, load_cluster
from hf_fcp.simulate.engine import planner_model
from hf_fcp.workloads import make_batches, parse_distribution

TOKENS = 32768


class _Send:
    """collate_fn: the view, wrapped as one of the three ways (picklable for any start method)."""

    def __init__(self, view, way: str):
        self.view, self.way = view, way

    def __call__(self, _items):
        if self.way == "torch":
            return self.view
        if self.way == "by value, no runs":
            workers.RUNS_PER_VALUE = 1 << 62
        return workers._ByValue(self.view)


def receive_ms(view, way: str, steps: int) -> float:
    loader = DataLoader(range(steps + 1), batch_size=1, num_workers=1, collate_fn=_Send(view, way))
    it, times = iter(loader), []
    for _ in range(steps + 1):
        time.sleep(0.5)  # the worker has the batch ready
        t = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--rank", type=int, default=None, help="whose view (default: the rank that sends the most K/V)")
    args = ap.parse_args(argv)
    w = args.world_size
    lens = make_batches(parse_distribution("lognormal"), world_size=w, tokens_per_rank=TOKENS, steps=1, seed=0)[0]
    plan = plan_batch(lens, world_size=w, block_size=4096, tokens_per_rank=TOKENS, max_stages=16,
                      **planner_model(get_model("llama3-70b"), load_cluster("h200"), w))
    m = plan.message_array
    rank = int(np.argmax(np.bincount(m[:, 0], m[:, 2], w))) if args.rank is None else args.rank
    view = plan.for_rank(rank)
    print(f"W={w}, rank {rank}: view pickled {len(pickle.dumps(view)) / 1e6:.1f} MB, "
          f"as FCP sends it {len(pickle.dumps(workers._ByValue(view))) / 1e6:.2f} MB")
    for way in ("FCP (runs)", "by value, no runs", "torch"):
        print(f"  {way:<18} receive {receive_ms(view, way, args.steps):7.1f} ms (median of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
