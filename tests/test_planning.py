"""Planner properties (one process, loop over ranks): coverage, caps, delivery, matchings, determinism."""

import pickle
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hf_fcp import plan_batch, span_cost
from hf_fcp.plan.cost import FLASH
from hf_fcp.plan.validate import PlanError, check_plan, check_view
from hf_fcp.workloads import Distribution, make_batch


def lognormal_batch(world, tokens_per_rank, seed, mu=6.35, sigma=2.34, max_len=524288):
    """Lognormal lengths (the workloads module's sampler) filling world × tokens_per_rank tokens exactly."""
    dist = Distribution(name="test", kind="lognormal", mu=mu, sigma=sigma, max_len=max_len)
    return make_batch(dist, world * tokens_per_rank, np.random.default_rng(seed))


@st.composite
def batches(draw):
    lens = draw(st.lists(st.integers(1, 300), min_size=1, max_size=25))
    world = draw(st.integers(1, 64))
    block = draw(st.sampled_from([1, 2, 3, 7, 16, 64, 100, 4096]))
    total = sum(lens)
    even = -(-total // world)
    cap = draw(st.one_of(st.none(), st.integers(even, even + 40)))
    return lens, world, block, cap


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from(["fcp", "ring", "allgather"]))
def test_random_batches_are_valid_plans(batch, strategy):
    lens, world, block, cap = batch
    plan = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=cap, strategy=strategy)
    check_plan(plan)
    assert plan.num_rounds <= max(world - 1, 0)
    if strategy == "fcp":
        assert max(sum(b - a for _, a, b in s) for s in plan.rank_spans) <= plan.tokens_per_rank


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_views_serve_exactly_the_causal_keys(batch):
    lens, world, block, cap = batch
    world = min(world, 6)
    plan = plan_batch(lens, world_size=world, block_size=block, strategy="fcp", rounds_per_stage=2)
    for r in range(world):
        check_view(plan, r)


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_collective_views_serve_exactly_the_causal_keys(strategy):
    plan = plan_batch([5, 17, 3, 40, 1, 9], world_size=3, block_size=4, strategy=strategy)
    for r in range(3):
        check_view(plan, r)


def test_rounds_equal_max_degree_and_are_matchings():
    lens = lognormal_batch(16, 4096, seed=3)
    plan = plan_batch(lens, world_size=16, block_size=512)
    out_deg = np.bincount([t.src for t in plan.transfers], minlength=16)
    in_deg = np.bincount([t.dst for t in plan.transfers], minlength=16)
    assert plan.num_rounds == max(out_deg.max(), in_deg.max())
    pairs = [(t.src, t.dst) for t in plan.transfers]
    assert len(pairs) == len(set(pairs)), "one message per (sender, receiver) pair"
    check_plan(plan)


def test_weak_scaling_fill_is_planned_and_balanced():
    world, tpr = 32, 32768
    lens = lognormal_batch(world, tpr, seed=0)
    assert sum(lens) == world * tpr
    plan = plan_batch(lens, world_size=world, tokens_per_rank=tpr)
    check_plan(plan)
    stats = plan.stats()
    assert stats["memory_imbalance"] == 0.0
    assert stats["compute_imbalance"] <= 0.02
    ring = plan_batch(lens, world_size=world, tokens_per_rank=tpr, strategy="ring")
    assert ring.stats()["comm_bytes"] > 3 * stats["comm_bytes"]


def test_locality_short_sequences_stay_whole():
    lens = [100] * 40 + [20000]
    plan = plan_batch(lens, world_size=4, block_size=1024, tokens_per_rank=8000)
    holders = {}
    for r, spans in enumerate(plan.rank_spans):
        for s, _, _ in spans:
            holders.setdefault(s, set()).add(r)
    split_short = [s for s in range(40) if len(holders[s]) > 1]
    assert len(split_short) <= 1, f"short sequences split across ranks: {split_short}"
    assert plan.stats()["compute_imbalance"] <= 0.02


@pytest.mark.parametrize("balance, key", [("kernel", "work"), ("pairs", "cost")])
def test_causal_skew_of_a_long_sequence_is_balanced(balance, key):
    plan = plan_batch([65536], world_size=8, block_size=4096, balance=balance)
    loads = plan.rank_loads()
    assert loads[key].max() / loads[key].mean() - 1 <= 0.02
    assert plan.stats()["compute_imbalance"] == pytest.approx(loads[key].max() / loads[key].mean() - 1)
    assert loads["tokens"].max() <= 8192
    assert np.isclose(loads["cost"].sum(), span_cost(0, 65536))


def test_plans_are_deterministic_and_views_picklable():
    lens = lognormal_batch(8, 2048, seed=5)
    a = plan_batch(lens, world_size=8, block_size=256)
    b = plan_batch(list(lens), world_size=8, block_size=256)
    assert a.rank_spans == b.rank_spans and a.transfers == b.transfers and a.fingerprint == b.fingerprint
    view = pickle.loads(pickle.dumps(a.for_rank(3)))
    assert view.fingerprint == a.fingerprint
    assert view.to("cpu").token_index.dtype.is_floating_point is False
    assert plan_batch(lens, world_size=8, block_size=512).fingerprint != a.fingerprint


