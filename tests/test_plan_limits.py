"""Sizes no machine can plan are refused at once, before anything is allocated, with a ValueError naming the
value and the limit; the largest accepted batches plan in bounded time and memory (docs/planner.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from hf_fcp import plan_batch
from hf_fcp.plan.checks import MAX_BLOCKS_PER_RANK, MAX_TOKENS_PER_RANK, MAX_WORLD_SIZE
from hf_fcp.testing.markers import ROOT

REFUSED = [  # (lengths, world size, block size, words of the message)
    ([10**12], 2, 4096, ["tokens per rank", "500000000000", str(MAX_TOKENS_PER_RANK)]),
    ([10**9], 8, 4096, ["blocks", "244141", str(8 * MAX_BLOCKS_PER_RANK)]),
    ([10**6], 8, 1, ["blocks", "1000000"]),
    ([4096 * 4096], 1024, 4096, ["squared sequence spans", "1048576"]),
    ([5] * 10, MAX_WORLD_SIZE + 1, 4096, ["world_size", str(MAX_WORLD_SIZE)]),
]
ACCEPTED_WORST = {  # the largest batches each limit accepts, and what they are allowed to cost
    "W=8, every block its own sequence (the small-world search)": ("[4096] * 8192", 8),
    "W=256, one sequence over every rank": ("[4096 * 8192]", 256),
}
PEAK_MB = 1024


def _peak(lengths: str, world: int) -> dict:
    code = ("import json, resource, time, hf_fcp\n"
            f"lens = {lengths}\n"
            "t = time.perf_counter()\n"
            f"plan = hf_fcp.plan_batch(lens, world_size={world}, block_size=4096)\n"
            "print(json.dumps({'s': time.perf_counter() - t, 'tokens': plan.num_tokens,\n"
            "                  'mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("lens,world,block,words", REFUSED)
def test_refused_at_once_naming_value_and_limit(lens, world, block, words):
    plan_batch([1], world_size=1)  # imports out of the timing
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        plan_batch(lens, world_size=world, block_size=block)
    assert time.perf_counter() - start < 1.0  # a check, not a plan: microseconds
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_absurd_batch_stays_small_in_memory():
    code = ("import resource, hf_fcp\n"
            "try:\n    hf_fcp.plan_batch([10**12], world_size=2, block_size=4096)\nexcept ValueError:\n    pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout) < PEAK_MB


@pytest.mark.parametrize("case", sorted(ACCEPTED_WORST))
def test_largest_accepted_batches_plan_in_bounded_memory(case):
    lengths, world = ACCEPTED_WORST[case]
    got = _peak(lengths, world)
    assert got["tokens"] == sum(eval(lengths))  # planned, every token placed
    assert got["mb"] < PEAK_MB, got  # the subprocess timeout (300 s) bounds the time


@pytest.mark.slow
def test_largest_accepted_batch_at_1024_ranks():
    """16 sequences spanning 64 of 1024 ranks each: at the span limit, the costliest accepted batch found."""
    got = _peak("[4096 * 2048] * 16", 1024)
    assert got["mb"] < 2 * PEAK_MB, got
