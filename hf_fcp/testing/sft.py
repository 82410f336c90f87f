"""Short ``FCPSFTTrainer`` runs of the tiny Llama on the embedded arithmetic chats, with FCP on a group of ranks
or in one process (tests/test_sft.py, tests/test_eval_predict.py, benchmarks/bench_trainer.py)."""

from __future__ import annotations

import copy
import os

import torch

DATA = {"text": "text", "prompt_completion": "prompt_completion", "messages": "messages"}
CASES = {  # name → (dataset format, SFTConfig overrides, with a LoRA adapter)
    "text": ("text", {}, False),
    "prompt_completion": ("prompt_completion", {"completion_only_loss": True}, False),
    "messages": ("messages", {"assistant_only_loss": True}, False),
    "lora": ("messages", {"assistant_only_loss": True}, True),
    "lora+fsdp2+checkpointing": ("messages", {"assistant_only_loss": True, "fsdp": True,
                                              "activation_checkpointing": True,
                                              "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap":
                                                              ["LlamaDecoderLayer"]}}, True),
    "lora+accumulation": ("messages", {"assistant_only_loss": True, "gradient_accumulation_steps": 2}, True),
}
"""The SFT cases the exactness tests run; every case trains in fp32 with activation checkpointing (TRL's
default) on global batches of :data:`GLOBAL_TOKENS` tokens."""
GLOBAL_TOKENS, BLOCK, MAX_LENGTH = 256, 16, 96


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")


def tiny_chat_model(impl: str = "fcp", seed: int = 0):
    """The tiny Llama (hidden 32, 2 layers, GQA) over :func:`chat_tokenizer`'s 258 tokens, seeded."""
    from transformers import AutoModelForCausalLM

    from ..integrations.embedded import tiny_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(tiny_config("llama")), attn_implementation=impl)


def sft_config(output_dir: str, **overrides):
    """An fp32 ``SFTConfig`` for short exact runs (constant learning rate, every step logged, no saving)."""
    from trl import SFTConfig

    settings = {"output_dir": output_dir, "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1,
                "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True,
                "lr_scheduler_type": "constant", "bf16": False, "max_length": MAX_LENGTH, "dataset_num_proc": None}
    return SFTConfig(**{**settings, **overrides})


def eval_chats(dataset_format: str):
    """Held-out chats that fit one global batch (so eval_loss is the token mean of them all)."""
    from ..integrations.embedded_chat import arithmetic_chats

    return arithmetic_chats(3, seed=7, dataset_format=dataset_format)


