"""Scale simulator: hand-computable timings, strategy placements, workloads, cluster files and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from hf_fcp.cli import main as hf_fcp_main
from hf_fcp.plan import PlanSettings, make_plan, plan_batch, span_cost
from hf_fcp.simulate.cluster import PRESETS, Cluster, load_cluster
from hf_fcp.simulate.engine import simulate, simulate_strategy
from hf_fcp.simulate.models import AttentionModel, get_model
from hf_fcp.simulate.runner import JSON_KEYS
from hf_fcp.simulate.strategies import STRATEGY_NAMES, Candidate, NotApplicable, build
from hf_fcp.workloads import (
    make_batch,
    make_batches,
    parse_distribution,
    stdlib_lengths,
)

# One head of dimension 1: 4 FLOPs per (query, key) pair forward; K+V = 4 bytes per token.
TINY = AttentionModel(name="tiny", num_q_heads=1, num_kv_heads=1, head_dim=1, num_layers=1)
# Tiles of one pair and no overheads: kernel time = pairs / (efficiency × peak); no launch cost worth
# counting; every rank its own node (inter-node links).
FLAT = Cluster(name="flat", peak_flops=1e12, eff_fwd=0.5, eff_bwd=0.25, tile=1, fwd_q_tile=0.0, bwd_k_tile=0.0,
               launch_s=1e-15, gpus_per_node=1, nvlink_bw=1e12, nvlink_latency=1e-6, ib_bw=1e9, ib_latency=1e-5,
               comm_sms=1)


def _one_sequence_time(n: int) -> float:
    """Forward + backward seconds of one causal sequence of n tokens on FLAT (by hand)."""
    pairs = n * (n + 1) / 2
    return pairs * 4 / (1e12 * 0.5) + pairs * 4 * 2.5 / (1e12 * 0.25)


def _run(name, lens, world, cap, **kw):
    return simulate_strategy(name, lens, world_size=world, block_size=4096, tokens_per_rank=cap, model=TINY,
                             cluster=FLAT, **kw)


@pytest.mark.parametrize("name", ["fcp", "packing", "ring"])
def test_one_rank_is_pure_compute(name):
    r = _run(name, [1000], 1, 1000)
    expected = _one_sequence_time(1000)
    assert r.step_s == pytest.approx(expected, rel=1e-9)
    assert r.attention_mfu == pytest.approx(1000 * 1001 / 2 * 4 * 3.5 / (1e12 * expected), rel=1e-9)
    assert r.comm_bytes == 0 and r.exposed_comm_s == 0


@pytest.mark.parametrize("name", ["packing", "ring", "fcp"])
def test_two_equal_sequences_take_one_sequence_time(name):
    r = _run(name, [2048, 2048], 2, 2048)
    assert r.step_s == pytest.approx(_one_sequence_time(2048), rel=1e-6)
    assert r.compute_imbalance == pytest.approx(0.0, abs=1e-9)


def _split_plan(n: int, overlap: str = "always") -> Candidate:
    """One sequence of 2n tokens: rank 0 holds [0, n), rank 1 holds [n, 2n) and needs rank 0's K/V; run
    split (a local segment first, then the remote one) when overlapped."""
    settings = PlanSettings(overlap=overlap, fusion="none" if overlap == "always" else "auto")
    plan = make_plan((2 * n,), [[(0, 0, n)], [(0, n, 2 * n)]], world_size=2, block_size=n, tokens_per_rank=n,
                     strategy="split", comm="p2p", settings=settings)
    return Candidate(plan=plan, schedule="p2p")


def test_communication_bound_p2p():
    n = 1_000_000
    fast = replace(FLAT, peak_flops=1e30)  # compute ~0: the step is the transfer there and back
    r = simulate(_split_plan(n), TINY, fast)
    t = 1e-5 + 4 * n / 1e9  # latency + bytes / IB bandwidth
    assert r.fwd_s == pytest.approx(t, rel=1e-6) and r.bwd_s == pytest.approx(t, rel=1e-6)
    assert r.comm_bytes == pytest.approx(2 * 4 * n)  # K/V forward, dK/dV back
    assert r.exposed_comm_s == pytest.approx(2 * t, rel=1e-6)
    assert r.attention_mfu < 1e-9


def test_communication_bound_ring():
    n = 1_000_000
    cand = replace(_split_plan(n), schedule="ring", cp_size=2)
    r = simulate(cand, TINY, replace(FLAT, peak_flops=1e30))
    t = 4 * n / 1e9
    assert r.fwd_s == pytest.approx(1e-5 + t, rel=1e-6)  # one step of K/V
    assert r.bwd_s == pytest.approx(2e-5 + 3 * t, rel=1e-6)  # K/V + dK/dV, then dK/dV home


def test_overlap_hides_communication_behind_compute():
    n = 4096
    r = simulate(_split_plan(n), TINY, replace(FLAT, peak_flops=1e9))  # slow compute, same link
    assert r.exposed_comm_s < 0.01 * r.step_s


def test_communication_kernels_slow_compute_only_while_they_run():
    n = 4096
    cluster = replace(FLAT, peak_flops=1e9)  # compute long after each transfer ended
    busy, quiet = (simulate(_split_plan(n), TINY, replace(cluster, comm_sms=sms)) for sms in (8, 1e-9))
    t = 1e-5 + 4 * n / 1e9  # one transfer each way, beside rank 1's local work
    lost = busy.rank_compute_s - quiet.rank_compute_s
    assert lost[1] == pytest.approx(2 * t * 8 / cluster.num_sms, rel=1e-4)
    assert busy.step_s - quiet.step_s < 0.01 * busy.step_s  # not the whole pass slowed: ~1/30000 of it


def test_ring_compute_is_slowed_only_while_its_steps_transfer():
    """Ring's transfer windows come from its steps: rank r's step-0 compute runs beside the next block
    (forward: K/V; backward: K/V and dK/dV), the rest of the pass at full speed."""
    n = 4096
    cluster = replace(FLAT, peak_flops=1e9)  # each step's compute outlasts its transfer
    cand = replace(_split_plan(n), schedule="ring", cp_size=2)
    busy, quiet = (simulate(cand, TINY, replace(cluster, comm_sms=sms)) for sms in (8, 1e-9))
    t = (1e-5 + 4 * n / 1e9) + (1e-5 + 2 * 4 * n / 1e9)  # one step's transfer forward, one backward
    lost = busy.rank_compute_s - quiet.rank_compute_s
    np.testing.assert_allclose(lost, 2 * [t * 8 / cluster.num_sms], rtol=1e-4)


def _merged(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _overlap_with_comm(trace) -> float:
    """Wall time of the traced rank's compute that ran while one of its transfers was in flight."""
    comm = _merged([(s, e) for _, kind, s, e, _ in trace if kind == "comm"])
    return sum(max(0.0, min(e, ce) - max(s, cs)) for _, kind, s, e, _ in trace if kind == "compute"
               for cs, ce in comm)


