"""How a plan runs its exchange — execution, colouring, round order — chosen by the modelled layer time
(``plan.schedule`` on ``plan.timeline``): the timeline's rules, the planner's per-stage work against what
the simulator times, chosen schedules that move the same messages in as many rounds, faster in the model
and in the simulator, only executions the settings allow, and the link figures FCPPlugin derives."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from hf_fcp import plan_batch
from hf_fcp.plan import planner, schedule, timeline
from hf_fcp.plan.cost import kernel_for
from hf_fcp.plan.planner import choose_execution
from hf_fcp.plan.rounds import colour_rounds, needed_pieces
from hf_fcp.plan.schedule import StageWork, choose_rounds, executions, layer_time, layer_times, slot_work, swap_rounds
from hf_fcp.plan.validate import check_plan
from hf_fcp.simulate import get_model, load_cluster
from hf_fcp.simulate.engine import _Run, planner_model, simulate
from hf_fcp.simulate.models import BWD_FLOP_RATIO
from hf_fcp.simulate.segments import Segments, Spans, local_segments, p2p_segments
from hf_fcp.simulate.strategies import Candidate

MODEL, CLUSTER = get_model("llama3-8b"), load_cluster("h200")
MACHINE = planner_model(MODEL, CLUSTER, 8)
KERNEL = kernel_for("kernel", MACHINE["kernel_cost"])


def test_an_exchange_waits_for_both_ends_and_each_ends_queue():
    # rank 1 posts at t=5 and receives 2 + 3 time units; rank 0's message to it starts at 5 too
    end, start = timeline.exchange(np.array([0.0, 5.0, 0.0]), np.array([0, 2]), np.array([1, 1]),
                                   np.array([2.0, 3.0]), 0.5)
    assert start.tolist() == [5.0, 5.0, 5.0]
    assert end.tolist() == [10.5, 10.5, 10.5]  # both messages end when rank 1 has received all 5 units
    end, start = timeline.exchange(np.array([1.0, 2.0]), np.zeros(0, np.int64), np.zeros(0, np.int64),
                                   np.zeros(0), 0.0)
    assert end.tolist() == [1.0, 2.0] and np.isinf(start).all()


def test_compute_runs_at_its_share_only_inside_the_ranks_transfers():
    busy = timeline.Busy(2, share=0.5)
    busy.add(np.array([1.0, np.inf]), np.array([3.0, 0.0]))  # rank 1 has no transfer
    end = busy.compute(np.zeros(2), np.array([4.0, 4.0]))
    assert end.tolist() == [5.0, 4.0]  # rank 0: 1 at full speed, 1 in the 2 busy units, 2 at full speed
    assert busy.extra.tolist() == [1.0, 0.0]


def test_a_rank_idle_in_one_exchange_is_still_slowed_by_its_later_ones():
    busy = timeline.Busy(2, share=0.5)
    busy.add(np.array([1.0, np.inf]), np.array([3.0, 0.0]))  # rank 1 has no transfer in the first exchange
    busy.add(np.array([5.0, 1.0]), np.array([6.0, 3.0]))
    end = busy.compute(np.zeros(2), np.array([4.0, 4.0]))
    assert end.tolist() == [5.0, 5.0]  # rank 1: its second exchange's transfer costs it 1 unit too


def _slowed(intervals, t: float, work: float, share: float) -> float:
    """One rank's compute end, interval by interval (the rule of :class:`timeline.Busy`, unvectorised)."""
    for s, e in intervals:
        step = min(max(s - t, 0.0), work)  # full speed until the transfer starts
        t, work = t + step, work - step
        step = min(work, max(e - max(t, s), 0.0) * share)  # at ``share`` inside it
        if step > 0:
            t, work = max(t, s) + step / share, work - step
    return t + work


