"""A rank whose shard holds no label tokens (a prompt-only piece, or the placeholder token of a rank the plan
left empty) adds a finite zero to the loss and zero gradients, while the other ranks' tokens make the global
label count positive: on every loss path selectable on a CPU — the model's own loss (FCPTrainer), TRL's
fused-LM-head ``loss_type="nll"`` and ``"dft"`` (FCPSFTTrainer), with and without a LoRA adapter.
Liger's fused kernels need a GPU (docs/finetuning.md)."""

from __future__ import annotations

import peft
import pytest
import torch

from hf_fcp.integrations.collator import FCPCollator
from hf_fcp.integrations.sft import FCPSFTTrainer
from hf_fcp.testing.sft import (
    arithmetic_chats_for_test,
    lora_config,
    sft_config,
    tiny_chat_model,
)

GLOBAL_LABELS = torch.tensor(17)  # label tokens on the other ranks: the denominator of every rank's share


def unlabelled_batches() -> dict[str, dict]:
    """What such a rank holds: a prompt-only piece (every label -100), or the one placeholder token (the pad
    token, label -100) a rank the plan left without tokens runs."""
    collate = FCPCollator(world_size=1, rank=0, block_size=16)
    prompt = collate([{"input_ids": list(range(3, 40)), "labels": [-100] * 37}])
    empty = collate([{"input_ids": [257], "labels": [-100]}])  # as the placeholder: one pad token, no label
    assert prompt["shift_labels"].ne(-100).sum() == 0
    for batch in (prompt, empty):
        batch.pop("fcp_stats", None)
    return {"prompt-only": prompt, "placeholder": empty}


def assert_zero(loss: torch.Tensor, model, where: str) -> None:
    assert torch.isfinite(loss) and loss.item() == 0, (where, loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or (torch.isfinite(g).all() and g.abs().max() == 0) for g in grads), where


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_model_loss(lora):
    """FCPTrainer's path: the model's own loss with ``shift_labels`` and the global ``num_items_in_batch``."""
    for name, batch in unlabelled_batches().items():
        model = tiny_chat_model("fcp")
        model = peft.get_peft_model(model, lora_config()) if lora else model
        loss = model(**batch, num_items_in_batch=GLOBAL_LABELS, use_cache=False).loss
        assert_zero(loss, model, name)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trl_loss_types(loss_type, lora, tmp_path):
    """FCPSFTTrainer's path: TRL's ``compute_loss`` (fused LM head over ``shift_labels``) for each ``loss_type``."""
    from hf_fcp.integrations.embedded_chat import chat_tokenizer

    trainer = FCPSFTTrainer(model=tiny_chat_model("fcp"), args=sft_config(str(tmp_path), loss_type=loss_type),
                            processing_class=chat_tokenizer(), train_dataset=arithmetic_chats_for_test(),
                            peft_config=lora_config() if lora else None)
    trainer.model.train()
    for name, batch in unlabelled_batches().items():
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=GLOBAL_LABELS)
        assert_zero(loss, trainer.model, f"{loss_type} {name}")
