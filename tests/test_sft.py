"""FCPSFTTrainer (TRL's SFTTrainer under FCP) on 2 and 3 gloo ranks against one process, fp32, 3 steps of the
tiny Llama on the embedded arithmetic chats: every logged loss to 1e-5 and the update of the trained
parameters to 1e-4 relative, for text, prompt/completion with completion_only_loss, conversational with
assistant_only_loss, LoRA, LoRA + FSDP2 + activation checkpointing and LoRA with gradient accumulation.
(Every case runs with activation checkpointing: TRL's default.)
The LoRA adapter saved by the FCP run, loaded with plain PEFT and sdpa in one process, gives the FCP run's
eval_loss. evaluate() / predict() / compute_metrics of FCPSFTTrainer and FCPTrainer equal TRL's SFTTrainer
and transformers' Trainer on one process (whole documents in dataset order, no repeated rows).
One spawn per world size runs every case."""

from __future__ import annotations

import numpy as np
import pytest

from hf_fcp.testing import run_workers
from hf_fcp.testing.helpers import rel
from hf_fcp.testing.sft import (
    CASES,
    eval_chats,
    plain_predict,
    sft_config,
    sft_run,
    sft_runs_worker,
    tiny_chat_model,
)

REFERENCE = {"lora+fsdp2+checkpointing": "lora"}  # the math of FSDP2 and checkpointing is the plain run's


def cases_for(world: int) -> list[str]:
    return [*CASES, "predict"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return {case: sft_run(str(tmp_path_factory.mktemp(case.replace("+", "_"))), 1, case)
            for case in CASES if case not in REFERENCE}


@pytest.fixture(scope="module", params=[2, 3])
def runs(request, tmp_path_factory):
    world = request.param
    root = tmp_path_factory.mktemp(f"w{world}")
    results = run_workers(sft_runs_worker, world, str(root), cases_for(world), str(root / "adapter"), timeout=600)
    return world, results, root / "adapter"


def test_sft_matches_one_process(runs, references):
    world, results, _ = runs
    for case in cases_for(world)[:-1]:
        ref = references[REFERENCE.get(case, case)]
        for rank, result in enumerate(results):
            got = result[case]
            assert len(got["losses"]) == 3, (case, got["losses"])
            np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, err_msg=f"{case} W={world}")
            np.testing.assert_allclose(got["eval_loss"], ref["eval_loss"], rtol=1e-5, err_msg=f"{case} W={world}")
            err = rel(got["update"], ref["update"])
            assert err <= 1e-4, f"{case} W={world} rank {rank}: update off by {err:.2e}"
            want = "FSDPPeftModelForCausalLM" if "fsdp2" in case else "DistributedDataParallel"
            assert got["wrapped"] == want, (case, got["wrapped"])  # the feature really ran


def test_cases_differ(references):
    """Each case trains on other labels or parameters: a case silently running another's setup fails."""
    updates = {case: ref["update"] for case, ref in references.items()}
    assert updates["lora"].numel() < updates["messages"].numel()  # only the adapter trains
    for a, b in [("text", "prompt_completion"), ("prompt_completion", "messages"), ("lora", "lora+accumulation")]:
        assert not np.allclose(references[a]["losses"], references[b]["losses"], rtol=1e-3), (a, b)


def test_adapter_round_trip(runs, tmp_path):
    """Saved from the FCP run, loaded in one process with plain PEFT and sdpa: the same eval_loss."""
    from peft import PeftModel
    from trl import SFTTrainer

    from hf_fcp.integrations.embedded_chat import chat_tokenizer

    _, results, adapter = runs
    assert (adapter / "adapter_config.json").is_file()
    # the base: the run's frozen seed-0 weights
    model = PeftModel.from_pretrained(tiny_chat_model("sdpa"), str(adapter))
    plain = SFTTrainer(model=model, args=sft_config(str(tmp_path), assistant_only_loss=True),
                       processing_class=chat_tokenizer(), train_dataset=eval_chats("messages"),
                       eval_dataset=eval_chats("messages"))
    np.testing.assert_allclose(plain.evaluate()["eval_loss"], results[0]["lora"]["eval_loss"], rtol=1e-5)
    untrained = SFTTrainer(model=tiny_chat_model("sdpa"), args=plain.args, processing_class=chat_tokenizer(),
                           train_dataset=eval_chats("messages"), eval_dataset=eval_chats("messages"))
    assert abs(untrained.evaluate()["eval_loss"] - results[0]["lora"]["eval_loss"]) > 1e-3  # the adapter matters


@pytest.fixture(scope="module")
def plain(runs, tmp_path_factory):
    return plain_predict(str(tmp_path_factory.mktemp("plain")), runs[1][0]["predict"]["test_dataset"])


@pytest.mark.parametrize("trainer", ["sft", "trainer"])
def test_evaluate_and_predict_match_one_process(runs, plain, trainer):
    """FCPSFTTrainer vs TRL's SFTTrainer, FCPTrainer vs transformers' Trainer (sdpa, padded batches)."""
    world, results, _ = runs
    ref = plain[trainer]
    lengths = np.array([len(ids) for ids in results[0]["predict"]["test_dataset"]["input_ids"]])
    valid = np.arange(96)[None, :] < lengths[:, None]  # past a document's end: Trainer's padding
    for rank, result in enumerate(results):
        got = result["predict"][trainer]
        where = f"{trainer} W={world} rank {rank}"
        assert got["predictions"].shape == ref["predictions"].shape == (10, 96, 258), where  # 10 rows, not 10 × W
        np.testing.assert_array_equal(got["label_ids"], ref["label_ids"], err_msg=where)  # dataset order
        np.testing.assert_allclose(got["predictions"][valid], ref["predictions"][valid], atol=1e-5, err_msg=where)
        assert (got["predictions"][~valid] == -100).all(), where
        for key in ("test_rows", "test_labels", "test_accuracy"):  # compute_metrics got what Trainer gives
            assert got["metrics"][key] == ref["metrics"][key], (where, key)
        if trainer == "sft":  # one global batch / one padded batch: the token mean of the whole eval set
            np.testing.assert_allclose(got["eval"]["eval_loss"], ref["eval"]["eval_loss"], rtol=1e-5, err_msg=where)
