"""Randomized multi-process fcp_attention fuzzing against the float64 single-process reference.

Random layouts — sequence lengths with 1-token sequences and one sequence spanning every rank, batches
with fewer tokens than ranks, random block sizes, GQA ratios 1/4/8, rounds_per_stage 1..4, the fcp,
ring and allgather placements — go through ``hf_fcp.fcp_attention`` on spawned gloo groups of 2, 3 and 4
ranks (one spawn per world size runs every layout). Each layout's gathered forward output, LSE and
dq/dk/dv must match ``packed_causal_reference``, and the K/V and gradient bytes moved must equal the
plan's prediction. ``python -m pytest -m slow tests/test_fuzz_attention.py -s`` prints the counts; a
two-rank smoke run of a few layouts is in the default suite.
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_fcp.testing import run_workers
from hf_fcp.testing.cases import AttentionCase as Case
from hf_fcp.testing.cases import compare_to_reference, plan_for, run_cases
from hf_fcp.testing.helpers import random_lens

LAYOUTS_PER_WORLD = 40  # slow suite: 3 world sizes × 40 = 120 layouts
TIMEOUT_S = 240.0
TOL = 2e-5  # float32 compute vs the float64 reference, relative to max(1, max |reference|)
BLOCKS = (1, 2, 3, 4, 5, 7, 8, 12, 16, 32)


def random_layout(rng, world: int, index: int) -> Case:
    block = int(rng.choice(BLOCKS))
    kv = int(rng.choice([1, 2]))
    ratio = int(rng.choice([1, 4, 8]))
    strategy = str(rng.choice(["fcp", "fcp", "fcp", "ring", "allgather"]))
    return Case(f"W{world}_layout{index}", random_lens(rng, world, block), block, strategy=strategy,
                rounds_per_stage=int(rng.integers(1, 5)), heads=(kv * ratio, kv), seed=int(rng.integers(1 << 30)),
                fusion=str(rng.choice(["auto", "all", "none"])), overlap=str(rng.choice(["auto", "always", "never"])))


def layouts(world: int, count: int, seed: int) -> list[Case]:
    rng = np.random.default_rng([seed, world])
    return [random_layout(rng, world, i) for i in range(count)]


def mismatches(case: Case, world: int, parts: list[dict]) -> list[str]:
    """What differs between one layout's per-rank results and the reference (empty: all match)."""
    errors = compare_to_reference(case, parts, tol=TOL)
    predicted = plan_for(case, world).stats().comm_bytes
    for tag in ("kv", "grad"):
        moved = sum(p["bytes"].get(tag, 0) for p in parts)
        if moved != predicted:
            errors.append(f"{tag} bytes: moved {moved}, plan predicts {predicted}")
    return errors


def fuzz(world: int, cases: list[Case]) -> int:
    """Run every layout on one spawned group of ``world`` ranks; fail listing every mismatch."""
    per_rank = run_workers(run_cases, world, cases, timeout=TIMEOUT_S)
    failures = []
    for i, case in enumerate(cases):
        errors = mismatches(case, world, [per_rank[r][i] for r in range(world)])
        if errors:
            failures.append(f"{case} -> {errors}")
    assert not failures, f"{len(failures)} of {len(cases)} layouts at W={world} differ:\n" + "\n".join(failures)
    return len(cases)


def test_layouts_cover_the_edges():
    """The slow suite's layouts hold the edge cases this fuzzing is meant to reach."""
    cases = [(w, c) for w in (2, 3, 4) for c in layouts(w, LAYOUTS_PER_WORLD, seed=2026)]
    assert sum(1 in c.lens for _, c in cases) >= len(cases) * 0.8  # 1-token sequences
    assert sum(max(c.lens) >= c.block * w for w, c in cases) >= len(cases) * 0.8  # a sequence spans all ranks
    assert any(sum(c.lens) < w for w, c in cases)  # fewer tokens than ranks: idle ranks
    assert {c.heads[0] // c.heads[1] for _, c in cases} == {1, 4, 8}
    assert {c.rounds_per_stage for _, c in cases} == {1, 2, 3, 4}
    assert {c.strategy for _, c in cases} == {"fcp", "ring", "allgather"}
    assert {c.block for _, c in cases} == set(BLOCKS)
    assert {(c.fusion, c.overlap) for _, c in cases} >= {("all", "always"), ("all", "never"), ("none", "always"),
                                                         ("none", "never")}


def test_fuzz_smoke_two_ranks():
    """A few layouts on 2 ranks; and the comparison catches a corrupted gradient or a wrong byte count."""
    cases = layouts(2, 3, seed=7)
    per_rank = run_workers(run_cases, 2, cases, timeout=TIMEOUT_S)
    for i, case in enumerate(cases):
        assert mismatches(case, 2, [per_rank[r][i] for r in range(2)]) == []
    i = next(i for i, c in enumerate(cases) if plan_for(c, 2).transfers)  # a layout that communicates
    d = plan_for(cases[i], 2).transfers[0].dst  # a receiver: it sends dK/dV back
    parts = [per_rank[r][i] for r in range(2)]
    parts[d] = {**parts[d], "grads": [g.clone() for g in parts[d]["grads"]], "bytes": {"kv": -1}}
    parts[d]["grads"][1][-1] += 1e-3
    assert [e.split(":")[0] for e in mismatches(cases[i], 2, parts)] == ["dk", "kv bytes", "grad bytes"]
    assert all(mismatches(c, 2, [per_rank[r][i] for r in range(2)]) == [] for i, c in enumerate(cases))


@pytest.mark.slow
def test_fuzz_attention_multiprocess():
    counts = {world: fuzz(world, layouts(world, LAYOUTS_PER_WORLD, seed=2026)) for world in (2, 3, 4)}
    print("fcp_attention layouts checked per world size:", counts, "total:", sum(counts.values()))
    assert sum(counts.values()) == 3 * LAYOUTS_PER_WORLD
