"""Long randomized planner fuzzing (marked ``slow``; run with ``python -m pytest -m slow``).

Thousands of random batches — long-tailed, tiny, exact-fill and loose caps, every strategy — through
``plan_batch`` and the independent validator; a sample of ranks also through ``check_view``.
"""

import numpy as np
import pytest

from hf_fcp import plan_batch
from hf_fcp.plan.validate import check_plan, check_view

FUZZ_BATCHES = 3000


def random_batch(rng):
    world = int(rng.choice([1, 2, 3, 4, 5, 7, 8, 13, 16, 31, 64]))
    kind = rng.integers(4)
    if kind == 0:  # tiny sequences, tiny blocks
        lens = rng.integers(1, 20, size=int(rng.integers(1, 40))).tolist()
        block = int(rng.integers(1, 9))
    elif kind == 1:  # long-tailed
        lens = np.clip(rng.lognormal(4.0, 1.8, size=int(rng.integers(1, 60))), 1, 20000).astype(int).tolist()
        block = int(rng.choice([16, 64, 256, 1024]))
    elif kind == 2:  # one huge sequence plus dust
        lens = [int(rng.integers(1000, 50000))] + rng.integers(1, 50, size=int(rng.integers(0, 30))).tolist()
        block = int(rng.choice([32, 128, 4096]))
    else:  # fewer tokens than ranks
        lens = [1] * int(rng.integers(1, world + 1))
        block = 1
    total = sum(lens)
    even = -(-total // world)
    cap = None if rng.random() < 0.5 else even + int(rng.integers(0, 1 + even // 4))
    return lens, world, block, cap


@pytest.mark.slow
def test_fuzz_planner_against_validator():
    rng = np.random.default_rng(20261125)
    counts = {"fcp": 0, "ring": 0, "allgather": 0, "packing": 0, "packing_refused": 0, "views": 0}
    for i in range(FUZZ_BATCHES):
        lens, world, block, cap = random_batch(rng)
        strategy = ["fcp", "fcp", "ring", "allgather", "packing"][i % 5]
        try:
            plan = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=cap, strategy=strategy,
                              rounds_per_stage=int(rng.integers(1, 4)))
        except ValueError as e:
            assert strategy == "packing" and "packing" in str(e), (lens, world, block, cap, strategy, e)
            counts["packing_refused"] += 1
            continue
        check_plan(plan)
        counts[strategy] += 1
        if sum(lens) <= 3000 and i % 7 == 0:
            rank = int(rng.integers(world))
            check_view(plan, rank)
            counts["views"] += 1
    print("fuzzed:", counts)
    assert counts["fcp"] >= FUZZ_BATCHES * 0.39 and counts["views"] > 100