def test_view_token_index_and_positions():
    lens = [5, 17, 3, 40, 1]
    plan = plan_batch(lens, world_size=3, block_size=4)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    every = []
    for r in range(3):
        v = plan.for_rank(r)
        idx, pos, seq = v.token_index.numpy(), v.position_ids.numpy(), v.seq_index.numpy()
        assert np.array_equal(idx, offsets[seq] + pos)
        spans = plan.spans(r)
        assert v.spans.tolist() == [list(s) for s in spans]
        every.extend(idx.tolist())
    assert sorted(every) == list(range(sum(lens)))


def test_packing_keeps_sequences_whole_or_refuses():
    plan = plan_batch([10, 20, 30, 40], world_size=2, tokens_per_rank=60, strategy="packing")
    assert plan.transfers == () and plan.num_rounds == 0
    check_plan(plan)
    with pytest.raises(ValueError, match="sequence 1 has 90 tokens, more than tokens_per_rank=60"):
        plan_batch([10, 90, 20], world_size=2, tokens_per_rank=60, strategy="packing")


def test_rounds_per_stage_coalesces():
    lens = lognormal_batch(8, 4096, seed=1)
    plan = plan_batch(lens, world_size=8, block_size=512, rounds_per_stage=3)
    assert plan.stats()["stages"] == -(-plan.num_rounds // 3)
    for r in range(8):
        check_view(plan, r) if r < 2 else None


def test_validator_catches_a_broken_plan():
    plan = plan_batch([10, 30], world_size=2, block_size=8)
    spans = list(plan.rank_spans)
    spans[0] = spans[0][1:] if len(spans[0]) > 1 else ()
    broken = type(plan)(**{**plan.__dict__, "rank_spans": tuple(spans)})
    with pytest.raises(PlanError, match="not held exactly once"):
        check_plan(broken)
    if plan.transfers:
        dropped = type(plan)(**{**plan.__dict__, "transfers": plan.transfers[1:]})
        with pytest.raises(PlanError, match="never receives"):
            check_plan(dropped)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_lens=[], world_size=2), "seq_lens: got an empty list, expected at least one sequence"),
    (dict(seq_lens=[3, 0], world_size=2), r"seq_lens\[1\]: got 0, expected a positive integer"),
    (dict(seq_lens=[3, -4], world_size=2), r"seq_lens\[1\]: got -4, expected a positive integer"),
    (dict(seq_lens=[3, 2.5], world_size=2), r"seq_lens\[1\]: got 2.5, expected a positive integer"),
    (dict(seq_lens=[3, None], world_size=2), r"seq_lens\[1\]: got None, expected a positive integer"),
    (dict(seq_lens="123", world_size=2), "seq_lens: got str, expected a list"),
    (dict(seq_lens=[3], world_size=0), r"world_size: got 0, expected a positive integer \(>= 1\)"),
    (dict(seq_lens=[3], world_size=2.0), "world_size: got 2.0, expected a positive integer"),
    (dict(seq_lens=[3], world_size=2, block_size=-1), "block_size: got -1, expected a positive integer"),
    (dict(seq_lens=[3], world_size=2, strategy="zigzag"), "strategy: got 'zigzag', expected one of"),
    (dict(seq_lens=[100], world_size=2, tokens_per_rank=10), "tokens_per_rank=10 is too small"),
    (dict(seq_lens=[3], world_size=2, bogus=1), r"unknown planner setting\(s\) \['bogus'\]"),
    (dict(seq_lens=[3], world_size=2, kv_dtype="int4"), "kv_dtype: got 'int4', expected one of"),
    (dict(seq_lens=[3], world_size=2, locality=2), r"locality: got 2, expected a number in \[0, 1\]"),
    (dict(seq_lens=[3], world_size=2, link_latency=-1.0), r"link_latency: got -1.0"),
])
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_batch(kwargs.pop("seq_lens"), **kwargs)


def test_rank_argument_is_checked():
    plan = plan_batch([4, 4], world_size=2)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\), got 2"):
        plan.for_rank(2)


def test_edge_colouring_uses_max_degree_even_when_paths_must_flip(monkeypatch):
    import hf_fcp.plan.rounds as rounds

    flips = []
    real = rounds._flip_path
    monkeypatch.setattr(rounds, "_flip_path", lambda *a: flips.append(1) or real(*a))
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 9))
        edges = {(int(u), int(v)) for u, v in rng.integers(0, n, size=(int(rng.integers(1, 3 * n)), 2)) if u != v}
        pairs = {e: [(0, 0, 1)] for e in edges}
        transfers, num = rounds.colour_rounds(pairs)
        deg = np.bincount([u for u, _ in edges] + [n + v for _, v in edges], minlength=2 * n)
        assert num == deg.max()
        assert len({(t.src, t.round) for t in transfers}) == len(transfers)
        assert len({(t.dst, t.round) for t in transfers}) == len(transfers)
        assert {(t.src, t.dst) for t in transfers} == edges
    assert flips, "no random graph exercised the alternating-path recolouring"


def _layer_time(plan) -> float:
    from hf_fcp.plan.candidates import step_time

    return step_time([list(s) for s in plan.rank_spans], plan.settings, FLASH)[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 40000), min_size=1, max_size=20), st.integers(2, 8), st.sampled_from([256, 1024, 4096]),
       st.integers(0, 3))
