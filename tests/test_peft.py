"""PEFT adapters under FCP: every adapter kind the guard trusts (``hf_fcp.integrations.adapters``) gives the
one-process loss and adapter gradients on 2 and 3 gloo ranks (one spawn serves both sizes); the
virtual-token kinds (prompt tuning, prefix tuning, p-tuning) are refused with one clear ValueError."""

from __future__ import annotations

import peft
import pytest
import torch

from hf_fcp.integrations import adapters
from hf_fcp.integrations.accelerate import FCPPlugin
from hf_fcp.testing import fcp_subgroups, run_workers
from hf_fcp.testing.helpers import assert_close
from hf_fcp.testing.models import (
    fcp_step,
    labelled_documents,
    reference_step,
    tiny_model,
)

VOCAB = 97
LENS = [40, 9, 70, 3, 25]  # 147 tokens; block 16: the 70-token document spans ranks
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_configs() -> dict[str, object]:
    """One config per verified PEFT type (and the LoRA variants), weights non-zero so every gradient flows."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR, "init_lora_weights": False,
            "task_type": "CAUSAL_LM"}
    return {
        "LORA": peft.LoraConfig(**lora),
        "LORA/dora": peft.LoraConfig(**lora, use_dora=True),
        "LORA/rslora": peft.LoraConfig(**lora, use_rslora=True),
        "IA3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False, task_type="CAUSAL_LM"),
        "LOHA": peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False,
                                task_type="CAUSAL_LM"),
        "LOKR": peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False,
                                task_type="CAUSAL_LM"),
        "VERA": peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM"),
        "LN_TUNING": peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"],
                                         task_type="CAUSAL_LM"),
    }


def adapted(impl: str, name: str):
    model = tiny_model("llama", impl, seed=0, vocab_size=VOCAB)
    torch.manual_seed(1)  # the same adapter weights for fcp and the reference
    return peft.get_peft_model(model, adapter_configs()[name])


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for _, g in sorted(grads.items())])


def adapters_worker(rank: int, world: int) -> dict:
    docs = labelled_documents(LENS, VOCAB, prompt=6)
    out = {}
    for size, group in fcp_subgroups(rank, world):
        for name in adapter_configs():
            model = adapted("fcp", name)
            FCPPlugin().prepare_model(model)  # the guard accepts it
            loss, grads, _ = fcp_step(model, rank, size, group, docs)
            out[(size, name)] = (loss, flat(grads), sorted(grads))
    return out


@pytest.fixture(scope="module")
def fcp_results():
    return run_workers(adapters_worker, 3, timeout=300)[0]


def test_every_verified_adapter_type_is_covered():
    """An adapter type added to the allow-list without a case here fails: trust needs a check."""
    assert {name.split("/")[0] for name in adapter_configs()} == set(adapters.VERIFIED_ADAPTERS)


@pytest.mark.parametrize("name", list(adapter_configs()))
def test_adapter_matches_one_process(name, fcp_results):
    model = adapted("sdpa", name)
    ref_loss, ref_grads = reference_step(model, labelled_documents(LENS, VOCAB, prompt=6))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and sorted(ref_grads) == trainable  # only the adapter trains
    for size in (2, 3):
        loss, grads, names = fcp_results[(size, name)]
        assert names == trainable, (size, name)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        assert_close(grads, flat(ref_grads), 1e-5, f"{name} on {size} ranks: adapter gradients")


@pytest.mark.parametrize("config, what", [
    (lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "prompt tuning"),
    (lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "prefix tuning"),
    (lambda: peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM"),
     "p-tuning"),
])
def test_virtual_token_adapters_are_refused(config, what):
    model = peft.get_peft_model(tiny_model("llama", "fcp", vocab_size=VOCAB), config())
    with pytest.raises(ValueError, match=f"adapter 'default' is {what} .*adds virtual tokens.*use a token-local "
                                         f"adapter \\(lora"):
        FCPPlugin().prepare_model(model)


def test_unverified_adapter_types_are_refused_as_adapters():
    config = peft.AdaLoraConfig(total_step=10, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_model("llama", "fcp", vocab_size=VOCAB), config)
    with pytest.raises(ValueError, match="adapter 'default' is ADALORA .*not verified exact; use a verified "
                                         "token-local adapter \\(lora, ia3"):
        FCPPlugin().prepare_model(model)
