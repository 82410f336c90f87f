"""fcp_attention and the ring-attention baseline on spawned gloo groups (W = 1..4) vs the float64 reference.

One spawn per world size runs every case (spawning is the slow part); the tests then check each case's
gathered forward output, LSE and dq/dk/dv, and the bytes that actually moved against the plan.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from hf_fcp import plan_batch
from hf_fcp.testing import run_workers
from hf_fcp.testing.cases import AttentionCase as Case
from hf_fcp.testing.cases import compare_to_reference, plan_for, run_cases

TIMEOUT_S = 90.0


def spanning_lens(world: int, block: int, seed: int) -> tuple[int, ...]:
    """1-token sequences, a sequence spanning every rank, lengths off block multiples, shuffled."""
    rng = np.random.default_rng(seed)
    lens = [1, 1, block * world * 2 + 3, block + 1, 2 * block - 1]
    lens += rng.integers(1, 3 * block + 2, size=4).tolist()
    rng.shuffle(lens)
    return tuple(int(n) for n in lens)


def cases_for(world: int) -> list[Case]:
    out = [
        Case("fcp_b8_gqa4", spanning_lens(world, 8, 1), 8),
        Case("fcp_fused_overlapped_rps2", spanning_lens(world, 8, 14), 8, fusion="all", overlap="always",
             rounds_per_stage=2),
        Case("fcp_fused_after_exchange_bf16", spanning_lens(world, 8, 15), 8, fusion="all", overlap="never",
             dtype=torch.bfloat16),
        Case("fcp_split_overlapped_mqa8", spanning_lens(world, 4, 16), 4, fusion="none", overlap="always",
             heads=(8, 1)),
        Case("fcp_split_after_exchange_3layers", spanning_lens(world, 8, 17), 8, fusion="none", overlap="never",
             layers=3),
        Case("fcp_b3_mqa8_rps2", spanning_lens(world, 3, 2), 3, rounds_per_stage=2, heads=(8, 1)),
        Case("fcp_b16_mha_rps3", spanning_lens(world, 16, 3), 16, rounds_per_stage=3, heads=(4, 4)),
        Case("fcp_b4_prefetch1", spanning_lens(world, 4, 12), 4, prefetch=1),
        Case("fcp_b4_prefetch2", spanning_lens(world, 4, 13), 4, prefetch=2, heads=(4, 1)),
        Case("fcp_b8_bf16", spanning_lens(world, 8, 4), 8, dtype=torch.bfloat16),
        Case("fcp_b8_3layers", spanning_lens(world, 8, 9), 8, layers=3),
        Case("relay_nodes_of_2", spanning_lens(world, 8, 30), 8, node_size=2),
        Case("relay_split_overlapped_rps2_mqa8", spanning_lens(world, 4, 37), 4, node_size=2, fusion="none",
             overlap="always", rounds_per_stage=2, heads=(8, 1)),
        Case("relay_fused_after_exchange_bf16", spanning_lens(world, 8, 65), 8, node_size=2, fusion="all",
             overlap="never", dtype=torch.bfloat16),
        Case("relay_prefetch1_3layers", spanning_lens(world, 8, 34), 8, node_size=2, prefetch=1, layers=3),
        Case("relay_window5", spanning_lens(world, 8, 35), 8, node_size=2, window=5),
        Case("tiny_batch_idle_ranks", (1, 2), 4, heads=(4, 1)),  # W >= 3: some ranks hold no token
        Case("world1_view_inside_group", spanning_lens(world, 8, 11), 8, local=True),
        Case("window5_docs_13x_window", spanning_lens(world, 8, 20), 8, window=5),
        Case("window13_after_exchange_rps2", spanning_lens(world, 8, 21), 8, window=13, overlap="never",
             rounds_per_stage=2, heads=(4, 1)),
        Case("window1_no_exchange", spanning_lens(world, 8, 22), 8, window=1),
        Case("window9_sinks_bf16", spanning_lens(world, 8, 23), 8, window=9, sinks=True, dtype=torch.bfloat16),
        Case("softcap_sinks_gqa4", spanning_lens(world, 8, 24), 8, softcap=5.0, sinks=True),
        Case("window6_softcap_3layers", spanning_lens(world, 4, 25), 4, window=6, softcap=3.0, layers=3),
        Case("window7_ring_placement", spanning_lens(world, 8, 26), 8, window=7, strategy="ring"),
        Case("ring_placement", spanning_lens(world, 8, 5), 8, strategy="ring"),
        Case("allgather_placement_rps2", spanning_lens(world, 8, 6), 8, strategy="allgather", rounds_per_stage=2),
        Case("ring_baseline_gqa4", spanning_lens(world, 8, 7), 8, strategy="ring", op="ring"),
        Case("ring_baseline_mqa8_bf16", spanning_lens(world, 8, 8), 8, strategy="ring", op="ring", heads=(8, 1),
             dtype=torch.bfloat16),
        Case("ring_baseline_2layers", spanning_lens(world, 8, 10), 8, strategy="ring", op="ring", layers=2),
        Case("ring_baseline_tiny_batch", (1, 2), 4, strategy="ring", op="ring"),
    ]
    return out


# ----------------------------------------------------------------------------- worker side
def _mismatch(rank: int, world: int, bad_rank: int, kind: str) -> str:
    """One rank uses another plan (or bad inputs); returns the error each rank raised, or 'no error'."""
    from hf_fcp.engine.attention import fcp_attention

    lens = (40, 3, 1, 17)
    block = 5 if (kind == "plan" and rank == bad_rank) else 8
    view = plan_batch(lens, world_size=world, block_size=block).for_rank(rank)
    n = view.num_local - (1 if kind == "input" and rank == bad_rank else 0)
    q, k, v = (torch.randn(n, h, 16) for h in (4, 2, 2))
    try:
        fcp_attention(q, k, v, view)
    except Exception as exc:  # noqa: BLE001 — the test checks type and message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# ----------------------------------------------------------------------------- parent side
@functools.lru_cache(maxsize=None)
def results(world: int) -> list[list[dict]]:
    """Per case, per rank results (one spawn per world size, cached for the module)."""
    per_rank = run_workers(run_cases, world, cases_for(world), timeout=TIMEOUT_S)
    return [[per_rank[r][i] for r in range(world)] for i in range(len(cases_for(world)))]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("index", range(len(cases_for(1))), ids=[c.name for c in cases_for(1)])
def test_matches_float64_reference(world, index):
    case = cases_for(world)[index]
    parts = results(world)[index]
    parts = parts[:1] if case.local else parts  # local: rank 0's copy (the others: test_local_views_agree)
    errors = compare_to_reference(case, parts)
    assert not errors, f"W={world} {case.name}: {errors}"


@pytest.mark.parametrize("world", [3, 4])
def test_the_relay_cases_relay(world):
    """Their plans forward K/V inside a node (else the cases above would not test relays)."""
    relayed = [plan_for(case, world).relay_from > 0 for case in cases_for(world) if case.node_size]
    assert relayed and all(relayed)


@pytest.mark.parametrize("world", [5, 7])
def test_relayed_exchanges_match_float64_reference_at_more_ranks(world):
    """Relays on odd world sizes with a part-filled last node (nodes of 2), forward and backward."""
    cases = [c for c in cases_for(world) if c.node_size][:3]
    assert all(plan_for(case, world).relay_from for case in cases)
    per_rank = run_workers(run_cases, world, cases, timeout=TIMEOUT_S)
    for i, case in enumerate(cases):
        errors = compare_to_reference(case, [per_rank[r][i] for r in range(world)])
        assert not errors, f"W={world} {case.name}: {errors}"


@pytest.mark.parametrize("world", [2, 4])
def test_local_views_agree_without_traffic(world):
    index = [c.local for c in cases_for(world)].index(True)
    parts = results(world)[index]
    assert all(p["bytes"] == {} and p["recv_bytes"] == 0 for p in parts)
    for p in parts[1:]:
        assert torch.equal(p["out"], parts[0]["out"]) and torch.equal(p["grads"][0], parts[0]["grads"][0])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bytes_moved_equal_plan_prediction(world):
    for case, parts in zip(cases_for(world), results(world)):
        kv = sum(p["bytes"].get("kv", 0) for p in parts) // case.layers
        if case.op == "fcp":
            plan = plan_for(case, world).for_window(case.window)
            predicted = plan.stats().comm_bytes
            assert kv == predicted, f"{case.name}: moved {kv} bytes, plan predicts {predicted}"
            if not case.local:  # and each rank sends what the plan says it sends (a relay: what it forwards too)
                per_rank = (plan.rank_loads().kv_out * plan.settings.kv_bytes_per_token).tolist()
                assert [p["bytes"].get("kv", 0) // case.layers for p in parts] == per_rank, case.name
            assert sum(p["bytes"].get("grad", 0) for p in parts) == predicted * case.layers, case.name
        else:  # ring baseline: W-1 forward + W-1 backward rotations of every rank's whole K|V block
            elem = 2 if case.dtype == torch.bfloat16 else 4
            block = sum(case.lens) * 2 * case.heads[1] * 16 * elem
            assert kv == 2 * (world - 1) * block, case.name
            assert sum(p["bytes"]["grad"] for p in parts) == world * block * case.layers, case.name
        sent = sum(sum(p["bytes"].values()) for p in parts)
        assert sent == sum(p["recv_bytes"] for p in parts), f"{case.name}: bytes sent != bytes received"


@pytest.mark.parametrize("kind", ["plan", "input"])
def test_mismatch_raises_on_every_rank_without_hanging(kind):
    messages = run_workers(_mismatch, 3, 1, kind, timeout=TIMEOUT_S)
    for rank, msg in enumerate(messages):
        if kind == "plan":
            assert msg.startswith("PlanMismatchError: FCP plans differ"), f"rank {rank}: {msg}"
            assert "one plan on ranks [0, 2]; one plan on ranks [1]" in msg, msg
        elif rank == 1:  # the rank with bad inputs gets its own ValueError
            assert msg.startswith("ValueError: q: got"), msg
        else:
            assert msg.startswith("PlanMismatchError") and "rank(s) [1] rejected their inputs" in msg, msg