def test_compute_beside_many_transfers_matches_the_rule_interval_by_interval():
    """Many exchanges (the busy windows are searched a few intervals at a time), ranks idle in some of them,
    compute calls in time order: every end as the interval-by-interval rule gives it, and the time lost to
    the transfers (``Busy.extra``) is what those ends add to full speed."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        world, share = 5, float(rng.choice([0.3, 0.8]))
        busy, link, intervals = timeline.Busy(world, share), np.zeros(world), [[] for _ in range(world)]
        for _ in range(int(rng.integers(1, 30))):
            start = np.where(rng.random(world) < 0.3, np.inf, link + rng.uniform(0, 2, world))
            end = start + rng.uniform(0, 2, world)
            busy.add(start, end)
            for r in np.flatnonzero(np.isfinite(start)):
                intervals[r].append((start[r], end[r]))
                link[r] = end[r]
        t, lost = rng.uniform(0, 2, world), np.zeros(world)
        for _ in range(6):
            work = rng.uniform(0, 6, world) * (rng.random(world) > 0.2)
            got = busy.compute(t, work)
            want = [_slowed(intervals[r], t[r], work[r], share) for r in range(world)]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
            lost += got - t - work
            t = got + rng.uniform(0, 1, world)
        np.testing.assert_allclose(busy.extra, lost, rtol=0, atol=1e-9)


def _batch(seed: int, world: int, tokens: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lens: list[int] = []
    while sum(lens) < world * tokens:
        lens.append(int(min(world * tokens - sum(lens), max(1, rng.lognormal(6.5, 1.2)))))
    return lens


@pytest.mark.parametrize("seed,world,fusion,per,node", [(0, 3, "all", 1, 8), (1, 5, "none", 1, 8), (2, 4, "none", 2, 8),
                                                        (3, 6, "auto", 2, 8), (4, 5, "all", 2, 8), (5, 7, "none", 2, 2),
                                                        (6, 6, "all", 3, 2), (7, 5, "auto", 1, 2)])
@pytest.mark.parametrize("table", [True, False], ids=["stage-table", "sorted-messages"])
def test_the_planners_stage_work_is_what_the_simulator_times(seed, world, fusion, per, node, table, monkeypatch):
    """Either way of finding each piece's stage (a table of sender-receiver pairs up to
    ``schedule.LOOKUP_WORLD`` ranks, sorted messages beyond); nodes of 2 relay their exchange (its relay
    phase starts a stage)."""
    monkeypatch.setattr(schedule, "LOOKUP_WORLD", schedule.LOOKUP_WORLD if table else 0)
    lens, machine = _batch(seed, world, 2048), MACHINE
    if node < world:  # a long document over nodes, relayed (the planner would keep the faster plain exchange)
        lens, machine = [world * 1024 - 5, *_batch(seed, world, 1024)], {**MACHINE, "node_size": node,
                                                                         "relay": "always"}
    plan = plan_batch(lens, world_size=world, block_size=256, tokens_per_rank=2048,
                      fusion=fusion, overlap="always", rounds_per_stage=per, **machine)
    assert bool(plan.relay_from) == (node < world)
    cf, cb = slot_work(plan, KERNEL)
    run, spans = _Run(MODEL, CLUSTER, world, None), Spans.of(plan)
    remote, msgs = p2p_segments(plan, spans)
    segs = Segments.concat([local_segments(spans), remote])
    fpp = MODEL.fwd_flops_per_pair
    peak = CLUSTER.peak_flops
    pair_s = fpp / (CLUSTER.eff_fwd * peak) + fpp * BWD_FLOP_RATIO / (CLUSTER.eff_bwd * peak)
    for backward, mine in ((False, cf), (True, cb)):
        timed = run.slot_times(segs, 1 + len(msgs), backward)  # kernel launches included
        assert mine.shape == timed.shape
        np.testing.assert_allclose(mine * pair_s, timed, rtol=1e-9, atol=1e-12)


def _default(plan):
    """``plan`` with the message graph's own colouring (what the planner ran before choosing)."""
    transfers, rounds = colour_rounds(needed_pieces([list(x) for x in plan.rank_spans]))
    return choose_execution(replace(plan, transfers=transfers, num_rounds=rounds))


def _messages(plan):
    return sorted((t.src, t.dst, t.pieces) for t in plan.transfers)


