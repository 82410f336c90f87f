"""Every Hugging Face model: exact or refused (hf_fcp.testing.matrix, hf_fcp.integrations.model_support).

One FCP training step of tiny random-init models built from their transformers config classes, on 2 and 3
spawned gloo ranks, against one process running each document on its own (loss 1e-5, every gradient 1e-4
relative). Every case must come out ``exact`` or ``refused`` (a ``ValueError`` naming the model, the feature
and the way out): ``wrong`` (silently wrong) or ``error`` (unclear) fails.

* default suite: a representative dozen (dense, MoE, absolute positions, MLA, sliding windows ten times
  shorter than the longest document — Mistral, Gemma 2 with soft-capping, Gemma 3, gpt-oss with sinks,
  Qwen2-MoE sliding through its mask; refusals for self-dispatching attention, hybrid token mixing, a plan
  that does not reach every layer, chunked attention and length-dependent rope beyond the documents), plus
  a case with a refusal switched off, which the matrix must catch as silently wrong;
* ``-m slow``: every causal-LM family of the installed transformers and every setting of
  :func:`~hf_fcp.testing.matrix.variant_cases`, and the guard's allow-list checked against what the
  reference-attention run verifies of the installed transformers
  (re-generate it with ``python benchmarks/model_matrix.py --write``).
"""

from __future__ import annotations

import pytest

from hf_fcp.integrations import verified_models
from hf_fcp.plan import plan_batch
from hf_fcp.testing.matrix import BLOCK, FAILURES, LENS, Case, family_cases, run_matrix, variant_cases

DOZEN = {  # case → (expected status, a phrase the refusal must contain)
    Case("llama"): ("exact", None),
    Case("qwen2_moe"): ("exact", None),
    Case("gpt2"): ("exact", None),
    Case("deepseek_v3"): ("exact", None),  # MLA: value head dim 8 != query/key head dim 12
    Case("gemma3_text", "sliding layers, window 6", {"sliding_window": 6}): ("exact", None),  # documents 10x window
    Case("gemma2", "soft-capping 0.01, window 6", {"attn_logit_softcapping": 0.01, "sliding_window": 6}):
        ("exact", None),
    Case("gpt_oss", "sliding layers, window 6", {"sliding_window": 6}): ("exact", None),  # and sinks
    Case("falcon"): ("refused", "not among the families FCP has verified exact"),  # before loading
    Case("falcon_h1"): ("refused", "token mixing outside attention"),
    Case("stablelm", "layers trusted", unguarded=("modules",)): ("refused", "got no fcp_plan inside a distributed"),
    Case("mistral", "sliding window 6", {"sliding_window": 6}): ("exact", None),
    Case("qwen2_moe", "use_sliding_window, window 6", {"use_sliding_window": True, "sliding_window": 6,
                                                       "max_window_layers": 2, "layer_types": None}): ("exact", None),
    Case("llama", "rope dynamic beyond its switch", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                                        "rope_theta": 1e4},
                                                    "max_position_embeddings": 32}): ("refused", "'dynamic'"),
    Case("llama4_text", "chunked attention 8", {"attention_chunk_size": 8, "attn_temperature_tuning": False}):
        ("refused", "chunked attention"),
    # a refusal switched off: the matrix must see the silently wrong result
    Case("llama4_text", "chunked attention 8, refusal off", {"attention_chunk_size": 8,
                                                             "attn_temperature_tuning": False},
         unguarded=("chunked_attention",)): ("wrong", None),
}


@pytest.fixture(scope="module")
def dozen():
    return run_matrix(list(DOZEN), modes=("fcp",), timeout=600)


def test_documents_span_every_rank_and_include_one_token_documents():
    assert LENS.count(1) >= 2
    for world in (2, 3):
        plan = plan_batch(list(LENS), world_size=world, block_size=BLOCK)
        assert all(any(seq == 0 for seq, _, _ in plan.spans(r)) for r in range(world))


@pytest.mark.parametrize("case", list(DOZEN), ids=lambda c: c.name)
def test_representative_case(case, dozen):
    want, phrase = DOZEN[case]
    record = dozen[case.name]
    assert record["reference"] == "ok"
    for world in (2, 3):
        outcome = record[world, "fcp"]
        assert outcome.status == want, f"{case.name} W={world}: {outcome}"
        if phrase:
            assert phrase in outcome.detail, outcome.detail
        if want == "refused" and not case.unguarded:  # the guard's errors name the model first
            assert outcome.detail.split(":")[0] in (f"model_type {case.family!r}", *_class_names(case)), outcome.detail


def _class_names(case):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[case.family], "model_type " + repr(case.family))


# ----------------------------------------------------------------------------- the full matrix
@pytest.mark.slow
def test_every_family_and_setting_is_exact_or_refused():
    cases = family_cases() + variant_cases()
    results = run_matrix(cases, timeout=3000)
    bad = {}
    for case in cases:
        record = results[case.name]
        if record["reference"] != "ok":  # does not build from its config here: out of the matrix
            assert case.variant == "default", (case.name, record["reference"])
            continue
        for (world, mode), outcome in ((k, o) for k, o in record.items() if k != "reference"):
            if mode == "fcp" and outcome.status in FAILURES:
                bad[case.name, world] = outcome
            elif mode == "fcp" and outcome.status == "refused" and not outcome.detail.startswith(_class_names(case)):
                bad[case.name, world] = outcome  # a ValueError, but not the guard's (e.g. the engine's shape check)
    assert not bad, "neither exact nor refused:\n" + "\n".join(f"{k}: {o}" for k, o in bad.items())
    _check_allow_list(results, cases)
    _check_engine_features(results, cases)


def _check_allow_list(results, cases):
    """The committed allow-list is what this transformers verifies (else: re-generate it)."""
    verified = sorted(c.family for c in cases if c.variant == "default" and results[c.name]["reference"] == "ok"
                      and all(o.status == "exact" for k, o in results[c.name].items()
                              if k != "reference" and k[1] == "fcp_reference"))
    listed = verified_models.current().families
    assert verified == sorted(listed), (
        f"the allow-list is stale: run `{verified_models.REGENERATE}`; "
        f"newly exact {sorted(set(verified) - listed)}, no longer exact {sorted(listed - set(verified))}")


def _check_engine_features(results, cases):
    """Settings refused only for a missing engine feature are exact with the reference attention: the guard's
    knowledge of which layer slides / chunks is right, so switching the feature on is safe to test."""
    for case in cases:
        record = results[case.name]
        refused = [o for k, o in record.items() if k != "reference" and k[1] == "fcp" and o.status == "refused"]
        if refused and any(w in refused[0].detail for w in ("sliding-window", "chunked attention", "soft-capping")):
            reference = [o for k, o in record.items() if k != "reference" and k[1] == "fcp_reference"]
            assert all(o.status == "exact" for o in reference), (case.name, reference)
