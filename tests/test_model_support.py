"""The model-support guard in one process (hf_fcp.integrations.model_support): the first planned call of the
"fcp" attention function checks the whole model for users who skip ``prepare_model``; per-batch limits;
the pre-load ``check_config``; the ``allow_classes`` way out; wrappers (DataParallel, FSDP2) stay
transparent; MLA (value head dim != query/key head dim) exact without a plan and when generating."""

from __future__ import annotations

import pytest
import torch

from hf_fcp.integrations import model_support
from hf_fcp.integrations.collator import FCPCollator
from hf_fcp.integrations.transformers import register
from hf_fcp.testing import run_workers
from hf_fcp.testing.families import build_model, tiny_config
from hf_fcp.testing.matrix import LENS, documents

register()


def planned_batch(lens=LENS):
    batch = FCPCollator(world_size=1, rank=0, block_size=8)(documents(lens))
    return {k: batch[k] for k in ("input_ids", "position_ids", "fcp_plan")}


def test_first_planned_call_refuses_a_hybrid_model_without_prepare_model():
    model = build_model("falcon_h1", "fcp")
    hybrid = "FalconH1ForCausalLM: got layer kinds \\['hybrid'\\].* token mixing outside attention"
    with pytest.raises(ValueError, match=hybrid):
        model(**planned_batch(), use_cache=False)
    with pytest.raises(ValueError, match="token mixing"):  # a refusal is not remembered as a pass
        model(**planned_batch(), use_cache=False)
    with torch.no_grad():  # no plan, one process: not an FCP run, the model computes as with sdpa
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)


def test_first_planned_call_applies_the_batch_limits():
    rope = {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
            "max_position_embeddings": 32}
    model = build_model("llama", "fcp", **rope)
    model(**planned_batch((30, 1, 5)), use_cache=False)  # every document within the rope's switch length
    with pytest.raises(ValueError, match=r"rope_type='dynamic'.* at most 32 tokens; got a document of 64 tokens"):
        model(**planned_batch(), use_cache=False)
    assert model_support.check_model(model).limits[0].tokens == 32


def test_check_config_before_loading():
    with pytest.raises(ValueError, match="model_type 'falcon': not among the families FCP has verified exact"):
        model_support.check_config(tiny_config("falcon"))
    with pytest.raises(ValueError, match="model_type 'qwen3_next'.*token mixing outside attention"):
        model_support.check_config(tiny_config("qwen3_next"))
    linear = "got layer kinds \\['linear_attention'\\]"  # a verified family, here with a hybrid config
    with pytest.raises(ValueError, match=linear):
        model_support.check_config(tiny_config("lfm2", layer_types=["full_attention", "linear_attention"]))
    with pytest.raises(ValueError, match="attn_temperature_tuning=False"):
        model_support.check_config(tiny_config("llama4_text"))
    with pytest.raises(ValueError, match="got bidirectional attention"):
        model_support.check_config(tiny_config("gemma3_text", use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="got rope_type='su'"):
        model_support.check_config(tiny_config("llama", rope_parameters={"rope_type": "su", "rope_theta": 1e4}))
    assert model_support.check_config(tiny_config("llama")).limits == ()
    assert model_support.check_config(tiny_config("mistral", sliding_window=16)).limits == ()  # the engine slides
    chunk = model_support.check_config(tiny_config("llama4_text", attention_chunk_size=16,
                                                   attn_temperature_tuning=False)).limits
    assert [lim.tokens for lim in chunk] == [16] and "attention_chunk_size=16" in chunk[0].feature


class Smoother(torch.nn.Module):
    """A made-up layer outside attention (a causal running mean would be one): not verified."""

    def forward(self, x):
        return x


def test_unverified_module_is_refused_until_trusted():
    model = build_model("llama", "fcp")
    model.model.layers[0].smoother = Smoother()
    with pytest.raises(ValueError, match=r"module model.layers.0.smoother \(.*Smoother\) is not among the modules "
                                         r"FCP has verified exact.*allow_classes"):
        model_support.check_model(model)
    saved = set(model_support._EXTRA_CLASSES)
    try:
        model_support.allow_classes(f"{Smoother.__module__}.{Smoother.__qualname__}")
        assert model_support.check_model(model).model == "LlamaForCausalLM"
    finally:
        model_support._EXTRA_CLASSES.clear()
        model_support._EXTRA_CLASSES.update(saved)


def test_wrappers_are_transparent():
    model = build_model("llama", "fcp")
    assert model_support.check_model(torch.nn.DataParallel(model)).model == "LlamaForCausalLM"
    hybrid = torch.nn.DataParallel(build_model("falcon_h1", "fcp"))
    with pytest.raises(ValueError, match="token mixing"):
        model_support.check_model(hybrid)


def _fsdp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model("llama", "fcp", dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    names = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")})
    return names, model_support.check_model(model).model


def test_fsdp2_wrapped_classes_are_checked_as_the_classes_they_wrap():
    names, checked = run_workers(_fsdp_worker, 1, timeout=120)[0]
    assert "FSDPLlamaDecoderLayer" in names and checked == "LlamaForCausalLM"


def test_mla_pads_the_value_head_dim_without_a_plan_and_when_generating():
    fcp, ref = build_model("deepseek_v3", "fcp").eval(), build_model("deepseek_v3", "eager").eval()
    attn = fcp.model.layers[0].self_attn
    assert attn.qk_head_dim != attn.v_head_dim  # 12 vs 8
    batch = planned_batch()
    with torch.no_grad():
        got = fcp(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        want = torch.cat([ref(input_ids=torch.tensor([d["input_ids"]]), use_cache=False).logits[0]
                          for d in documents()])
        assert (got[0] - want).abs().max() < 1e-6  # float64; the engine's LSE is float32
        ids = torch.tensor([documents()[0]["input_ids"][:9]])
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
        assert torch.equal(fcp.generate(ids, **kw), ref.generate(ids, **kw))


def test_no_plan_path_sees_a_window_the_model_applies_through_its_mask_only():
    """Qwen2-MoE slides through the mask and never passes sliding_window to the attention function."""
    model = build_model("qwen2_moe", "fcp", use_sliding_window=True, sliding_window=8, max_window_layers=2,
                        layer_types=None)
    assert model_support.layer_window(model.model.layers[0].self_attn) == 8
    assert model_support.layer_window(model.model.layers[1].self_attn) is None
    sdpa = build_model("qwen2_moe", "sdpa", use_sliding_window=True, sliding_window=8, max_window_layers=2,
                       layer_types=None)
    sdpa.load_state_dict(model.state_dict())
    ids = torch.tensor([list(range(3, 23))])  # 20 tokens: longer than the window
    with torch.no_grad():
        assert (model(input_ids=ids, use_cache=False).logits - sdpa(input_ids=ids, use_cache=False).logits
                ).abs().max() < 1e-5