@example([2177], 2, 4096, 0)  # zigzag 2e-6 faster: within MARGIN, the planner keeps its own plan
@example([612, 612], 5, 256, 0)  # zigzag's rounding put 246 tokens on a rank under a cap of 245; it was chosen
def test_fcp_is_never_slower_than_its_simple_alternatives(lens, world, block, slack):
    """On the engine's timeline (what the planner's final choice prices: kernel work, the exchange's
    rounds and their latency), the fcp plan is never slower than zigzag, zigzag of the long sequences
    only, or contiguous shards of the same batch under the same token cap — up to the planner's
    ``MARGIN``: an alternative less than that much faster is a tie, and ties keep the planner's own plan
    (near ties are not left to float rounding, which could differ between the ranks' machines)."""
    from hf_fcp.plan import make_plan
    from hf_fcp.plan.baseline_placements import place_allgather, place_ring
    from hf_fcp.plan.candidates import within, zigzag_long
    from hf_fcp.plan.schedule import MARGIN, layer_time

    cap = -(-sum(lens) // world) + slack * 64
    plan = plan_batch(lens, world_size=world, block_size=block, tokens_per_rank=cap)
    check_plan(plan)
    mine = layer_time(plan, FLASH)
    for place in (place_ring, place_allgather, zigzag_long):
        spans = place(tuple(lens), world, cap)
        if within(spans, cap) is None:  # a zigzag's rounding put a token more on a rank: not under the cap
            continue
        alt = make_plan(tuple(lens), spans, world_size=world, block_size=block, tokens_per_rank=cap,
                        strategy="fcp", settings=plan.settings)
        other = layer_time(alt, FLASH)
        assert mine * (1 - MARGIN) <= other, (place.__name__, mine, other)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 8), st.integers(8192, 40000), st.sampled_from([512, 1024, 2048]))
@example(5, 8964, 512)  # polished zigzag: a finer cut move re-opened a whole-tile one (1.12% before)
@example(4, 9218, 512)  # polishing lowered the total work: the plan's own max / mean 1.08%
def test_one_document_filling_every_rank_is_balanced(world, per_rank, block):
    """One document, every rank exactly full (the hardest case for a contiguous placement): the kernel work
    of the busiest rank is within 1% of the mean work of zigzag (the evenly cut reference) at >= 8K tokens
    per rank, and the plan is no slower than zigzag (up to the planner's ``TIE``: within it the better
    balanced placement wins). The reference is zigzag's mean, not the plan's own: moving cuts can lower
    the total work and so raise the plan's own max / mean (1.08% at W=4, 9218 tokens, block 512, with the
    busiest rank 0.2% above zigzag's mean)."""
    from hf_fcp.plan.candidates import TIE

    n = per_rank * world
    plan = plan_batch([n], world_size=world, block_size=block, tokens_per_rank=per_rank)
    loads = plan.rank_loads()
    assert loads.tokens.max() == per_rank and loads.tokens.sum() == n
    ring = plan_batch([n], world_size=world, block_size=block, tokens_per_rank=per_rank, strategy="ring")
    assert loads.work.max() <= 1.01 * ring.rank_loads().work.mean(), (loads.work, ring.rank_loads().work)
    assert _layer_time(plan) <= _layer_time(ring) * (1 + TIE + 1e-9)


def test_the_planner_never_models_slower_than_the_grouped_placements():
    """At any world size the planner also plans MagiAttention's dispatch over all ranks with each block it
    tries and its own greedy inside node-aligned groups, and keeps whichever plan the engine's timeline
    finds fastest (here a grouped one in some batches, its own in others)."""
    from hf_fcp.plan import make_plan
    from hf_fcp.plan.candidates import grouped
    from hf_fcp.plan.cost import kernel_for
    from hf_fcp.plan.placement import place_fcp
    from hf_fcp.plan.schedule import layer_time
    from hf_fcp.simulate import get_model, load_cluster, parse_distribution
    from hf_fcp.simulate.engine import planner_model

    machine = planner_model(get_model("llama3-70b"), load_cluster("h200"), 16)
    kernel = kernel_for("kernel", machine["kernel_cost"])
    place = lambda lens, w, cap, block: place_fcp(lens, w, block, cap, kernel=kernel)  # noqa: E731  the planner's greedy
    picked = []
    for seed in range(6):
        lens = make_batch(parse_distribution("light"), 16 * 4096, np.random.default_rng(seed))
        plan = plan_batch(lens, world_size=16, block_size=1024, tokens_per_rank=4096, max_stages=4, fusion="all",
                          **machine)
        others = grouped(lens, 16, 4096, 1024, 8, place)
        assert len(others) >= 3  # the dispatch; fcp and the dispatch in groups of 8
        for spans in others:
            alt = make_plan(tuple(lens), spans, world_size=16, block_size=1024, tokens_per_rank=4096,
                            strategy="fcp", settings=plan.settings)
            assert layer_time(plan, kernel) <= layer_time(alt, kernel) * (1 + 1e-9)
        picked.append(any(plan.rank_spans == tuple(tuple(x) for x in spans) for spans in others))
    assert any(picked) and not all(picked), picked


