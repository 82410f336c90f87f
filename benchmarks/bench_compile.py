"""torch.compile and the "fcp" attention: first-step (compile) time, steady step time, graphs and breaks.

The shipped ``fcp_attention_forward`` is wrapped in ``torch.compiler.disable``: one clean graph break per
attention layer, the FCP exchange eager. ``--trace-into`` registers the unwrapped function instead, so
dynamo traces into the plan and exchange code (the alternative the wrapper was chosen over). One process,
one thread, the tiny Llama (hidden 128, 4 layers) on 12 batches of 3 random documents of 50–1500 tokens::

    python benchmarks/bench_compile.py --backends eager aot_eager inductor
    python benchmarks/bench_compile.py --backends aot_eager --trace-into
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def measure(backend: str, steps: int, trace_into: bool) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AttentionInterface

    from hf_fcp.integrations.collator import FCPCollator
    from hf_fcp.integrations.transformers import fcp_attention_forward
    from hf_fcp.testing.models import tiny_model

    AttentionInterface.register("fcp", fcp_attention_forward.__wrapped__ if trace_into else fcp_attention_forward)
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("llama", "fcp", vocab_size=258, hidden_size=128, layers=4)
    step = model if backend == "eager" else torch.compile(model, backend=backend)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        docs = [{"input_ids": rng.integers(3, 258, n).tolist()} for n in rng.integers(50, 1500, size=3)]
        batch = FCPCollator(world_size=1, rank=0, block_size=512)(docs)
        start = time.perf_counter()
        step(**batch, use_cache=False).loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad()
    return {"backend": backend + (" (traced into)" if trace_into else ""), "first_s": times[0],
            "steady_s": statistics.median(times[4:]), "graphs": counters["stats"]["unique_graphs"],
            "breaks": sum(counters["graph_break"].values())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["eager", "aot_eager", "inductor"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--trace-into", action="store_true", help="no graph-break wrapper: dynamo traces FCP")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'backend':<28} {'first step s':>12} {'steady s/step':>13} {'graphs':>6} {'breaks':>6}")
    for backend in opts.backends:
        r = measure(backend, opts.steps, opts.trace_into)
        print(f"{r['backend']:<28} {r['first_s']:>12.2f} {r['steady_s']:>13.3f} {r['graphs']:>6} {r['breaks']:>6}")


if __name__ == "__main__":
    main()
