"""The relayed exchange (:mod:`hf_fcp.plan.relay`): a piece several ranks of another node need crosses the
network once and is forwarded inside the node; forwards run after what they forward arrived; the planner
keeps a relayed plan only where its timeline is faster. Exactness on gloo: tests/test_attention_dist.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from hf_fcp import PlanSettings, plan_batch
from hf_fcp.plan import planner
from hf_fcp.plan.cost import kernel_for
from hf_fcp.plan.relay import relayed, relays
from hf_fcp.plan.schedule import layer_time
from hf_fcp.plan.validate import PlanError, check_plan, check_view

NODES = dict(node_size=4, node_link_cost=2.0, link_cost=34.0)  # the network 17x slower than a node's links
LENS = [40000, 9000, 700, 3000, 31, 12000, 5000]


def _relayed_plan(lens=LENS, world=12):
    """fcp's plan of ``lens`` with its exchange relayed (whether or not the timeline would keep it)."""
    return plan_batch(lens, world_size=world, block_size=1024, **NODES, relay="always")


def _network(plan, node=NODES["node_size"]):
    """(piece, receiving node) -> how often the network carries it."""
    return Counter((piece, t.dst // node) for t in plan.transfers if t.src // node != t.dst // node
                   for piece in t.pieces)


@pytest.mark.parametrize("world", [9, 12, 15])
def test_a_piece_crosses_the_network_once_per_node_and_is_forwarded_after_it_arrived(world):
    plan = _relayed_plan(world=world)
    plain = replace(plan, **dict(zip(("transfers", "num_rounds"), planner.coloured(
        [list(x) for x in plan.rank_spans])[:2])), relay_from=0)
    assert plan.relay_from and max(_network(plan).values()) == 1 < max(_network(plain).values())
    assert set(_network(plan)) == set(_network(plain))  # every node still gets every piece it needs
    check_plan(plan)  # each rank receives exactly what it needs, once; a forward only what arrived before
    for rank in range(world):
        check_view(plan, rank)
    assert plan.stages[0][0] == 0 and any(r0 == plan.relay_from for r0, _ in plan.stages)  # its own stages
    assert plan.stats().comm_bytes == plain.stats().comm_bytes  # as many bytes, fewer over the network


def test_a_forward_of_what_did_not_arrive_before_the_relay_phase_is_refused():
    plan = _relayed_plan()
    with pytest.raises(PlanError, match="does not hold it"):
        check_plan(replace(plan, relay_from=plan.num_rounds - 1 if plan.num_rounds > plan.relay_from + 1 else 0))


def test_the_relays_of_a_node_take_turns():
    """One document over three nodes of four: the pieces of the first node go to every rank of the others,
    each node's ranks relay equally many of them."""
    plan = _relayed_plan(lens=[12 * 4096])
    first = Counter(t.dst for t in plan.transfers if t.round < plan.relay_from and t.src // 4 != t.dst // 4
                    for _ in t.pieces)
    for node in (1, 2):
        counts = [first[r] for r in range(4 * node, 4 * node + 4)]
        assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("relay_from,per", [(0, 1), (5, 1), (5, 2), (6, 4), (3, 5)])
def test_stage_of_agrees_with_the_stages(relay_from, per):
    plan = _relayed_plan()
    plan = replace(plan, num_rounds=11, relay_from=relay_from, settings=replace(plan.settings, rounds_per_stage=per))
    expected = [k for k, (r0, r1) in enumerate(plan.stages) for _ in range(r0, r1)]
    assert plan.stage_of(np.arange(11)).tolist() == expected
    assert all(r1 - r0 <= per for r0, r1 in plan.stages)
    assert not relay_from or relay_from in {r0 for r0, _ in plan.stages}  # the relay phase starts a stage


def _kept(world: int) -> list[bool]:
    """Whether the plan of each of four batches is relayed, asserting on the way that it is no slower than its
    placement's relayed and plain exchanges (each in its best stage count); the h200 preset's network and
    NVLink."""
    from hf_fcp.simulate import get_model, load_cluster, parse_distribution
    from hf_fcp.simulate.engine import planner_model
    from hf_fcp.workloads import make_batches

    machine = planner_model(get_model("llama3-8b"), load_cluster("h200"), world)
    kernel = kernel_for("kernel", machine["kernel_cost"])
    kept = []
    for dist in ("lognormal", "light", "stdlib", "bimodal"):
        lens = make_batches(parse_distribution(dist), world_size=world, tokens_per_rank=8192, steps=1, seed=5)[0]
        plan = plan_batch(lens, world_size=world, block_size=2048, tokens_per_rank=8192, max_stages=8, **machine)
        made = planner.make_plan(plan.seq_lens, [list(x) for x in plan.rank_spans], world_size=world, block_size=2048,
                                 tokens_per_rank=8192, strategy="fcp", settings=replace(plan.settings, relay="auto"))
        for relay in ("always", "never"):  # make_plan (the baselines' plans) chooses the same way
            built = planner._build(plan.seq_lens, plan.rank_spans, world_size=world, block_size=2048,
                                   tokens_per_rank=8192, strategy="fcp", settings=replace(plan.settings, relay=relay,
                                                                                          max_stages=8))
            assert bool(built.plan.relay_from) == (relay == "always")
            either = layer_time(planner._choose_stages(built, kernel), kernel) * (1 + 1e-9)
            assert layer_time(plan, kernel) <= either and layer_time(made, kernel) <= either
        kept.append(bool(plan.relay_from))
    return kept


def test_the_planner_keeps_a_relayed_plan_only_where_its_timeline_is_faster():
    kept = _kept(16) + _kept(24) + _kept(32)
    assert any(kept) and not all(kept), kept  # both kinds of plan occur


def test_relays_only_across_nodes_with_cheaper_links_inside_them():
    assert relays(PlanSettings(**NODES), 12)
    assert not relays(PlanSettings(**NODES), 4)  # one node
    assert not relays(PlanSettings(**{**NODES, "relay": "never"}), 12)
    assert not relays(PlanSettings(**{**NODES, "node_link_cost": None}), 12)  # one link cost for all
    assert not relays(PlanSettings(**{**NODES, "node_link_cost": 34.0}), 12)
    assert relays(PlanSettings(**{**NODES, "node_link_cost": None, "relay": "always"}), 12)
    assert not relays(PlanSettings(**{**NODES, "relay": "always"}), 4)
    assert not relays(PlanSettings(**NODES, attention_layers=((None, 1), (512, 1))), 12)  # not priced: no relay
    assert relays(PlanSettings(**{**NODES, "relay": "always"}, attention_layers=((None, 1), (512, 1))), 12)
    assert relayed([[(0, 0, 10)], [(0, 10, 20)]], 1) is None  # nodes of one rank: nothing to share
    default = plan_batch(LENS, world_size=12, block_size=1024)
    assert default.relay_from == 0 and default.fingerprint == plan_batch(LENS, world_size=12, block_size=1024,
                                                                         relay="never").fingerprint
    for bad in ("yes", True):
        with pytest.raises(ValueError, match=r"relay: got .*, expected one of \['auto', 'always', 'never'\]"):
            PlanSettings(relay=bad)