def trainable(model) -> torch.Tensor:
    """The trainable parameters flattened (float32), whole even when FSDP2 shards them."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().reshape(-1)
                      for p in model.parameters() if p.requires_grad])


def sft_run(output_dir: str, world: int, case: str, *, steps: int = 3, save_adapter: str | None = None) -> dict:
    """Train :data:`CASES` ``[case]`` with ``FCPSFTTrainer`` on ``world`` ranks (global batches of
    :data:`GLOBAL_TOKENS` tokens whatever ``world``). Returns ``update`` (trainable parameters, final − initial),
    ``losses`` (logged per step), ``eval_loss`` after training and ``wrapped`` (the class Trainer trained);
    with ``save_adapter``, rank 0 saves the model (the adapter) there."""
    from ..integrations.accelerate import FCPPlugin
    from ..integrations.embedded_chat import arithmetic_chats, chat_tokenizer
    from ..integrations.sft import FCPSFTTrainer

    dataset_format, overrides, lora = CASES[case]
    args = sft_config(output_dir, max_steps=steps, **overrides)
    trainer = FCPSFTTrainer(model=tiny_chat_model(), args=args, processing_class=chat_tokenizer(),
                            train_dataset=arithmetic_chats(40, seed=0, dataset_format=dataset_format),
                            eval_dataset=eval_chats(dataset_format), peft_config=lora_config() if lora else None,
                            fcp_plugin=FCPPlugin(block_size=BLOCK, tokens_per_rank=GLOBAL_TOKENS // world))
    start = trainable(trainer.model)
    trainer.train()
    out = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
           "eval_loss": trainer.evaluate()["eval_loss"], "update": trainable(trainer.model) - start,
           "wrapped": type(trainer.model_wrapped).__name__}
    if save_adapter:
        trainer.save_model(save_adapter)
    trainer.close(destroy_process_group=False)
    return out


def sft_runs_worker(rank: int, world: int, output_dir: str, cases: list[str], adapter_dir: str | None = None) -> dict:
    """Worker side (:func:`hf_fcp.testing.run_workers`): :func:`sft_run` for every case, one after the other
    (the case ``predict``: :func:`predict_run`); the ``lora`` case saves its adapter to ``adapter_dir``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    out = {}
    for case in cases:
        if case == "predict":
            out[case] = predict_run(os.path.join(output_dir, case), world)
            continue
        out[case] = sft_run(os.path.join(output_dir, case), world, case,
                            save_adapter=adapter_dir if case == "lora" else None)
        for key in [k for k in os.environ if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")]:
            del os.environ[key]  # Accelerate exports its FSDP settings; the next case starts clean
    return out


# ----------------------------------------------------------------------------- evaluate / predict
def predict_chats():
    """Chats for ``predict()``: several global batches of :data:`GLOBAL_TOKENS` after ``max_length``."""
    from ..integrations.embedded_chat import arithmetic_chats

    return arithmetic_chats(10, seed=8, dataset_format="messages")


def token_metrics(prediction) -> dict:
    """A ``compute_metrics``: shapes, label count and next-token accuracy from an ``EvalPrediction``."""
    import numpy as np

    logits, labels = prediction.predictions, prediction.label_ids
    target, guess = labels[:, 1:], logits[:, :-1].argmax(-1)
    valid = target != -100
    return {"rows": float(labels.shape[0]), "labels": float(valid.sum()),
            "accuracy": float(np.mean(guess[valid] == target[valid]))}


def _prepared(trainer_cls, impl: str, world: int, output_dir: str, **kwargs):
    """An untrained SFT trainer (``FCPSFTTrainer`` or TRL's ``SFTTrainer``) on :func:`eval_chats` with
    :func:`token_metrics`; the model seeded alike."""
    from ..integrations.embedded_chat import chat_tokenizer

    args = sft_config(output_dir, assistant_only_loss=True, per_device_eval_batch_size=4)
    return trainer_cls(model=tiny_chat_model(impl), args=args, processing_class=chat_tokenizer(),
                       train_dataset=eval_chats("messages"), eval_dataset=eval_chats("messages"),
                       compute_metrics=token_metrics, **kwargs)


def predict_run(output_dir: str, world: int) -> dict:
    """``evaluate()`` and ``predict()`` of the untrained model through ``FCPSFTTrainer`` and ``FCPTrainer`` on
    ``world`` ranks: {"sft" | "trainer": {"eval": metrics, "predictions", "label_ids", "metrics"}}."""
    from ..integrations.accelerate import FCPPlugin
    from ..integrations.sft import FCPSFTTrainer
    from ..integrations.trainer import FCPTrainer

    def plugin() -> FCPPlugin:
        return FCPPlugin(block_size=BLOCK, tokens_per_rank=GLOBAL_TOKENS // world)

    sft = _prepared(FCPSFTTrainer, "fcp", world, output_dir, fcp_plugin=plugin())
    test = sft._prepare_dataset(predict_chats(), sft.processing_class, sft.args, False, None, "test")
    out = {"sft": _predict_outputs(sft, predict_chats()), "test_dataset": test.select_columns(["input_ids", "labels"])}
    sft.close(destroy_process_group=False)
    trainer = FCPTrainer(model=tiny_chat_model("fcp"), args=sft_config(output_dir), compute_metrics=token_metrics,
                         eval_dataset=out["test_dataset"], fcp_plugin=plugin())
    out["trainer"] = _predict_outputs(trainer, out["test_dataset"])
    trainer.close(destroy_process_group=False)
    return out


def _predict_outputs(trainer, dataset) -> dict:
    result = trainer.predict(dataset)
    return {"eval": trainer.evaluate(), "predictions": result.predictions, "label_ids": result.label_ids,
            "metrics": {k: v for k, v in result.metrics.items() if k in ("test_loss", "test_rows", "test_labels",
                                                                          "test_accuracy")}}


def plain_predict(output_dir: str, test_dataset) -> dict:
    """The one-process reference of :func:`predict_run`: TRL's ``SFTTrainer`` and ``transformers.Trainer`` with
    ``attn_implementation="sdpa"`` and padded batches."""
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    sft = _prepared(SFTTrainer, "sdpa", 1, output_dir)
    out = {"sft": _predict_outputs(sft, sft._prepare_dataset(predict_chats(), sft.processing_class, sft.args, False,
                                                             None, "test"))}
    trainer = Trainer(model=tiny_chat_model("sdpa"), args=sft_config(output_dir), compute_metrics=token_metrics,
                      eval_dataset=test_dataset, data_collator=DataCollatorForLanguageModeling(pad_token_id=257))
    out["trainer"] = _predict_outputs(trainer, test_dataset)
    return out


def arithmetic_chats_for_test(n: int = 8):
    """A few conversational examples (for trainers that only need a train dataset to exist)."""
    from ..integrations.embedded_chat import arithmetic_chats

    return arithmetic_chats(n, seed=3, dataset_format="messages")
