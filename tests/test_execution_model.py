"""The planner's execution model (``plan.execution``): exchange first and run every sequence fused, or
overlap the exchange with compute — each sequence fused or split per rank, whichever the model finds
faster — and the plan records the choice the engine then runs."""

import numpy as np
import pytest

from hf_fcp import PlanSettings, plan_batch
from hf_fcp.plan.cost import FLASH, run_cost, segment_cost, seq_cost
from hf_fcp.plan.execution import RankChoices, execution, remote_sources, remote_stages
from hf_fcp.plan.rounds import needed_pieces
from hf_fcp.plan.segments import pieces_of

LAYERS = ((None, 1),)


def _run(spans, link_cost, **settings):
    pieces = needed_pieces(spans)
    choices = RankChoices(spans, FLASH, LAYERS, remote_sources(pieces))
    link = np.zeros(len(spans))
    for (src, dst), got in pieces.items():
        link[src] += sum(b - a for _, a, b in got)
        link[dst] += sum(b - a for _, a, b in got)
    return choices, execution(choices, link, PlanSettings(link_cost=link_cost, **settings), FLASH)


# rank 1 holds the second half of a 4096-token document (needs 2048 K/V tokens) and, in the second case,
# short whole documents that can hide the transfer on their own
HALVES = [[(0, 0, 2048)], [(0, 2048, 4096)]]
WITH_SHORT = [[(0, 0, 2048), (1, 0, 1024)], [(0, 2048, 4096), (2, 0, 1024)]]


def test_the_choices_price_fused_and_split_runs():
    choices = RankChoices(HALVES, FLASH, LAYERS, remote_sources(needed_pieces(HALVES)))
    assert choices.work[1] == pytest.approx(run_cost(2048, 4096, FLASH))
    assert choices.free[1] == 0  # its one run needs the first half
    [(seq, extra, gain)] = choices.options[1]
    assert seq == 0 and extra == pytest.approx(seq_cost([(2048, 4096)], FLASH) - run_cost(2048, 4096, FLASH))
    assert gain == pytest.approx(segment_cost(2048, 2048, True, FLASH))
    assert choices.options[0] == []  # rank 0's run is at position 0: nothing to choose


def test_overlapped_fused_when_independent_work_hides_the_transfer():
    choices, (t, work, split, overlap) = _run(WITH_SHORT, link_cost=2.0)
    assert overlap and split == [frozenset(), frozenset()]
    assert t == pytest.approx(choices.work.max() + 2 * 0.06 * 2.0 * 2048)  # only the SM share beside it


def test_overlapped_split_when_only_the_local_segment_can_hide_it():
    choices, (t, work, split, overlap) = _run(HALVES, link_cost=100.0)
    assert overlap and split == [frozenset(), frozenset({0})]
    assert work[1] == pytest.approx(choices.work[1] + choices.options[1][0][1])


def test_exchange_first_when_nothing_hides_it():
    choices, (t, work, split, overlap) = _run(HALVES, link_cost=2.0)  # a cheap transfer: not worth splitting
    assert not overlap and split == [frozenset(), frozenset()]
    assert t == pytest.approx(choices.work.max() + 2 * 2.0 * 2048)


@pytest.mark.parametrize("fusion, overlap", [("all", "always"), ("none", "always"), ("all", "never"),
                                             ("none", "never")])
def test_fixed_settings_are_obeyed(fusion, overlap):
    _, (_, _, split, overlapped) = _run(WITH_SHORT, link_cost=100.0, fusion=fusion, overlap=overlap)
    assert overlapped == (overlap == "always")
    assert split[1] == (frozenset({0}) if fusion == "none" else frozenset())