SCHEDULE_CASES = [("fcp", {"overlap": "always"}, "p2p"), ("fcp", {"overlap": "never"}, "p2p"), ("magi", {}, "p2p"),
                  ("ring", {}, "ring"), ("wlb", {}, "ring"), ("bytescale", {}, "ring"), ("allgather", {}, "allgather"),
                  ("packing", {}, "local")]


@pytest.mark.parametrize("name, options, sched", SCHEDULE_CASES)
def test_one_rule_for_every_schedule_compute_slowed_exactly_while_the_ranks_transfers_run(name, options, sched):
    """Every strategy pays the communication kernels' SM share on exactly the compute that overlaps its own
    rank's transfers: lost compute time = (1 − share) × that overlap, per rank (0 where nothing overlaps)."""
    lens = [3000, 700, 900, 400, 1200, 600, 800, 400] if name == "packing" else [6000, 700, 900, 400]
    cluster = replace(FLAT, peak_flops=2e9, comm_sms=8)
    kw = dict(world_size=4, block_size=1024, tokens_per_rank=2000, model=TINY, cp_size=4, fcp_options=options)
    if name == "packing":
        kw["tokens_per_rank"] = 3000
    quiet = simulate_strategy(name, lens, cluster=replace(cluster, comm_sms=1e-9), **kw)
    overlapped = 0.0
    for r in range(4):
        busy = simulate_strategy(name, lens, cluster=cluster, trace_rank=r, **kw)
        assert busy.cp_size == quiet.cp_size
        both = _overlap_with_comm(busy.trace)
        overlapped += both
        lost = busy.rank_compute_s[r] - quiet.rank_compute_s[r]
        assert lost == pytest.approx(both * 8 / cluster.num_sms, rel=1e-6, abs=1e-15), (name, r)
    if sched in ("p2p", "ring") and options.get("overlap") != "never":
        assert overlapped > 0  # the rule was exercised, not only its empty case


