"""The cut-moving polish (``plan.search.polish``): it keeps every rank's tokens and every token placed once,
never raises the busiest rank's modelled work, finds moves whose first step would empty a short run, and
goes on in finer steps when whole-tile moves are stuck."""

import numpy as np
import pytest

from hf_fcp.plan.baseline_placements import place_ring
from hf_fcp.plan.candidates import zigzag_long
from hf_fcp.plan.cost import FLASH, rank_work
from hf_fcp.plan.placement import place_fcp
from hf_fcp.plan.search import polish
from hf_fcp.simulate import parse_distribution
from hf_fcp.workloads import make_batch


def _work(spans):
    return np.array([rank_work(x, FLASH, frozenset(s for s, _, _ in x)) for x in spans])


def _tokens(spans):
    return [sum(b - a for _, a, b in x) for x in spans]


def _coverage(spans, lens):
    for s, n in enumerate(lens):
        runs = sorted((a, b) for x in spans for q, a, b in x if q == s)
        assert runs[0][0] == 0 and runs[-1][1] == n and all(b == a for (_, b), (a, _) in zip(runs, runs[1:]))


@pytest.mark.parametrize("seed", range(12))
def test_polish_keeps_tokens_and_coverage_and_never_raises_the_maximum(seed):
    rng = np.random.default_rng(seed)
    world = int(rng.integers(2, 9))
    cap = int(rng.choice([2048, 8192]))
    lens = make_batch(parse_distribution(str(rng.choice(["paper", "stdlib"]))), world * cap, rng)
    for spans in (place_fcp(tuple(lens), world, max(512, cap // 4), cap, kernel=FLASH, fused=True),
                  place_ring(lens, world, cap), zigzag_long(lens, world, cap)):
        out = polish(spans, world, FLASH)
        assert _tokens(out) == _tokens(spans)
        _coverage(out, lens)
        assert _work(out).max() <= _work(spans).max() * (1 + 1e-12)


def test_a_step_that_would_empty_a_short_run_is_halved_not_dropped():
    # W=8, 2K tokens per rank, lognormal documents: the greedy leaves the busiest rank 10% above the mean and
    # its only three-rank cycles pass through runs shorter than the first step
    lens = make_batch(parse_distribution("paper"), 8 * 2048, np.random.default_rng([8, 2048]))
    spans = place_fcp(tuple(lens), 8, 512, 2048, kernel=FLASH, fused=True)
    before, after = _work(spans), _work(polish(spans, 8, FLASH))
    assert before.max() / before.mean() > 1.09
    assert after.max() < 0.97 * before.max()


def test_when_whole_tile_moves_are_stuck_finer_steps_go_on(monkeypatch):
    from hf_fcp.plan import search

    rng = np.random.default_rng(24)
    world, cap = int(rng.integers(2, 5)), int(rng.choice([8192, 32768]))
    lens = make_batch(parse_distribution("paper"), world * cap, rng)  # W=3, 8K tokens per rank, 14 documents
    spans = place_fcp(tuple(lens), world, 4096, cap, kernel=FLASH, fused=True)
    finer = _work(polish(spans, world, FLASH))
    monkeypatch.setattr(search, "FINEST", 1)  # whole tiles only
    tiles = _work(polish(spans, world, FLASH))
    assert tiles.max() / tiles.mean() - 1 > 0.012
    assert finer.max() / finer.mean() - 1 < 0.01
