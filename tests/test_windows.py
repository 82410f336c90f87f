"""Plans for sliding-window layers: each window's exchange brings exactly the keys inside the windows of a
rank's runs, in congestion-free rounds, several times fewer bytes than full causal attention; the
planner balances the model's mix of layer kinds."""

from collections import defaultdict

import numpy as np
import pytest

from hf_fcp import PlanSettings, plan_batch
from hf_fcp.plan.validate import check_view
from hf_fcp.workloads import make_batch, parse_distribution


def random_batch(seed: int, window: int) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    lens = [1, 1, 12 * window + 5, max(1, window - 1), window + 1] + rng.integers(1, 4 * window, size=6).tolist()
    rng.shuffle(lens)
    return tuple(int(n) for n in lens)


def window_need(plan, window: int) -> dict[tuple[int, int], set[int]]:
    """(rank, seq) -> positions the rank must receive: inside the windows of its runs, not held by it."""
    held = defaultdict(set)
    for r, spans in enumerate(plan.rank_spans):
        for s, a, b in spans:
            held[(r, s)].update(range(a, b))
    need = defaultdict(set)
    for r, spans in enumerate(plan.rank_spans):
        for s, a, b in spans:
            need[(r, s)].update(p for p in range(max(0, a - window + 1), a) if p not in held[(r, s)])
    return {key: ps for key, ps in need.items() if ps}


@pytest.mark.parametrize("world", [2, 3, 5, 8])
@pytest.mark.parametrize("strategy", ["fcp", "ring", "allgather"])
def test_window_exchange_delivers_exactly_the_window_keys(world, strategy):
    for seed, window in ((world, 7), (world + 10, 16), (world + 20, 1)):
        lens = random_batch(seed, window)
        plan = plan_batch(lens, world_size=world, block_size=8, strategy=strategy,
                          attention_layers=((None, 1), (window, 3)))
        wp = plan.for_window(window)
        got, sends, recvs = defaultdict(list), set(), set()
        for t in wp.transfers:
            assert (t.src, t.round) not in sends and (t.dst, t.round) not in recvs, "two messages in a round"
            sends.add((t.src, t.round))
            recvs.add((t.dst, t.round))
            assert 0 <= t.round < wp.num_rounds
            for s, a, b in t.pieces:
                assert any(x == s and c <= a and b <= d for x, c, d in plan.rank_spans[t.src]), "sends unheld"
                got[(t.dst, s)] += range(a, b)
        assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in window_need(plan, window).items()}
        assert not wp.collective and wp.rank_spans == plan.rank_spans


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_window_views_serve_exactly_the_window_keys(world):
    for seed in range(3):
        window = (3, 8, 21)[seed]
        plan = plan_batch(random_batch(seed + 5 * world, window), world_size=world, block_size=8,
                          attention_layers=((window, 2), (None, 1)), rounds_per_stage=1 + seed % 2,
                          overlap=("always", "never", "auto")[seed])
        for rank in range(world):
            check_view(plan.for_window(window), rank)
            view = plan.for_rank(rank)
            assert view.for_window(window).window == window and view.for_window(None) is view


def test_window_traffic_is_several_times_smaller_than_full_attention():
    window = 256
    lens = (40 * window, 12 * window, 300, 40)  # documents that must span ranks
    for world in (2, 4, 8):
        plan = plan_batch(lens, world_size=world, block_size=128, attention_layers=((None, 1), (window, 1)))
        full, windowed = plan.stats().comm_bytes, plan.for_window(window).stats().comm_bytes
        assert 0 < windowed * 3 < full, (world, full, windowed)


def test_unknown_window_is_named():
    plan = plan_batch((50, 20), world_size=2, block_size=8, attention_layers=((None, 1), (16, 1)))
    with pytest.raises(ValueError, match=r"window: got 32, expected one of the plan's sliding windows \[16\]"):
        plan.for_window(32)
    with pytest.raises(ValueError, match=r"window: got 32, expected None or one of the plan's sliding windows"):
        plan.for_rank(0).for_window(32)


@pytest.mark.parametrize("layers", [(), ((None, 1), (None, 2)), ((0, 1),), ((None, 0),), ((True, 1),), [(None, 1)],
                                    ((None,),)])
def test_bad_attention_layers_are_named(layers):
    with pytest.raises(ValueError, match="attention_layers: got"):
        PlanSettings(attention_layers=layers)


@pytest.mark.parametrize("seed", range(3))
def test_planner_balances_windowed_work(seed):
    """A model whose layers all slide: long documents cost linear work, and the plan balances that."""
    lens = make_batch(parse_distribution("lognormal:8.5,1.5,262144"), 8 * 32768, np.random.default_rng(seed))
    windowed = plan_batch(lens, world_size=8, block_size=4096, tokens_per_rank=32768,
                          attention_layers=((4096, 1),))
    assert windowed.stats().compute_imbalance < 0.03, windowed.stats().compute_imbalance
    full = plan_batch(lens, world_size=8, block_size=4096, tokens_per_rank=32768)
    assert windowed.rank_loads().work.sum() < full.rank_loads().work.sum()


def test_plugin_collator_plans_the_model_layer_kinds():
    from hf_fcp import FCPPlugin
    from hf_fcp.testing.families import tiny_config

    gemma = ["sliding_attention"] * 5 + ["full_attention"]
    for family, overrides, want in (("gemma3_text", {"sliding_window": 6, "num_hidden_layers": 6, "layer_types": gemma},
                                     {6: 5, None: 1}),
                                    ("mistral", {"sliding_window": 6}, {6: None}),
                                    ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1,
                                               "layer_types": None, "num_hidden_layers": 3}, {None: 1, 6: 2}),
                                    ("llama", {}, {None: None})):
        cfg = tiny_config(family, **overrides)
        layers = dict(FCPPlugin().collator(cfg).settings.attention_layers)
        assert layers.keys() == want.keys(), (family, layers)
        assert all(n is None or layers[w] == n for w, n in want.items()), (family, layers)
        assert sum(layers.values()) == cfg.num_hidden_layers