def test_the_chosen_schedule_moves_the_same_messages_faster():
    # two documents over 3 ranks: the message graph's own colouring makes a rank wait for its prefix
    plan = plan_batch([3400, 2744], world_size=3, block_size=512, tokens_per_rank=2048, **MACHINE)
    default = _default(plan)
    assert _messages(plan) == _messages(default) and plan.num_rounds == default.num_rounds
    for r in range(plan.num_rounds):  # still congestion-free: one send and one receive per rank and round
        edges = [(t.src, t.dst) for t in plan.transfers if t.round == r]
        assert max(Counter(s for s, _ in edges).values()) == 1 and max(Counter(d for _, d in edges).values()) == 1
    assert layer_time(plan, KERNEL) < layer_time(default, KERNEL) * 0.97
    fast, slow = (simulate(Candidate(plan=p, schedule="p2p"), MODEL, CLUSTER).step_s for p in (plan, default))
    assert fast < slow * 0.95  # the simulator agrees (6.5% here)
    again = plan_batch([3400, 2744], world_size=3, block_size=512, tokens_per_rank=2048, **MACHINE)
    assert (again.transfers, again.fused, again.overlap) == (plan.transfers, plan.fused, plan.overlap)  # pure


def test_the_colouring_alone_can_make_the_difference():
    default = _default(plan_batch([3400, 2744], world_size=3, block_size=512, tokens_per_rank=2048, **MACHINE))
    chosen = choose_rounds(default, needed_pieces([list(x) for x in default.rank_spans]), KERNEL)
    assert (chosen.overlap, chosen.fused) == (default.overlap, default.fused)
    assert _messages(chosen) == _messages(default)
    assert [(t.src, t.dst, t.round) for t in chosen.transfers] != [(t.src, t.dst, t.round) for t in default.transfers]
    assert layer_time(chosen, KERNEL) < layer_time(default, KERNEL) * 0.97
    times = layer_times([default, chosen], StageWork(default, KERNEL))  # both in one timeline: the same
    assert times.tolist() == pytest.approx([layer_time(default, KERNEL), layer_time(chosen, KERNEL)], rel=1e-12)


def test_swapping_rounds_keeps_a_valid_plan_and_can_speed_it_up():
    plan = _default(plan_batch(_batch(17, 5, 2048), world_size=5, block_size=512, tokens_per_rank=2048, **MACHINE))
    plan = choose_rounds(plan, needed_pieces([list(x) for x in plan.rank_spans]), KERNEL)
    swapped = swap_rounds(plan, StageWork(plan, KERNEL))
    check_plan(swapped)  # every round still a matching, every needed K/V arrives once
    assert _messages(swapped) == _messages(plan) and swapped.num_rounds == plan.num_rounds
    assert layer_time(swapped, KERNEL) < layer_time(plan, KERNEL) * 0.98
    fast, slow = (simulate(Candidate(plan=p, schedule="p2p"), MODEL, CLUSTER).step_s for p in (swapped, plan))
    assert fast < slow * 0.99  # the simulator agrees (2.9% here)
    assert swap_rounds(swapped, StageWork(swapped, KERNEL)).transfers == swapped.transfers  # a local optimum


def test_the_choice_never_models_slower_than_the_graphs_own_colouring():
    ratios = []
    for seed, world in [(5, 5), (9, 4), (17, 5), (39, 6)]:
        plan = plan_batch(_batch(seed, world, 2048), world_size=world, block_size=512, tokens_per_rank=2048,
                          **MACHINE)
        default = _default(plan)
        assert _messages(plan) == _messages(default)
        ratios.append(layer_time(plan, KERNEL) / layer_time(default, KERNEL))
    assert max(ratios) <= 1.0, ratios  # never slower
    assert min(ratios) < 0.99, ratios  # and the choice is made: some batch runs faster than the graph's colouring


@pytest.mark.parametrize("overlap,fusion,allowed", [
    ("never", "auto", {(False, "fused")}), ("always", "auto", {(True, "fused"), (True, "split")}),
    ("auto", "none", {(True, "split"), (False, "split")}), ("auto", "all", {(True, "fused"), (False, "fused")})])