def test_a_split_sequence_pays_the_tile_set_ups_of_one_more_segment_per_sending_rank():
    spans = [[(0, 0, 1000)], [(0, 1000, 2000)], [(0, 2000, 3000)], [(0, 3000, 3300)]]  # rank 3: 3 senders
    choices = RankChoices(spans, FLASH, LAYERS, remote_sources(needed_pieces(spans)))
    _, _, cq, ck = FLASH.coefficients
    per_segment = lambda held: cq * -(-held // FLASH.tile) + ck  # noqa: E731
    beyond = lambda r, a, b: choices.options[r][0][1] - (seq_cost([(a, b)], FLASH) - run_cost(a, b, FLASH))  # noqa: E731
    assert beyond(3, 3000, 3300) == pytest.approx(2 * per_segment(300))
    assert beyond(2, 2000, 3000) == pytest.approx(per_segment(1000))  # two senders
    assert beyond(1, 1000, 2000) == pytest.approx(0, abs=1e-6)  # one
    assert choices.options[0] == []  # rank 0 needs nothing


def test_a_split_sequence_runs_one_remote_segment_per_stage_that_brings_keys():
    plan = plan_batch([4096], world_size=4, block_size=512, tokens_per_rank=1024, balance="pairs")
    rounds: dict = {}
    for t in plan.transfers:
        for s, _, _ in t.pieces:
            rounds.setdefault((t.dst, s), set()).add(t.round)
    stages = lambda per: remote_stages(pieces_of(plan), per, 1)  # noqa: E731
    for per in (1, 2, 3):
        assert stages(per) == {k: len({r // per for r in v}) for k, v in rounds.items()}
    assert max(stages(1).values()) > max(stages(3).values())


def test_plans_record_the_execution_the_model_chose():
    lens = [24576] + [512] * 16  # one long document, many short ones: every rank has whole documents to run
    plan = plan_batch(lens, world_size=4, block_size=2048, tokens_per_rank=8192, link_cost=40.0)
    assert plan.overlap and plan.fused
    split = [{s for s, _, _ in spans} - plan.fused_on(r) for r, spans in enumerate(plan.rank_spans)]
    assert all(s == {0} or not s for s in split)  # only the long document may run split
    first = plan_batch([32768], world_size=4, block_size=2048, tokens_per_rank=8192, link_cost=40.0,
                       overlap="never")
    assert not first.overlap and all(first.fused_on(r) == {0} for r in range(4))  # every key first: fused
    none = plan_batch(lens, world_size=4, block_size=2048, tokens_per_rank=8192, fusion="none")
    assert none.fused == ()


@pytest.mark.parametrize("layers", [((None, 1),), ((None, 1), (1024, 3))])
def test_one_link_token_count_before_and_after_colouring(layers):
    """The planner counts a rank's link tokens once (``larger_direction``): from the placement's needed pieces
    (candidate pricing) and from the plan's coloured messages (execution choice) it gets the same figures,
    full and sliding-window layers alike."""
    from hf_fcp.plan.execution import link_tokens
    from hf_fcp.plan.planner import _link_tokens

    lens = [9000, 3000, 700, 5000, 12000, 40]
    plan = plan_batch(lens, world_size=5, block_size=1024, tokens_per_rank=6000, attention_layers=layers)
    spans = [list(x) for x in plan.rank_spans]
    assert _link_tokens(plan).tolist() == link_tokens(spans, layers).tolist()
    assert _link_tokens(plan).max() > 0


@pytest.mark.parametrize("strategy,world", [("fcp", 5), ("ring", 3), ("allgather", 8)])
def test_the_vectorised_execution_work_equals_the_per_run_one(strategy, world):
    """``RankWork`` prices a full-attention model vectorised over the held runs; a sliding-window kind of
    0 layers takes its per-run path, which must give exactly the same work, independent work and split
    options (the same values added in the same order), with runs in any order and touching runs merged."""
    from hf_fcp.plan.cost import PAIRS
    from hf_fcp.plan.execution import RankWork

    rng = np.random.default_rng(world)
    lens = rng.integers(1, 20_000, 9).tolist()
    spans = [list(x) for x in plan_batch(lens, world_size=world, strategy=strategy, block_size=512).rank_spans]
    spans = [[x[i] for i in rng.permutation(len(x))] for x in spans]
    for kernel in (FLASH, PAIRS):
        fast, slow = RankWork(spans, kernel, LAYERS), RankWork(spans, kernel, ((None, 1), (256, 0)))
        assert sum(map(len, fast.options)) > 0
        assert np.array_equal(fast.work, slow.work) and np.array_equal(fast.free, slow.free)
        assert fast.options == slow.options and np.array_equal(fast.opt_held, slow.opt_held)