@pytest.mark.parametrize("search", [True, False])
def test_with_room_for_whole_documents_the_planner_never_models_slower_than_keeping_them_whole(search, monkeypatch):
    """Where every document fits a rank and the budget leaves room, the planner also plans the fixed-group
    baselines' CP-1 placements (whole documents by tokens, or by causal pairs with room: no communication),
    also beyond its search budget, and keeps one when its timeline finds it fastest (here in some batches,
    not in others), at the budget of the simulator's equal-memory comparison."""
    from hf_fcp.plan import candidates, make_plan
    from hf_fcp.plan.candidates import whole_documents
    from hf_fcp.plan.cost import kernel_for
    from hf_fcp.plan.schedule import layer_time
    from hf_fcp.simulate import get_model, load_cluster, parse_distribution
    from hf_fcp.simulate.engine import planner_model
    from hf_fcp.workloads import make_batches

    if not search:
        monkeypatch.setattr(candidates, "SEARCH_SPANS", 0)
    machine = planner_model(get_model("llama3-8b"), load_cluster("h200"), 12)
    kernel = kernel_for("kernel", machine["kernel_cost"])
    picked = []
    for seed, by_pairs in ((31, False), (32, False), (33, False), (35, True), (37, True)):
        for lens in make_batches(parse_distribution("bimodal"), world_size=12, tokens_per_rank=8192, steps=2,
                                 seed=seed):  # the budget: what ring (wlb) at CP 1 puts on its busiest rank
            cap = max(sum(b - a for _, a, b in x) for x in whole_documents(lens, 12, 8192, by_pairs))
            plan = plan_batch(lens, world_size=12, block_size=4096, tokens_per_rank=cap, max_stages=16, **machine)
            for room, by_cost in ((cap, False), (cap, True), (8192, True)):  # 8192: the batch's mean share
                spans = whole_documents(lens, 12, room, by_cost)
                if max(sum(b - a for _, a, b in x) for x in spans) <= cap:
                    alt = make_plan(tuple(lens), spans, world_size=12, block_size=4096, tokens_per_rank=cap,
                                    strategy="fcp", settings=plan.settings)
                    assert layer_time(plan, kernel) <= layer_time(alt, kernel) * (1 + 1e-9), (seed, room, by_cost)
            picked.append(plan.stats().comm_bytes == 0)
    assert any(picked) and not all(picked), picked


def test_alternatives_skipped_by_their_lower_bound_could_not_have_won(monkeypatch):
    """The planner skips a grouped alternative whose lower bound is above the fastest plan so far, before
    placing it: every plan is the one the exhaustive comparison keeps, and some alternatives are skipped
    (the small groups of a long-document batch: their busiest group is far above the mean). The bound of
    a placed alternative (compute and communication) never exceeds its layer time in any execution or
    stage count."""
    from hf_fcp.plan import candidates, make_plan, planner
    from hf_fcp.plan.bounds import work_bound
    from hf_fcp.plan.cost import kernel_for
    from hf_fcp.plan.fcp_plan import revised
    from hf_fcp.plan.placement import place_fcp
    from hf_fcp.plan.schedule import layer_time
    from hf_fcp.simulate import get_model, load_cluster, parse_distribution
    from hf_fcp.simulate.engine import planner_model
    from hf_fcp.workloads import make_batches

    machine = planner_model(get_model("llama3-70b"), load_cluster("h200"), 32)
    kernel = kernel_for("kernel", machine["kernel_cost"])
    built, real = [], candidates.grouped_options

    def counted(*args, bounds=True):
        options = real(*args)
        built.append(len(options))
        return [candidates.Option(o.bound if bounds else None, lambda o=o: built.append(-1) or o.build())
                for o in options]

    monkeypatch.setattr(planner, "grouped_options", counted)
    tight = 0
    for dist in ("lognormal", "light"):
        lens = make_batches(parse_distribution(dist), world_size=32, tokens_per_rank=8192, steps=1, seed=5)[0]
        kw = dict(world_size=32, block_size=2048, tokens_per_rank=8192, max_stages=4, **machine)
        pruned = plan_batch(lens, **kw)
        with monkeypatch.context() as m:  # no bounds: every option placed and planned
            m.setattr(planner, "work_bound", lambda spans, kernel, settings: None)
            m.setattr(planner, "grouped_options", lambda *args: counted(*args, bounds=False))
            assert plan_batch(lens, **kw).fingerprint == pruned.fingerprint, dist
        greedy = lambda g, ranks, cap, block: place_fcp(g, ranks, block, cap, kernel=kernel)  # noqa: E731
        for spans in [pruned.rank_spans, *candidates.grouped(lens, 32, 8192, 2048, 8, greedy)]:
            alt = make_plan(tuple(lens), [list(x) for x in spans], world_size=32, block_size=2048,
                            tokens_per_rank=8192, strategy="fcp", settings=pruned.settings)
            bound = work_bound(alt.rank_spans, kernel, alt.settings)
            fused = tuple(frozenset(s for s, _, _ in x) for x in alt.rank_spans)
            for per in (1, alt.num_rounds):  # every round its own stage, and one stage
                staged = revised(alt, settings=replace(alt.settings, rounds_per_stage=per))
                for run in (dict(fused=fused), dict(fused=tuple(frozenset() for _ in fused))):
                    for overlap in (True, False):
                        assert bound <= layer_time(revised(staged, overlap=overlap, **run), kernel)
            tight += bound > 0.95 * layer_time(alt, kernel)
    offered, placed = sum(x for x in built if x > 0), built.count(-1)
    assert placed < offered, built  # the bounded runs skipped some (the unbounded ones place all of them)
    assert tight  # some bounds within 5% of the layer time