def test_without_overlap_the_exchange_is_exposed_and_compute_runs_at_full_speed():
    n = 4096
    cluster = replace(FLAT, peak_flops=1e9)
    hidden, exposed = (simulate(_split_plan(n, o), TINY, cluster) for o in ("always", "never"))
    t = 1e-5 + 4 * n / 1e9  # one transfer each way
    assert exposed.exposed_comm_s >= 2 * t * (1 - 1e-6)  # each pass waits for its exchange
    assert exposed.rank_compute_s.max() < hidden.rank_compute_s.max()  # no communication kernels beside it
    assert exposed.step_s == pytest.approx(exposed.rank_compute_s.max() + 2 * t, rel=1e-6)


def _covers_once(plan) -> None:
    for s, length in enumerate(plan.seq_lens):
        pieces = sorted((a, b) for spans in plan.rank_spans for q, a, b in spans if q == s)
        assert pieces[0][0] == 0 and pieces[-1][1] == length, (plan.strategy, s)
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(pieces, pieces[1:])), (plan.strategy, s)


@pytest.mark.parametrize("name", [n for n in STRATEGY_NAMES if n != "packing"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_strategy_covers_every_token_once(name, seed):
    lens = make_batch(parse_distribution("paper"), 8 * 8192, np.random.default_rng(seed))
    cands = build(name, lens, world_size=8, block_size=1024, tokens_per_rank=8192, cp_size="best")
    assert cands
    for cand in cands:
        _covers_once(cand.plan)
        r = simulate(cand, TINY, FLAT)
        assert r.rank_pairs.sum() == pytest.approx(float(span_cost(0, np.asarray(lens)).sum()))


def test_magi_gets_fcps_settings_execution_colouring_and_chunks():
    """magi's plans are scheduled exactly as fcp's: the same planner settings (the machine's model), its
    rounds coalesced into at most the same number of stages, the execution and colouring chosen by
    ``planner.schedule`` and the stage count by ``planner.choose_stages``, and one candidate per block size
    fcp tries."""
    from hf_fcp.plan.candidates import tried_blocks
    from hf_fcp.plan.cost import kernel_for
    from hf_fcp.plan.planner import choose_stages, schedule
    from hf_fcp.plan.rounds import colour_rounds, needed_pieces
    from hf_fcp.simulate.engine import planner_model

    lens = make_batch(parse_distribution("paper"), 4 * 8192, np.random.default_rng(3))
    options = planner_model(get_model("llama3-70b"), PRESETS["h200"], 4)
    cands = build("magi", lens, world_size=4, block_size=4096, tokens_per_rank=8192, cp_size=4, stages=2,
                  fcp_options=options)
    assert sorted(c.plan.block_size for c in cands) == sorted(tried_blocks(4096, 8192, 4, lens)) == [2048, 4096]
    for cand in cands:
        plan = cand.plan
        assert plan.settings == PlanSettings(**options, max_stages=2, rounds_per_stage=plan.settings.rounds_per_stage)
        transfers, rounds = colour_rounds(needed_pieces([list(x) for x in plan.rank_spans]))
        assert plan.settings.max_stages == 2 and plan.settings.rounds_per_stage in (-(-rounds // 2), rounds)
        nominal = replace(plan.settings, rounds_per_stage=-(-rounds // 2))
        expect = choose_stages(schedule(replace(plan, transfers=transfers, num_rounds=rounds, settings=nominal)),
                               kernel_for("kernel", options["kernel_cost"]))
        assert (expect.transfers, expect.fused, expect.overlap, expect.settings) == (
            plan.transfers, plan.fused, plan.overlap, plan.settings)
        assert expect.transfers != transfers or plan.num_rounds < 2  # the colouring was chosen, not the graph's


def test_packing_covers_or_is_not_applicable():
    cand = build("packing", [100, 50, 50, 100, 60, 40], world_size=4, block_size=64, tokens_per_rank=100)[0]
    _covers_once(cand.plan)
    assert [sum(b - a for _, a, b in spans) for spans in cand.plan.rank_spans] == [100] * 4
    with pytest.raises(NotApplicable):
        build("packing", [300, 100], world_size=4, block_size=64, tokens_per_rank=100)


def test_bytescale_gives_a_long_sequence_the_fewest_ranks():
    plan = build("bytescale", [250, 50, 50, 50], world_size=4, block_size=64, tokens_per_rank=100)[0].plan
    holders = {r for r, spans in enumerate(plan.rank_spans) for s, _, _ in spans if s == 0}
    assert len(holders) == 3


def test_fixed_cp_group_holds_the_longest_sequence():
    cand = build("ring", [300, 100, 100, 100, 100, 100, 100, 100], world_size=8, block_size=64,
                 tokens_per_rank=128)[0]
    assert cand.cp_size == 4
    with pytest.raises(NotApplicable):
        build("ring", [300, 724], world_size=8, block_size=64, tokens_per_rank=128, cp_size=2)


def test_fcp_beats_ring_on_a_long_tail():
    lens = [56_000] + [500] * 8 + [1000] * 4  # one long document among short ones, 8 ranks of 8K
    fcp = _run("fcp", lens, 8, 8192)
    ring = simulate_strategy("ring", lens, world_size=8, block_size=4096, tokens_per_rank=8192, model=TINY,
                             cluster=FLAT)
    assert fcp.attention_mfu > ring.attention_mfu
    assert fcp.flop_imbalance < 0.05


# ---------------------------------------------------------------- workloads, models, cluster
def test_batches_fill_the_budget_exactly_and_are_seeded():
    dist = parse_distribution("lognormal")
    a = make_batches(dist, world_size=4, tokens_per_rank=8192, steps=3, seed=5)
    b = make_batches(dist, world_size=4, tokens_per_rank=8192, steps=3, seed=5)
    assert a == b and all(sum(x) == 4 * 8192 and min(x) >= 1 for x in a)
    assert a[0] != a[1]


@pytest.mark.parametrize("spec, check", [
    ("paper", lambda x: x.max() <= 512 * 1024),
    ("lognormal:5,1,1000", lambda x: x.max() <= 1000),
    ("bimodal:0", lambda x: x.min() >= 512 and x.max() <= 2048),
    ("light", lambda x: np.median(x) < 2000),
])
def test_distributions(spec, check):
    assert check(parse_distribution(spec).sample(np.random.default_rng(0), 5000))


def test_stdlib_lengths_are_measured_here(tmp_path):
    lens = stdlib_lengths()
    assert len(lens) > 100 and min(lens) >= 1
    f = tmp_path / "l.txt"
    f.write_text("10\n# comment\n20\n")
    assert parse_distribution(f"file:{f}").lengths == (10, 20)


@pytest.mark.parametrize("spec", ["nope", "lognormal:1,2", "lognormal:a,b,c", "bimodal:2", "file:/no/such"])
def test_bad_distribution_names_the_value(spec):
    with pytest.raises(ValueError, match="got|does not exist"):
        parse_distribution(spec)


def test_efficiency_curve_follows_the_paper_shape():
    c = PRESETS["h100"]
    rel = lambda n: float(c.efficiency(n, n) / c.efficiency(16384, 16384))  # noqa: E731
    assert 0.25 <= rel(512) <= 0.40  # 512-token blocks: ~25-35% of long-sequence efficiency (FA3 Fig. 5)
    assert rel(2048) < 0.8 < rel(4096)  # falls below 2K (paper: 0.72 at 2K, 0.875 at 4K; the fit: 0.67, 0.83)
    assert c.efficiency(16384, 16384, backward=True) < c.efficiency(16384, 16384)
    # a short query run against long keys: cheap forward (one thread block per query tile, long loop)
    assert c.efficiency(512, 32768, False) > c.efficiency(4096, 4096)


def test_cluster_file_overrides_and_errors(tmp_path):
    f = tmp_path / "slow_ib.json"
    f.write_text(json.dumps({"base": "h200", "ib_bw": 25e9, "_measured": {"note": "ignored"}}))
    c = load_cluster(str(f))
    assert c.ib_bw == 25e9 and c.peak_flops == PRESETS["h200"].peak_flops and c.name == "slow_ib"
    f.write_text(json.dumps({"ib_bandwidth": 1}))
    with pytest.raises(ValueError, match="unknown field"):
        load_cluster(str(f))
    f.write_text(json.dumps({"eff_fwd": 1.5}))
    with pytest.raises(ValueError, match="eff_fwd"):
        load_cluster(str(f))
    assert get_model("llama3-70b").kv_bytes_per_token == 2 * 8 * 128 * 2


# ---------------------------------------------------------------- CLI
SMALL = ["--world-sizes", "4,8", "--tokens-per-rank", "4096", "--steps", "1", "--distribution", "paper"]


def test_cli_json_schema(capsys):
    assert hf_fcp_main(["simulate", *SMALL, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert {r["strategy"] for r in rows} >= {"fcp", "ring", "allgather", "bytescale", "wlb", "magi"}
    assert {r["world_size"] for r in rows} == {4, 8}
    for r in rows:
        assert list(r)[: len(JSON_KEYS)] == list(JSON_KEYS)
        assert 0 < r["attention_mfu"] < 1 and r["step_ms"] > 0 and r["comm_bytes"] >= 0
    assert all(na["strategy"] == "packing" for na in out["not_applicable"])


def test_cli_table_shows_speedups_and_writes_plots(capsys, tmp_path):
    assert hf_fcp_main(["simulate", *SMALL, "--strategies", "fcp,ring", "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fcp speedup" in out and "1.00x" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mfu_vs_world.png", "rank_loads.png", "timeline.png"]


def test_cli_block_sweep(capsys, tmp_path):
    assert hf_fcp_main(["simulate", *SMALL, "--sweep-block-size", "512,2048", "--json", "--plot", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {(r["strategy"], r["block_size"]) for r in rows} == {("fcp", 512), ("fcp", 2048)}
    assert (tmp_path / "block_sweep.png").is_file()


@pytest.mark.parametrize("bad", [
    ["--world-sizes", "0"], ["--world-sizes", "x"], ["--distribution", "nope"], ["--cluster", "missing.json"],
    ["--lengths", "/no/such/file"], ["--steps", "-1"], ["--fcp-option", "foo=1"], ["--stages", "-1"],
    ["--strategies", "fcp,nope"], ["--cp-size", "huge"], ["--block-size", "64", "--sweep-block-size"],
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        code = hf_fcp_main(["simulate", "--world-sizes", "4", "--tokens-per-rank", "1024", "--steps", "1", *bad])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-fcp") and "error" in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("fusion, overlap", [("all", "always"), ("all", "never"), ("none", "always"), ("auto", "auto")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_simulator_prices_exactly_the_segments_the_engine_runs(fusion, overlap, seed):
    """Every (rank, slot, queries, keys) segment the rank views run is one the simulator times, and no other."""
    from collections import Counter

    from hf_fcp.simulate.segments import Segments, Spans, local_segments, p2p_segments

    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 3000, size=int(rng.integers(2, 12))).tolist() + [int(rng.integers(3000, 20000))]
    world = int(rng.integers(2, 7))
    plan = plan_batch(lens, world_size=world, block_size=512, rounds_per_stage=int(rng.integers(1, 3)),
                      fusion=fusion, overlap=overlap)
    sp = Spans.of(plan)
    segs = Segments.concat([local_segments(sp), p2p_segments(plan, sp)[0]])
    simulated = Counter(zip(segs.rank.tolist(), segs.slot.tolist(), segs.q.astype(int).tolist(),
                            segs.k.astype(int).tolist()))
    executed = Counter()
    for r in range(world):
        view = plan.for_rank(r)
        lists = [(0, view.local_tasks)] + [(1 + i, t) for i, st in enumerate(view.stages) for t in (st.tasks, st.fused)]
        for slot, tasks in lists:
            for i in range(tasks.num_segments):
                executed[r, slot, tasks.offs_q[i + 1] - tasks.offs_q[i], tasks.offs_k[i + 1] - tasks.offs_k[i]] += 1
    assert simulated == executed
    assert segs.pairs.sum() == pytest.approx(float(span_cost(0, np.asarray(lens)).sum()))


@pytest.mark.parametrize("fusion, overlap", [("all", "always"), ("none", "always"), ("auto", "never")])
def test_within_a_node_the_planners_timeline_is_the_simulators_step(fusion, overlap):
    """The planner prices a p2p plan on the simulator's own timeline in kernel-work units (one unit: one
    causal pair's forward + backward time): within one node, its layer time × that unit is the simulated
    step — tile costs, every kernel launch (one per time slot with work), transfers and their slowdown."""
    from hf_fcp.plan.cost import kernel_for
    from hf_fcp.plan.schedule import layer_time
    from hf_fcp.simulate.engine import planner_model
    from hf_fcp.simulate.models import BWD_FLOP_RATIO

    model, cluster = get_model("llama3-8b"), load_cluster("h200")
    fpp = model.fwd_flops_per_pair / cluster.peak_flops
    pair_s = fpp / cluster.eff_fwd + fpp * BWD_FLOP_RATIO / cluster.eff_bwd
    for world, seed in ((3, 0), (8, 1)):
        machine = planner_model(model, cluster, world)
        lens = make_batch(parse_distribution("bimodal"), world * 8192, np.random.default_rng(seed))
        plan = plan_batch(lens, world_size=world, block_size=4096, tokens_per_rank=8192, max_stages=16,
                          fusion=fusion, overlap=overlap, **machine)
        assert len(plan.stages) > 1  # several stages: several launches on some ranks
        step = simulate(Candidate(plan=plan, schedule="p2p"), model, cluster).step_s
        kernel = kernel_for("kernel", machine["kernel_cost"])
        assert layer_time(plan, kernel) * pair_s == pytest.approx(step, rel=1e-9)
