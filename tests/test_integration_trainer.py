"""FCPTrainer: a 3-step run on 2 gloo processes equals the same run on 1 process; checkpoint resume is
exact; plan stats are logged; evaluation loss is the exact token mean; bad settings fail clearly."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, TrainingArguments

from hf_fcp.engine import comm
from hf_fcp.integrations.accelerate import FCPPlugin
from hf_fcp.integrations.embedded import tiny_config
from hf_fcp.integrations.trainer import FCPTrainer
from hf_fcp.integrations.transformers import register
from hf_fcp.testing import run_workers
from hf_fcp.testing.helpers import VOCAB, rel
from hf_fcp.testing.helpers import token_dataset as dataset

register()
TOKENS_PER_RANK = 96


def train_tiny(output_dir: str, world: int, max_steps: int, resume: str | None = None, save_steps: int = 2,
               eval_dataset=None):  # noqa: PLR0913
    """Train the tiny Llama with FCPTrainer; return (flat final params − flat initial params, log history)."""
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, kv_heads=2,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fcp")
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, learning_rate=1e-2, logging_steps=1,
                             save_strategy="steps", save_steps=save_steps, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, lr_scheduler_type="constant", eval_strategy="no")
    plugin = FCPPlugin(block_size=16, tokens_per_rank=TOKENS_PER_RANK * 2 // world)
    trainer = FCPTrainer(model=model, args=args, train_dataset=dataset(), eval_dataset=eval_dataset,
                         fcp_plugin=plugin)
    trainer.train(resume_from_checkpoint=resume)
    history = list(trainer.state.log_history)
    if eval_dataset is not None:
        history.append(trainer.evaluate())
    params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]) - start
    trainer.close(destroy_process_group=False)  # run_workers destroys it
    return params, history


def trainer_worker(rank: int, world: int, output_dir: str, max_steps: int):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    return train_tiny(output_dir, world, max_steps, eval_dataset=dataset([30, 7, 55], seed=1))


def losses(history) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_tiny(str(tmp_path_factory.mktemp("w1")), 1, 3, eval_dataset=dataset([30, 7, 55], seed=1))


def test_two_processes_match_one(tmp_path, single):
    results = run_workers(trainer_worker, 2, str(tmp_path), 3, timeout=150)
    params1, hist1 = single
    for params2, hist2 in results:
        assert rel(params2, params1) < 1e-4, rel(params2, params1)
        np.testing.assert_allclose(losses(hist2), losses(hist1), rtol=1e-5)
        np.testing.assert_allclose(hist2[-1]["eval_loss"], hist1[-1]["eval_loss"], rtol=1e-5)
    logged = [h for h in results[0][1] if "loss" in h]
    assert len(logged) == 3 and all(h["fcp/tokens"] > 0 for h in logged)
    # the 130-token document cannot fit one rank: its batch exchanged KV (others may place whole documents)
    assert any(h["fcp/rounds"] >= 1 for h in logged)
    assert sum(h["fcp/tokens"] for h in logged) <= 3 * 2 * TOKENS_PER_RANK


def test_single_process_logs_and_eval(single):
    params, history = single
    logged = [h for h in history if "loss" in h]
    assert len(logged) == 3 and all(np.isfinite(h["loss"]) for h in logged)
    assert {"fcp/compute_imbalance", "fcp/comm_MB", "fcp/plan_ms"} <= set(logged[0])
    assert np.isfinite(history[-1]["eval_loss"])


def test_resume_from_checkpoint_is_exact(tmp_path):
    """4 steps straight vs 2 steps + resume: an epoch holds 3 batches, so the resume skips batches
    inside epoch 0 and then reshuffles for epoch 1."""
    straight, _ = train_tiny(str(tmp_path / "a"), 1, 4, save_steps=2)
    resumed, history = train_tiny(str(tmp_path / "a"), 1, 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert history[-1]["step"] == 4
    assert rel(resumed, straight) < 1e-6


def test_bad_settings_fail_clearly(tmp_path, monkeypatch):
    cfg = tiny_config("llama", vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    monkeypatch.delenv("FCP_TIMEOUT_S", raising=False)
    with pytest.raises(ValueError, match="attn_implementation='fcp'"):
        FCPTrainer(model=sdpa, args=args, train_dataset=dataset())
    # the refused trainer left nothing behind: not the job's wait limit (ddp_timeout), not an FCP group
    assert comm.get_timeout() == comm.DEFAULT_TIMEOUT_S != args.ddp_timeout
    assert comm.bound_group() is None
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4),
                                             attn_implementation="fcp")  # transformers accepts it silently
    with pytest.raises(ValueError, match="does not call transformers' attention interface"):
        FCPTrainer(model=bloom, args=args, train_dataset=dataset())
    fcp = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fcp")
    smooth = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        FCPTrainer(model=fcp, args=smooth, train_dataset=dataset())
    with pytest.raises(ValueError, match="long_sequence_policy"):
        FCPPlugin(long_sequence_policy="drop")
    with pytest.raises(ValueError, match="FCP_BLOCK_SIZE"):
        os.environ["FCP_BLOCK_SIZE"] = "big"
        try:
            FCPPlugin()
        finally:
            del os.environ["FCP_BLOCK_SIZE"]
    with pytest.raises((ImportError, ValueError), match="flash"):
        FCPPlugin(kernel="flash_attn").setup()