def test_the_planner_plans_no_placement_its_bound_rules_out(monkeypatch):
    """Best first: the planner takes its candidates (its own placement and the alternatives) lowest bound
    first and stops when the lowest bound left is above the fastest plan found, so no placement it plans
    has a bound above the plan it returns (here its own placement's bound is: before, it was always
    planned first), and the plan is the one the exhaustive comparison keeps."""
    from hf_fcp.plan import planner
    from hf_fcp.plan.bounds import work_bound
    from hf_fcp.plan.cost import kernel_for
    from hf_fcp.plan.schedule import layer_time
    from hf_fcp.simulate import get_model, load_cluster, parse_distribution
    from hf_fcp.simulate.engine import planner_model
    from hf_fcp.workloads import make_batches

    machine = planner_model(get_model("llama3-8b"), load_cluster("h200"), 128)
    kernel = kernel_for("kernel", machine["kernel_cost"])
    lens = make_batches(parse_distribution("lognormal"), world_size=128, tokens_per_rank=8192, steps=1, seed=1)[0]
    kw = dict(world_size=128, block_size=4096, tokens_per_rank=8192, max_stages=16, **machine)
    bounds, staged = [], planner._staged

    def spy(built, kernel):
        settings = replace(built.plan.settings, relay="auto")  # the bound it planned by (a relayed exchange's)
        bounds.append(work_bound([list(x) for x in built.plan.rank_spans], kernel, settings))
        return staged(built, kernel)

    monkeypatch.setattr(planner, "_staged", spy)
    plan = plan_batch(lens, **kw)
    assert len(bounds) >= 2 and max(bounds) <= layer_time(plan, kernel), (bounds, layer_time(plan, kernel))
    monkeypatch.setattr(planner, "work_bound", lambda spans, kernel, settings: None)  # no bounds: plan every one
    assert plan_batch(lens, **kw).fingerprint == plan.fingerprint


