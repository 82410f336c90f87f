"""FCPSFTTrainer's setup, one process: ``packing`` / ``padding_free`` are accepted and change nothing (documents
stay whole, ``max_length`` truncates each one, the FCP collator never pads); a model given by name loads with
``attn_implementation="fcp"``, and an explicit other attention is refused with the way out."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from hf_fcp.integrations.embedded_chat import chat_tokenizer
from hf_fcp.integrations.sft import FCPSFTTrainer
from hf_fcp.testing.sft import arithmetic_chats_for_test, sft_config, tiny_chat_model


@pytest.mark.parametrize("flags", [{}, {"packing": True}, {"padding_free": True},
                                   {"packing": True, "packing_strategy": "wrapped", "eval_packing": True}])
def test_packing_flags_keep_documents_whole(flags, tmp_path):
    data = arithmetic_chats_for_test(12)
    trainer = FCPSFTTrainer(model=tiny_chat_model("fcp"), args=sft_config(str(tmp_path), max_length=64, **flags),
                            processing_class=chat_tokenizer(), train_dataset=data, eval_dataset=data)
    assert not trainer.args.packing and not trainer.args.padding_free
    for prepared in (trainer.train_dataset, trainer.eval_dataset):
        assert len(prepared) == len(data) and "seq_lengths" not in prepared.column_names  # one row per document
        assert max(len(ids) for ids in prepared["input_ids"]) == 64  # max_length truncates each document
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = sum(min(len(ids), 64) for ids in trainer.train_dataset["input_ids"])
    assert batch["input_ids"].shape == (1, tokens) and batch["fcp_plan"].num_local == tokens  # no padding


def test_model_by_name(tmp_path):
    tiny_chat_model("sdpa").save_pretrained(tmp_path / "model")
    chat_tokenizer().save_pretrained(tmp_path / "model")
    name, data = str(tmp_path / "model"), arithmetic_chats_for_test()
    trainer = FCPSFTTrainer(model=name, args=sft_config(str(tmp_path / "a")), train_dataset=data)
    assert trainer.model.config._attn_implementation == "fcp"
    args = sft_config(str(tmp_path / "b"), model_init_kwargs={"attn_implementation": "sdpa"})
    with pytest.raises(ValueError, match="got attn_implementation='sdpa', expected 'fcp'"):
        FCPSFTTrainer(model=name, args=args, train_dataset=data)
