"""attn_implementation="fcp" in real transformers models (Llama, Qwen2, Mistral; GQA) vs sdpa.

* W = 2, 3, 4 spawned gloo ranks: one training step (loss + backward) on each rank's FCP shard equals
  the single-process sdpa step on the whole packed batch (loss 1e-5 relative, gradients 1e-4, fp32);
* no plan: packed / padded / batched inputs and greedy ``generate()`` equal sdpa's;
* bad input fails with a message naming the fix.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_fcp.integrations.collator import FCPCollator
from hf_fcp.integrations.embedded import tiny_config
from hf_fcp.integrations.transformers import register
from hf_fcp.plan import plan_batch
from hf_fcp.testing import fcp_subgroups, run_workers
from hf_fcp.testing.helpers import BLOCK, LENS, VOCAB, assert_close, examples, make_model
from hf_fcp.testing.models import (
    fcp_step,
    grads,
    reference_step,
)

register()
MODELS = ("llama", "qwen2", "mistral")
TINY = (3,)  # fewer tokens than 4 ranks: the plan leaves a rank empty


def sdpa_step(model_type: str, lens=LENS):
    """sdpa on the whole packed batch, one process: (loss, grads)."""
    return reference_step(make_model(model_type, "sdpa"), examples(lens))


def fcp_step_worker(rank: int, world: int, model_types):
    """One FCP step per (group size W = 2..world, model type), each W on a subgroup of ranks 0..W-1
    bound as FCP's default group (one spawn serves every W). Returns {(W, model): (loss, grads, n_local)}
    with loss and grads summed over the subgroup (rank 0's copy)."""
    out = {}
    for size, group in fcp_subgroups(rank, world):
        for model_type in model_types:
            out[size, model_type] = fcp_step(make_model(model_type, "fcp"), rank, size, group, examples(), BLOCK)
        out[size, "tiny"] = fcp_step(make_model("llama", "fcp"), rank, size, group, examples(TINY), BLOCK)
        if size == 2:
            out["mismatch"] = _wrong_world_error(rank)
    return out


def _wrong_world_error(rank: int) -> str:
    """A plan for 3 ranks on a 2-rank group must fail on both ranks (not hang)."""
    model = make_model("llama", "fcp")
    batch = FCPCollator(world_size=3, rank=rank, block_size=BLOCK)(examples())
    try:
        model(**batch, use_cache=False)
    except (ValueError, RuntimeError) as err:
        return str(err)
    return "no error"


@pytest.fixture(scope="module")
def references():
    return {m: sdpa_step(m) for m in MODELS}


@pytest.fixture(scope="module")
def fcp_results():
    return run_workers(fcp_step_worker, 4, MODELS, timeout=150)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fcp_training_step_matches_single_process(world, references, fcp_results):
    for model_type in MODELS:
        ref_loss, ref_grads = references[model_type]
        shards = [r[world, model_type][2] for r in fcp_results[:world]]
        assert sum(shards) == sum(LENS) and min(shards) > 0, shards
        loss, g, _ = fcp_results[0][world, model_type]
        assert_close(loss, ref_loss, 1e-5, f"{model_type} W={world} loss")
        assert set(g) == set(ref_grads)
        for name, ref in ref_grads.items():
            assert_close(g[name], ref, 1e-4, f"{model_type} W={world} grad {name}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_without_tokens_take_part(world, fcp_results):
    ref_loss, ref_grads = sdpa_step("llama", TINY)
    shards = [r[world, "tiny"][2] for r in fcp_results[:world]]
    assert sum(shards) == 3 and (world < 4 or 0 in shards)  # an empty rank ran on a placeholder token
    loss, g, _ = fcp_results[0][world, "tiny"]
    assert_close(loss, ref_loss, 1e-5, f"tiny W={world} loss")
    for name, ref in ref_grads.items():
        assert_close(g[name], ref, 1e-4, f"tiny W={world} grad {name}")


def test_plan_for_another_world_size_fails_on_every_rank(fcp_results):
    for r in fcp_results[:2]:
        assert "world_size: got 3, expected 2" in r["mismatch"] or "rejected their inputs" in r["mismatch"]


# ----------------------------------------------------------------------------- world size 1, no plan
@pytest.mark.parametrize("model_type", MODELS)
def test_no_plan_packed_and_padded_match_sdpa(model_type):
    ref, fcp = make_model(model_type, "sdpa").eval(), make_model(model_type, "fcp").eval()
    batch = FCPCollator(world_size=1, rank=0, block_size=BLOCK)(examples())
    plan = batch.pop("fcp_plan")
    with torch.no_grad():
        want = ref(**batch, use_cache=False).logits
        assert torch.allclose(fcp(**batch, use_cache=False).logits, want, atol=1e-5)  # from position_ids
        assert torch.allclose(fcp(**batch, fcp_plan=plan, use_cache=False).logits, want, atol=1e-5)
        ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding
        mask[2, 7:] = 0  # right padding
        got, want = (m(input_ids=ids, attention_mask=mask, use_cache=False).logits for m in (fcp, ref))
        assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


@pytest.mark.parametrize("model_type", MODELS)
def test_generate_matches_sdpa(model_type):
    ref, fcp = make_model(model_type, "sdpa").eval(), make_model(model_type, "fcp").eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=2)
    want = ref.generate(ids, **kw)
    assert want.shape[1] == ids.shape[1] + 12
    assert torch.equal(fcp.generate(ids, **kw), want)
    assert torch.equal(fcp.generate(ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=2),
                       ref.generate(ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=2))


def test_no_plan_gradients_match_sdpa():
    ref, fcp = make_model("llama", "sdpa"), make_model("llama", "fcp")
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    for m in (ref, fcp):
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    g_ref, g_fcp = grads(ref), grads(fcp)
    for name in g_ref:
        assert_close(g_fcp[name], g_ref[name], 1e-4, name)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_fix():
    model = make_model("llama", "fcp")
    batch = FCPCollator(world_size=1, rank=0, block_size=BLOCK)(examples())
    with pytest.raises(ValueError, match="no process group|expected a process group"):
        view2 = plan_batch(list(LENS), world_size=2, block_size=BLOCK).for_rank(0)
        model(input_ids=batch["input_ids"][:, :view2.num_local], position_ids=view2.position_ids[None],
              fcp_plan=view2, use_cache=False)
    with pytest.raises(ValueError, match="expected batch 1 and"):
        model(input_ids=batch["input_ids"][:, :-1], position_ids=batch["position_ids"][:, :-1],
              fcp_plan=batch["fcp_plan"], use_cache=False)
    with pytest.raises(ValueError, match="drop attention_mask"):
        mask = torch.ones_like(batch["input_ids"]).index_fill(1, torch.tensor([0]), 0)
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
              fcp_plan=batch["fcp_plan"], use_cache=False)
    with pytest.raises(ValueError, match="pass the FCPCollator batch to the model as is"):
        model(input_ids=batch["input_ids"], fcp_plan=batch["fcp_plan"], use_cache=False)  # no position_ids
    with pytest.raises(TypeError, match="expected a RankView"):
        model(input_ids=batch["input_ids"], fcp_plan={"not": "a view"}, use_cache=False)
    cfg = tiny_config("mistral", vocab_size=VOCAB, sliding_window=8, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    mistral = AutoModelForCausalLM.from_config(cfg, attn_implementation="fcp")
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    sdpa.load_state_dict(mistral.state_dict())
    with torch.no_grad():  # one rank: no exchange, the kernels mask the window even without it in the plan
        got = mistral(**batch, use_cache=False).logits
        want = torch.cat([sdpa(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
                          for e in examples()])
    assert max(LENS) > 8 and (got[0] - want).abs().max() < 1e-4
    view2 = plan_batch(list(LENS), world_size=2, block_size=BLOCK).for_rank(0)
    with pytest.raises(ValueError, match=r"window: got 8, expected None or one of the plan's sliding windows \[\]"):
        view2.for_window(8)  # two ranks: the plan must carry the window's exchange
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout=0.0"):
        model(**batch, use_cache=False)
