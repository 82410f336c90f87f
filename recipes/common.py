"""Shared parts of recipes/pretrain.py and recipes/finetune.py: arguments, model, tokenizer, the run.

Defaults need no download: a tiny Llama-style model from scratch, the byte-level tokenizer and the
Python standard library as corpus (``hf_fcp.integrations.embedded``). ``--model_name_or_path`` and
``--dataset_name`` switch to the Hugging Face Hub.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from hf_fcp.integrations import register
from hf_fcp.integrations.accelerate import FCPPlugin
from hf_fcp.integrations.embedded import byte_tokenizer, tiny_config
from hf_fcp.trainer import FCPTrainer

logger = logging.getLogger("hf_fcp.recipes")
register()  # attn_implementation="fcp" (import hf_fcp does it too; idempotent)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub model or local path to start from; default: a tiny model from scratch (no download)."})
    model_type: str = field(default="llama", metadata={"help": "From scratch: llama, qwen2 or mistral."})
    hidden_size: int = field(default=128, metadata={"help": "From scratch: hidden size."})
    num_layers: int = field(default=4, metadata={"help": "From scratch: decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "From scratch: query heads."})
    num_kv_heads: int = field(default=2, metadata={"help": "From scratch: key/value heads (GQA)."})


def parse(data_cls, defaults: list[str]):
    """(model_args, data_args, training_args, fcp_plugin) from the command line over recipe defaults."""
    parser = HfArgumentParser((ModelArguments, data_cls, TrainingArguments, FCPPlugin))
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    return parser.parse_args_into_dataclasses(args=[*defaults, *cpu, *sys.argv[1:]])


def setup_logging(args: TrainingArguments) -> None:
    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    transformers.utils.logging.set_verbosity_warning()


def load_tokenizer(model_args: ModelArguments):
    if model_args.model_name_or_path is None:
        return byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {model_args.model_name_or_path}: got no eos_token, expected one "
                         f"(documents are separated by EOS)")
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer, max_positions: int):
    """The model with attn_implementation="fcp" (from scratch by default)."""
    if model_args.model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, attn_implementation="fcp",
                                                    dtype=torch.float32)
    config = tiny_config(model_args.model_type, vocab_size=len(tokenizer), hidden_size=model_args.hidden_size,
                         layers=model_args.num_layers, heads=model_args.num_heads,
                         kv_heads=model_args.num_kv_heads, max_positions=max_positions)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="fcp")


def run(model, tokenizer, train_dataset, training_args: TrainingArguments, plugin: FCPPlugin,
        eval_dataset=None) -> dict:
    """Train with FCPTrainer, save the model and tokenizer, end the process group cleanly."""
    trainer = FCPTrainer(model=model, args=training_args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, fcp_plugin=plugin)
    logger.info("FCP: world_size=%d block_size=%d tokens_per_rank=%d kernel=%s documents=%d",
                plugin.world_size, plugin.block_size, plugin.tokens_per_rank, plugin.kernel, len(train_dataset))
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"train_seconds": round(time.perf_counter() - start, 1), "steps": trainer.state.global_step,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "train_loss": result.training_loss}
    if eval_dataset is not None:
        summary.update(trainer.evaluate())
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        logger.info("summary %s; model saved to %s", summary, training_args.output_dir)
    trainer.close()
    return summary