def test_the_planner_runs_each_plan_in_the_stage_count_its_timeline_finds_fastest():
    """With ``max_stages=N`` a plan runs in N, N/2 or N/4 stages, whichever its timeline finds fastest: never
    slower (modelled) than the same plan in N stages, never more than N stages, and not always N."""
    from hf_fcp.plan.cost import kernel_for
    from hf_fcp.plan.planner import choose_execution
    from hf_fcp.plan.schedule import layer_time
    from hf_fcp.simulate import get_model, load_cluster, parse_distribution
    from hf_fcp.simulate.engine import planner_model
    from hf_fcp.workloads import make_batches

    counts = set()
    for world, dist in ((16, "lognormal"), (32, "stdlib"), (32, "bimodal")):
        machine = planner_model(get_model("llama3-8b"), load_cluster("h200"), world)
        kernel = kernel_for("kernel", machine["kernel_cost"])
        for lens in make_batches(parse_distribution(dist), world_size=world, tokens_per_rank=8192, steps=2, seed=4):
            plan = plan_batch(lens, world_size=world, block_size=2048, tokens_per_rank=8192, max_stages=16, **machine)
            assert len(plan.stages) <= 16 and plan.settings.max_stages == 16
            cap_per_stage = -(-plan.num_rounds // 16)
            counts.add(plan.settings.rounds_per_stage == cap_per_stage)
            at_cap = replace(plan, settings=replace(plan.settings, rounds_per_stage=cap_per_stage))
            assert layer_time(plan, kernel) <= layer_time(choose_execution(at_cap), kernel) * (1 + 1e-9)
    assert counts == {True, False}, counts  # some plans keep the cap's count, some run in fewer stages


@pytest.mark.parametrize("world,dist,model,tokens,seed", [(16, "lognormal", "llama3-70b", 8192, 0),
                                                         (16, "bimodal", "llama3-8b", 32768, 5)])
def test_no_magi_plan_is_faster_than_fcps_on_its_own_timeline(world, dist, model, tokens, seed):
    """fcp plans the dispatch MagiAttention makes among its alternatives and compares each alternative in its
    fastest stage count, as the baseline gets it: at every CP size and chunk the simulator gives magi, no
    magi plan is faster on fcp's timeline than fcp's own plan (the batches here were slower before)."""
    from hf_fcp.plan.cost import kernel_for
    from hf_fcp.plan.schedule import layer_time
    from hf_fcp.simulate import get_model, load_cluster, parse_distribution
    from hf_fcp.simulate.engine import planner_model
    from hf_fcp.simulate.strategies import build, cp_sizes
    from hf_fcp.workloads import make_batches

    machine = planner_model(get_model(model), load_cluster("h200"), world)
    kernel = kernel_for("kernel", machine["kernel_cost"])
    for lens in make_batches(parse_distribution(dist), world_size=world, tokens_per_rank=tokens, steps=2, seed=seed):
        ours = layer_time(plan_batch(lens, world_size=world, block_size=4096, tokens_per_rank=tokens, max_stages=16,
                                     **machine), kernel)
        for c in cp_sizes(lens, world, tokens, "best"):
            for magi in build("magi", lens, world_size=world, block_size=4096, tokens_per_rank=tokens, cp_size=c,
                              fcp_options=machine):
                assert ours <= layer_time(magi.plan, kernel) * (1 + 1e-5), (c, magi.plan.block_size)


@pytest.mark.parametrize("world,dist,tokens,seed", [(16, "lognormal", 8192, 0), (32, "paper", 32768, 3)])
def test_fcps_alternatives_include_every_magi_placement_within_the_cap(world, dist, tokens, seed):
    """At every CP size from the node size up and every chunk the simulator gives MagiAttention, its
    placement (its own data-parallel groups, filled by tokens) is one of fcp's grouped alternatives unless
    it puts more than the cap on a rank, which fcp never does. These batches' token-filled groups differ
    from fcp's own (:func:`group_items`) and fit."""
    from hf_fcp.plan.baseline_placements import place_dispatch
    from hf_fcp.plan.candidates import grouped
    from hf_fcp.simulate import parse_distribution
    from hf_fcp.simulate.strategies import build, cp_sizes
    from hf_fcp.workloads import make_batches

    lens = make_batches(parse_distribution(dist), world_size=world, tokens_per_rank=tokens, steps=1, seed=seed)[0]
    ours = grouped(lens, world, tokens, 4096, 8, lambda g_lens, ranks, cap, b: place_dispatch(g_lens, ranks, b, cap))
    ours = [tuple(tuple(x) for x in option) for option in ours]
    fits = 0
    for c in [c for c in cp_sizes(lens, world, tokens, "best") if c >= 8]:
        for magi in build("magi", lens, world_size=world, block_size=4096, tokens_per_rank=tokens, cp_size=c):
            if max(sum(b - a for _, a, b in x) for x in magi.plan.rank_spans) <= tokens:
                fits += 1
                assert magi.plan.rank_spans in ours, (c, magi.plan.block_size)
    assert fits >= 2


def test_magis_placement_over_the_cap_is_one_of_fcps_alternatives_within_it(monkeypatch):
    """Where MagiAttention's token-filled groups hold more than ``group × cap`` (its dispatch then puts up
    to 1.25-2.5× the cap on a rank), fcp plans that dispatch with the chunks over the cap moved to ranks
    with room: every token once, no rank over the cap, the same placement where nothing overflows. In this
    W=32 batch that alternative is fcp's fastest plan: without it, fcp's layer is 2% slower."""
    from hf_fcp.plan import candidates
    from hf_fcp.plan.baseline_placements import place_dispatch
    from hf_fcp.plan.candidates import _dispatch_groups
    from hf_fcp.plan.schedule import layer_time
    from hf_fcp.simulate import get_model, load_cluster, parse_distribution
    from hf_fcp.simulate.engine import planner_model
    from hf_fcp.workloads import make_batches

    world, cap = 32, 8192
    lens = make_batches(parse_distribution("lognormal"), world_size=world, tokens_per_rank=cap, steps=2, seed=5)[1]
    assert _dispatch_groups(lens, world, cap, 16) is None  # its groups of 16 overflow
    for group in (8, 16):
        over = place_dispatch(lens, world, 2048, cap, group=group)
        capped = place_dispatch(lens, world, 2048, cap, group=group, capped=True)
        assert max(sum(b - a for _, a, b in x) for x in over) > cap
        assert max(sum(b - a for _, a, b in x) for x in capped) <= cap
        held = sorted((s, a, b) for x in capped for s, a, b in x)
        assert sum(b - a for _, a, b in held) == sum(lens)
        assert all(b0 <= a1 for (s0, _, b0), (s1, a1, _) in zip(held, held[1:]) if s0 == s1)  # no token twice
    roomy = place_dispatch(lens, world, 2048, 2 * cap, group=8)  # twice the cap: no group overflows
    assert max(sum(b - a for _, a, b in x) for x in roomy) <= 2 * cap
    assert place_dispatch(lens, world, 2048, 2 * cap, group=8, capped=True) == roomy
    settings = {**planner_model(get_model("llama3-8b"), load_cluster("h200"), world), "relay": "never"}  # relayed,
    # another candidate is as fast here
    plan = plan_batch(lens, world_size=world, block_size=4096, tokens_per_rank=cap, max_stages=16, **settings)
    real = candidates.place_dispatch
    monkeypatch.setattr(candidates, "place_dispatch", lambda *a, capped=False, **k: None if capped else real(*a, **k))
    without = plan_batch(lens, world_size=world, block_size=4096, tokens_per_rank=cap, max_stages=16, **settings)
    kernel = FLASH
    assert layer_time(plan, kernel) * 1.02 < layer_time(without, kernel)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_placement_in_node_groups_covers_every_token_once_within_the_cap(seed):
    """``in_groups``: whole sequences stay inside one group of ranks; one that fits no group whole is cut over
    the groups with room; every token is placed once and no rank holds more than the cap."""
    from hf_fcp.plan.baseline_placements import place_dispatch
    from hf_fcp.plan.candidates import in_groups

    lens = make_batch(Distribution(name="lognormal", kind="lognormal", mu=7.0, sigma=1.8, max_len=60_000),
                      16 * 4096, np.random.default_rng(seed))
    spans = in_groups(lens, 16, 4096, 4, lambda g_lens, ranks, cap: place_dispatch(g_lens, ranks, 512, cap))
    assert max(sum(b - a for _, a, b in x) for x in spans) <= 4096
    extra = 0
    for s, n in enumerate(lens):
        pieces = sorted((a, b, r // 4) for r, x in enumerate(spans) for q, a, b in x if q == s)
        assert pieces[0][0] == 0 and pieces[-1][1] == n
        assert all(b0 == a1 for (_, b0, _), (a1, _, _) in zip(pieces, pieces[1:]))
        extra += len({g for _, _, g in pieces}) - 1
    # a cut fills every group it touches but its last: at most one extra group per group, over the batch
    assert 0 < extra <= 4


@pytest.mark.parametrize("node", [2, 4])
def test_a_node_aware_placement_keeps_more_kv_inside_nodes_at_the_same_balance(node, monkeypatch):
    """Four equally long documents on 8 ranks (each needs about two ranks' compute; the greedy interleaves
    them over all ranks): numbered by nodes (``topology.by_nodes``) its ranks that share documents share a
    node — the same per-rank span lists (so exactly the same balance and memory), at least 20%
    fewer K/V tokens between nodes (measured: 28-44%). The planner numbers its placement by nodes and also
    prices it in the numbering it was placed in (its timeline keeps the faster)."""
    from hf_fcp.plan import planner
    from hf_fcp.plan.placement import place_fcp
    from hf_fcp.plan.rounds import needed_pieces
    from hf_fcp.plan.topology import by_nodes

    def between_nodes(spans):
        return sum(b - a for (src, dst), pieces in needed_pieces(spans).items() if src // node != dst // node
                   for _, a, b in pieces)

    lens = (16384,) * 4
    plain = place_fcp(lens, 8, 1024, 8192, kernel=FLASH)
    aware = by_nodes(plain, node)
    assert sorted(map(tuple, aware)) == sorted(map(tuple, plain))
    assert between_nodes(aware) <= 0.8 * between_nodes(plain), (between_nodes(aware), between_nodes(plain))
    seen, fastest = [], planner._fastest

    def spy(placed, others, *rest):
        seen.append(([list(x) for x in placed], [o.build() for o in others]))
        return fastest(placed, others, *rest)

    monkeypatch.setattr(planner, "_fastest", spy)
    plan_batch(list(lens), world_size=8, block_size=1024, tokens_per_rank=8192, node_size=node)
    (primary, built), = seen
    assert between_nodes(primary) <= 0.8 * between_nodes(next(x for x in built if by_nodes(x, node) == primary))


@pytest.mark.parametrize("seed", range(4))
def test_the_node_numbering_weighs_exactly_the_kv_the_exchange_moves(seed):
    """``topology.kv_tokens`` (vectorised, for the numbering) counts the K/V tokens each rank sends each
    other as ``rounds.needed_pieces`` (the exchange) lists them, on greedy and zigzag placements."""
    from hf_fcp.plan.candidates import zigzag_long
    from hf_fcp.plan.placement import place_fcp
    from hf_fcp.plan.rounds import needed_pieces
    from hf_fcp.plan.topology import kv_tokens

    world = (8, 12, 24, 5)[seed]
    lens = make_batch(Distribution(name="kv", kind="lognormal", mu=6.5, sigma=2.0, max_len=200_000), world * 8192,
                      np.random.default_rng(seed))
    for spans in (place_fcp(tuple(lens), world, 1024, 8192, kernel=FLASH), zigzag_long(lens, world, 8192)):
        want = np.zeros((world, world))
        for (src, dst), pieces in needed_pieces(spans).items():
            want[src, dst] += sum(b - a for _, a, b in pieces)
        assert want.any() and np.array_equal(kv_tokens(spans), want)


@pytest.mark.parametrize("seed", range(4))
def test_the_planners_array_exchange_is_exactly_the_reference_one(seed):
    """``rounds.coloured`` (what the planner builds every plan's exchange with: the needed pieces as arrays,
    ``rounds.needed_rows``) gives the messages, rounds, pieces and message array of the reference path,
    ``colour_rounds(needed_pieces(spans))``, ``segments.pieces_of`` and ``FCPPlan.message_array``, on greedy,
    zigzag and dispatch placements with runs in any order; ``candidates.step_time``, which prices a placement
    from the same arrays, equals its reference from ``needed_pieces``."""
    from hf_fcp.plan.baseline_placements import place_dispatch
    from hf_fcp.plan.candidates import step_time, zigzag_long
    from hf_fcp.plan.execution import RankChoices, execution, link_tokens, remote_sources
    from hf_fcp.plan.fcp_plan import imbalance
    from hf_fcp.plan.placement import place_fcp
    from hf_fcp.plan.rounds import colour_rounds, coloured, needed_pieces
    from hf_fcp.plan.segments import pieces_of

    rng = np.random.default_rng(seed)
    world = (8, 12, 24, 5)[seed]
    lens = make_batch(Distribution(name="kv", kind="lognormal", mu=6.5, sigma=2.0, max_len=200_000), world * 8192, rng)
    for spans in (place_fcp(tuple(lens), world, 1024, 8192, kernel=FLASH), zigzag_long(lens, world, 8192),
                  place_dispatch(lens, world, 512, 8192)):
        spans = [[x[i] for i in rng.permutation(len(x))] for x in spans]
        transfers, rounds, pieces, messages = coloured(spans)
        assert (transfers, rounds) == colour_rounds(needed_pieces(spans)) and rounds > 1
        plan = plan_batch(lens, world_size=world, block_size=1024, tokens_per_rank=8192)
        want = replace(plan, transfers=transfers, num_rounds=rounds)
        assert np.array_equal(pieces, pieces_of(want)) and np.array_equal(messages, want.message_array)
        reference = needed_pieces(spans)  # step_time prices a placement from needed_columns
        choices = RankChoices(spans, FLASH, plan.settings.attention_layers, remote_sources(reference))
        t, work, split, _ = execution(choices, link_tokens(spans, ((None, 1),), reference), plan.settings, FLASH)
        assert step_time(spans, plan.settings, FLASH, detail=True) == (t, imbalance(work), not any(split))


def test_a_plans_messages_are_made_on_first_use_and_read_pickle_and_compare_as_a_tuple(monkeypatch):
    """The planner prices candidate plans by their arrays: a plan's :class:`Transfer` objects are made
    only when something reads them, once, and the plan pickles (to the training processes) with a plain
    tuple equal to them."""
    import pickle

    from hf_fcp.plan import rounds
    from hf_fcp.plan.placement import place_fcp

    made = []
    real = rounds._transfers
    monkeypatch.setattr(rounds, "_transfers", lambda *a: made.append(1) or real(*a))
    spans = place_fcp((3000, 900, 5000, 40, 7000), 5, 512, 4096, kernel=FLASH)
    transfers = rounds.coloured(spans)[0]
    assert len(transfers) > 1 and not made  # counted, not made
    assert list(transfers) == list(rounds.colour_rounds(rounds.needed_pieces(spans))[0]) and made == [1]
    assert transfers[0] == next(iter(transfers)) and made == [1]
    plan = plan_batch([3000, 900, 5000, 40, 7000], world_size=5, block_size=512, tokens_per_rank=4096)
    plan = replace(plan, transfers=rounds.coloured([list(x) for x in plan.rank_spans])[0])  # not made yet
    back = pickle.loads(pickle.dumps(plan))
    assert type(back.transfers) is tuple and back == plan and hash(back) == hash(plan)


@pytest.mark.parametrize("seed", range(3))
def test_the_fast_sort_orders_exactly_as_lexsort(seed):
    """``spans.lex_order`` (the planner's sorts of pieces and runs) gives ``np.lexsort``'s order: distinct
    rows (one argsort of a combined key), rows that repeat and keys too wide to combine (lexsort itself),
    negative keys, one key."""
    from hf_fcp.plan.spans import lex_order

    rng = np.random.default_rng(seed)
    n = 5000
    distinct = rng.permutation(n)
    cases = [(distinct % 7, distinct // 7 - 300), (rng.integers(0, 4, n), rng.integers(0, 3, n)),
             (rng.integers(0, 1 << 40, n), rng.integers(0, 1 << 40, n)), (rng.integers(-50, 50, n),),
             (distinct, rng.integers(0, 9, n), rng.integers(0, 5, n))]
    for keys in cases:
        assert np.array_equal(lex_order(*keys), np.lexsort(keys))


def test_beyond_the_search_budget_groups_are_also_placed_with_half_blocks(monkeypatch):
    """At hundreds of ranks (beyond the search budget) documents are cut over many ranks: fcp also places
    its grouped alternatives with half-size blocks, and MagiAttention-style dispatch gets the same chunks
    (every baseline its best settings). Within the budget, the groups keep the plan's block; a batch that
    half-size blocks would take past the planner's size limits keeps its block."""
    from hf_fcp.plan import candidates, planner
    from hf_fcp.plan.candidates import searched, tried_blocks
    from hf_fcp.plan.placement import place_fcp
    from hf_fcp.simulate.strategies import build

    lens = [40_000] * 3 + [900] * 200
    assert not searched(lens, 64) and searched(lens[:20], 16)
    assert tried_blocks(4096, 8192, 64, lens) == [4096, 2048] and tried_blocks(4096, 32768, 16, [32768] * 16) == [4096]
    # within the budget, the finer block is a quarter of the batch's mean share, not of the budget's room
    assert tried_blocks(4096, 32768, 16, [8192] * 16) == tried_blocks(4096, 8192, 16, [8192] * 16) == [4096, 2048]
    assert tried_blocks(4096, 131072, 1024, [4096 * 2048] * 16) == [4096]  # at the size limits: no finer block
    blocks, real = [], candidates.place_dispatch
    monkeypatch.setattr(candidates, "place_dispatch",
                        lambda g, r, b, cap, **k: blocks.append((r, b)) or real(g, r, b, cap, **k))
    placed = []
    monkeypatch.setattr(planner, "place_fcp",
                        lambda g, r, b, cap, **k: placed.append((r, b)) or place_fcp(g, r, b, cap, **k))
    plan_batch(lens, world_size=64, block_size=4096, tokens_per_rank=8192, max_stages=4)
    assert {b for r, b in placed if r < 64} == {4096, 2048}  # fcp inside groups, both block sizes
    assert {b for r, b in blocks if r < 64} == {4096, 2048}  # the dispatch inside groups too
    magi = build("magi", lens, world_size=64, block_size=4096, tokens_per_rank=8192, cp_size=64, stages=4)
    assert sorted(c.plan.block_size for c in magi) == [2048, 4096]
