"""Evaluation and prediction under FCP, one process: per-token outputs come back as whole documents in batch
order; what cannot be returned per document is refused with one clear error. (Against one process on 2 and
3 ranks, through FCPSFTTrainer and FCPTrainer: tests/test_sft.py.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from datasets import Dataset

from hf_fcp.integrations.accelerate import FCPPlugin
from hf_fcp.integrations.collator import FCPCollator
from hf_fcp.integrations.predict import gather_documents
from hf_fcp.integrations.trainer import FCPTrainer
from hf_fcp.testing.sft import sft_config, tiny_chat_model


def test_gather_documents_puts_tokens_back_in_order():
    """The two ranks' shards of a 2-rank plan, concatenated as the all-gather leaves them (rank 0's tokens,
    then rank 1's, each in its plan order), come back as documents in token order."""
    lens = [5, 40, 1, 23]
    examples = [{"input_ids": list(range(3, 3 + n))} for n in lens]
    views = [FCPCollator(world_size=2, rank=r, block_size=8)(examples)["fcp_plan"] for r in (0, 1)]
    both = replace(views[0], token_index=torch.cat([v.token_index for v in views]))
    assert not torch.equal(both.token_index, torch.arange(69))  # the shards do not hold the tokens in order
    rows = both.token_index.float()[None, :, None].repeat(1, 1, 2)  # each token's place in the batch, 2 features
    docs = gather_documents(rows, both)
    assert docs.shape == (4, 40, 2)
    start = 0
    for i, n in enumerate(lens):
        assert torch.equal(docs[i, :n, 0], torch.arange(start, start + n, dtype=torch.float32))
        assert (docs[i, n:] == -100).all()
        start += n


def test_predict_refuses_a_document_longer_than_a_global_batch(tmp_path):
    data = Dataset.from_dict({"input_ids": [list(range(3, 20)), list(range(3, 53))]})  # 17 and 50 tokens
    trainer = FCPTrainer(model=tiny_chat_model("fcp"), args=sft_config(str(tmp_path)), eval_dataset=data,
                         fcp_plugin=FCPPlugin(block_size=16, tokens_per_rank=32))
    assert trainer.evaluate()["eval_loss"] > 0  # the loss alone: the 50-token example is split and scored
    with pytest.raises(ValueError, match=r"example 1 has 50 tokens, more than a global batch .* = 32\).*"
                                         r"Supported: examples of at most 32 tokens"):
        trainer.predict(data)


def test_inputs_for_metrics_are_refused(tmp_path):
    with pytest.raises(ValueError, match="include_for_metrics: got \\['inputs'\\], expected no 'inputs'"):
        FCPTrainer(model=tiny_chat_model("fcp"), args=sft_config(str(tmp_path), include_for_metrics=["inputs"]),
                   fcp_plugin=FCPPlugin(block_size=16, tokens_per_rank=32))