def test_the_execution_chosen_is_one_the_settings_allow(overlap, fusion, allowed):
    lens = _batch(11, 5, 2048)
    plan = plan_batch(lens, world_size=5, block_size=512, tokens_per_rank=2048, overlap=overlap, fusion=fusion,
                      **MACHINE)
    ways = {(p.overlap, _way(p)) for p in executions(plan)}
    assert ways == allowed and (plan.overlap, _way(plan)) in allowed


def _way(plan) -> str:
    if not plan.fused:
        return "split"
    return "fused" if all(f == {s for s, _, _ in x} for f, x in zip(plan.fused, plan.rank_spans)) else "mixed"


@pytest.mark.parametrize("settings", [{"attention_layers": ((None, 2), (512, 2))}, {"world_size": 9}])
def test_plans_the_timeline_does_not_price_keep_the_graphs_colouring(settings, monkeypatch):
    """Sliding-window models, and plans whose search is over its budget (here: a budget of 0), keep the
    message graph's colouring."""

    settings = {"world_size": 3, **settings}
    world = settings.pop("world_size")
    lens = [3400, 2744] if world == 3 else _batch(7, world, 2048)
    if world == 9:
        monkeypatch.setattr(planner, "SEARCH_WORK", 0)
    plan = plan_batch(lens, world_size=world, block_size=512, tokens_per_rank=2048, **MACHINE, **settings)
    assert plan.transfers == colour_rounds(needed_pieces([list(x) for x in plan.rank_spans]))[0]


def test_the_schedule_search_runs_at_any_world_size_within_its_budget():
    """No world-size switch: a 16-rank plan whose search fits :data:`SEARCH_WORK` gets its colouring chosen
    (never modelled slower than the graph's own), one over it keeps the graph's."""
    from hf_fcp.plan.schedule import SEARCH_WORK, search_work

    within, over = (plan_batch(_batch(seed, 16, 1024), world_size=16, block_size=512, tokens_per_rank=1024,
                               max_stages=4, **MACHINE) for seed in (0, 3))
    assert search_work(within) <= SEARCH_WORK < search_work(over)
    default = _default(within)
    assert _messages(within) == _messages(default) and within.transfers != default.transfers
    assert layer_time(within, KERNEL) <= layer_time(default, KERNEL)
    assert over.transfers == _default(over).transfers


@pytest.mark.parametrize("q_heads,kv_heads,head_dim,link_cost,link_latency", [
    (64, 8, 128, 34.0, 880.0),  # the defaults describe Llama-3-70B heads
    (32, 8, 128, 68.0, 880.0),  # Llama-3-8B: half the attention work per K/V byte
    (8, 2, 16, 68.0, 28160.0)])  # 128 bytes of K/V per token: 32x the tokens per message latency
def test_the_plugin_scales_the_link_to_the_model(q_heads, kv_heads, head_dim, link_cost, link_latency):
    from transformers import LlamaConfig

    from hf_fcp import FCPPlugin
    cfg = LlamaConfig(num_attention_heads=q_heads, num_key_value_heads=kv_heads, hidden_size=q_heads * head_dim,
                      head_dim=head_dim, dtype="bfloat16")
    settings = FCPPlugin().collator(cfg).settings
    assert (settings.link_cost, settings.link_latency) == pytest.approx((link_cost, link_latency))


def test_a_message_inside_a_node_costs_the_node_link():
    """The timeline prices a message between ranks of one node (``node_size``) at ``node_link_cost``, one
    between nodes at ``link_cost``: an exchange-first layer of one message each way differs by exactly that."""
    from hf_fcp.plan import PlanSettings, make_plan

    def layer(node_size):
        settings = PlanSettings(overlap="never", link_cost=10.0, node_link_cost=1.0, link_latency=0.0,
                                node_size=node_size)
        plan = make_plan((2048,), [[(0, 0, 1024)], [(0, 1024, 2048)]], world_size=2, block_size=1024,
                         tokens_per_rank=1024, strategy="fcp", settings=settings)
        return layer_time(plan, KERNEL)

    assert layer(1) - layer(2) == pytest.approx(2 * 1024 * (10.0 - 1.0))  # K/V forward, dK/dV back
