"""Sliding-window models under FCP: bytes moved per kind of layer equal the keys each rank needs and does not
hold (counted from the placement, and equal to the plan's own prediction), at most the window before each
held run and several times fewer than full causal attention of the same batch (exactness:
tests/test_model_matrix.py).

Tiny Mistral (every layer slides), Gemma 3 (5 sliding : 1 full), gpt-oss (alternating, with sinks) and
Cohere2 (3 sliding : 1 full), window 6 against a 64-token document, one training step on 2 and 3 gloo ranks.
"""

from __future__ import annotations

import functools

import pytest
import torch

from hf_fcp.testing import run_workers

FAMILIES = ("mistral", "gemma3_text", "gpt_oss", "cohere2")
WINDOW = 6


def _step(rank: int, world: int) -> dict:
    from hf_fcp.engine import comm
    from hf_fcp.integrations.collator import FCPCollator
    from hf_fcp.integrations.layer_kinds import attention_layers
    from hf_fcp.integrations.transformers import register
    from hf_fcp.plan import PlanSettings
    from hf_fcp.testing.families import build_model
    from hf_fcp.testing.matrix import BLOCK, documents

    register()
    out = {}
    for family in FAMILIES:
        model = build_model(family, "fcp", dtype=torch.float32, sliding_window=WINDOW)
        cfg = model.config
        settings = PlanSettings(block_size=BLOCK, attention_layers=attention_layers(cfg), kv_dtype="fp32",
                                kv_heads=cfg.num_key_value_heads,
                                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        batch = FCPCollator(world_size=world, rank=rank, settings=settings, return_stats=False)(documents())
        with comm.track_comm() as counter:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           fcp_plan=batch["fcp_plan"], use_cache=False).logits
            logits.float().square().mean().backward()
        out[family] = {"bytes": dict(counter.by_tag), "layers": settings.attention_layers, "settings": settings}
    return out


def missing_keys(rank_spans, window: int | None) -> int:
    """Keys every rank needs and does not hold, each counted once per rank: a held run ``[a, b)`` of a sequence
    attends its keys ``[0, b)``, or ``[a - window + 1, b)`` under a sliding window (a query at ``p`` sees
    ``(p - window, p]``)."""
    total = 0
    for spans in rank_spans:
        held: dict[int, set[int]] = {}
        needed: dict[int, set[int]] = {}
        for seq, a, b in spans:
            held.setdefault(seq, set()).update(range(a, b))
            needed.setdefault(seq, set()).update(range(0 if window is None else max(0, a - window + 1), b))
        total += sum(len(needed[s] - held[s]) for s in needed)
    return total


@functools.lru_cache(maxsize=None)
def results(world: int) -> list[dict]:
    return run_workers(_step, world, timeout=300)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_bytes_per_layer_kind_equal_the_plan(world, family):
    from hf_fcp import plan_batch
    from hf_fcp.testing.matrix import LENS

    parts = [r[family] for r in results(world)]
    layers, settings = parts[0]["layers"], parts[0]["settings"]
    assert any(w == WINDOW for w, _ in layers), layers
    plan = plan_batch(list(LENS), world_size=world, settings=settings)
    per_kind = {w: plan.for_window(w).stats().comm_bytes for w, _ in layers}
    # the prediction comes from where the tokens are, not from the plan's transfer lists
    predicted = sum(n * missing_keys(plan.rank_spans, w) * settings.kv_bytes_per_token for w, n in layers)
    moved = {tag: sum(p["bytes"].get(tag, 0) for p in parts) for tag in ("kv", "grad")}
    assert moved == {"kv": predicted, "grad": predicted}, (layers, per_kind)
    assert predicted == sum(n * per_kind[w] for w, n in layers)  # and the plan says the same
    full = plan.stats().comm_bytes  # what a full-attention layer of the same batch moves
    runs = sum(1 for spans in plan.rank_spans for s, a, b in spans if a > 0 and (s, a) not in
               {(s2, b2) for s2, _, b2 in spans})  # held runs after position 0 (touching spans are one run)
    assert 0 < per_kind[WINDOW] <= (WINDOW - 1) * runs * settings.kv_bytes_per_token  # the window before each
    assert per_kind[WINDOW] * 2 <= full, (per_kind, full)
