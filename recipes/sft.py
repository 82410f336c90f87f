"""Supervised fine-tuning with TRL's ``SFTTrainer`` under FCP (``hf_fcp.FCPSFTTrainer``), optionally with a LoRA
adapter (``--use_peft --lora_r 16 --lora_alpha 32``, as TRL's own scripts name them).

The embedded default needs no download: the tiny model from scratch, the byte-level tokenizer with a chat
template, and arithmetic conversations made locally, trained on the assistant turns only::

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/sft.py
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/sft.py --resume_from_checkpoint last

Hub model and data: ``--model_name_or_path <model> --dataset_name <dataset>`` (any TRL dataset format:
``messages``, ``prompt``/``completion`` or ``text``; ``--dataset_text_field`` as in TRL). Every ``SFTConfig``
flag is accepted (``--max_length`` truncates each document; ``--packing`` / ``--padding_free`` need nothing:
FCP packs whole documents into token-budget batches and never pads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arguments import EMBEDDED_SFT_FCP_DEFAULTS
from common import (
    ModelArguments,
    RecipeArgumentError,
    check_data_source,
    cli,
    load_hub_dataset,
    load_model,
    load_tokenizer,
    logger,
    parse,
    run,
    setup_logging,
)
from transformers import set_seed
from trl import SFTConfig

from hf_fcp.integrations.embedded_chat import arithmetic_chats, chat_tokenizer
from hf_fcp.integrations.sft import FCPSFTTrainer
from hf_fcp.plan.checks import check_int

DEFAULTS = ["--output_dir", "outputs/sft", "--max_steps", "40", "--learning_rate", "3e-3",
            "--warmup_steps", "4", "--lr_scheduler_type", "cosine", "--logging_steps", "5",
            "--save_strategy", "steps", "--save_steps", "20", "--save_total_limit", "2", "--report_to", "none",
            "--bf16", "false", "--max_length", "256", "--assistant_only_loss", "true",
            *EMBEDDED_SFT_FCP_DEFAULTS, "--seed", "0"]


@dataclass
class SFTModelArguments(ModelArguments):
    """The recipes' model flags plus TRL's LoRA flags (``trl.ModelConfig`` names)."""

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Modules to adapt (default: every linear layer but the LM head)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA (scale alpha / sqrt(r))."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("--lora_r", self.lora_r)
        check_int("--lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise RecipeArgumentError(f"--lora_dropout: got {self.lora_dropout}, expected a number in [0, 1)")

    def peft_config(self):
        """The ``LoraConfig`` these flags ask for, or None without ``--use_peft``."""
        if not self.use_peft:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules or "all-linear", use_rslora=self.use_rslora,
                          use_dora=self.use_dora, task_type="CAUSAL_LM")


@dataclass
class SFTDataArguments:
    _argument_group_name = "data"
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset in a TRL format (messages / prompt+completion / text); default: embedded chats."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_documents: int | None = field(default=2000, metadata={
        "help": "Embedded default: conversations to make; Hub: use at most this many examples (0 = all)."})

    def __post_init__(self) -> None:
        check_data_source(self)


class SFTArguments(SFTConfig):
    """TRL's ``SFTConfig`` as the last flag group (no new fields)."""

    _argument_group_name = "SFT (trl.SFTConfig, with every transformers.TrainingArguments flag)"


def load_dataset(data_args: SFTDataArguments, seed: int):
    if data_args.dataset_name is None:
        return arithmetic_chats(data_args.max_documents or 2000, seed=seed)
    data = load_hub_dataset(data_args)
    if data_args.max_documents and data_args.max_documents < len(data):
        data = data.shuffle(seed=seed).select(range(data_args.max_documents))
    return data


def load_chat_tokenizer(model_args: SFTModelArguments):
    return chat_tokenizer() if model_args.model_name_or_path is None else load_tokenizer(model_args)


def parse_args():
    """(model_args, data_args, training_args, fcp_plugin) from the command line over this recipe's defaults."""
    return parse(SFTDataArguments, DEFAULTS, model_cls=SFTModelArguments, training_cls=SFTArguments)


def main() -> dict:
    model_args, data_args, training_args, plugin = parse_args()
    global_tokens = training_args.world_size * plugin.tokens_per_rank
    if training_args.max_length is not None and training_args.max_length > global_tokens:
        raise RecipeArgumentError(f"--max_length: got {training_args.max_length}, expected at most world_size × "
                                  f"--tokens_per_rank = {global_tokens} (a global "
                                  f"batch; longer documents would be split)")
    setup_logging(training_args)
    tokenizer = load_chat_tokenizer(model_args)
    dataset = load_dataset(data_args, training_args.seed)
    set_seed(training_args.seed)  # the same initial weights on every run
    model = load_model(model_args, tokenizer, max_positions=plugin.tokens_per_rank * 64)
    logger.info("SFT: %d examples, %s%s", len(dataset), type(model).__name__, " + LoRA" if model_args.use_peft else "")
    return run(model, tokenizer, dataset, training_args, plugin, trainer_cls=FCPSFTTrainer,
               peft_config=model_args.peft_config())


if __name__ == "__main__":
    cli(main)
