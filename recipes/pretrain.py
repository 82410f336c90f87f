"""Pretrain a causal LM with FCP (flexible context parallelism).

The embedded default needs no download: a tiny Llama-style model from scratch on the Python standard
library's source files (byte-level tokens; a long-tailed mix of short and very long documents)::

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/pretrain.py

Hub data / model: ``--dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 --model_name_or_path
<model>``. FCP settings: ``--block_size --tokens_per_rank --kernel --overlap --long_sequence_policy`` (or
``FCP_*`` environment variables); every ``TrainingArguments`` option works as usual.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from arguments import EMBEDDED_FCP_DEFAULTS
from common import (
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
    tokenize_once,
)
from transformers import set_seed

from hf_fcp.integrations.embedded import stdlib_corpus

DEFAULTS = ["--output_dir", "outputs/pretrain", "--max_steps", "150", "--learning_rate", "3e-3",
            "--warmup_steps", "10", "--lr_scheduler_type", "cosine", "--weight_decay", "0.01",
            "--logging_steps", "10", "--save_strategy", "steps", "--save_steps", "50", "--save_total_limit", "2",
            "--report_to", "none",
            *EMBEDDED_FCP_DEFAULTS, "--seed", "0"]


@dataclass
class DataArguments:
    _argument_group_name = "data"
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset; default: the Python standard library's .py files (no download)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    max_documents: int | None = field(default=400, metadata={
        "help": "Use at most this many documents (a seeded sample); 0 = all."})

    def __post_init__(self) -> None:
        check_data_source(self)


def load_documents(data_args: DataArguments, tokenizer, seed: int):
    """A dataset with one tokenized document per row (``input_ids``, EOS appended, empty ones dropped)."""
    limit = data_args.max_documents or None
    if data_args.dataset_name is None:
        raw = stdlib_corpus(limit, seed=seed)
    else:
        raw = load_hub_dataset(data_args)
        if limit is not None and limit < len(raw):
            raw = raw.shuffle(seed=seed).select(range(limit))
    if data_args.text_column not in raw.column_names:
        raise RecipeArgumentError(f"--text_column: got {data_args.text_column!r}, expected one of {raw.column_names}")
    raw = raw.filter(lambda e: len(e[data_args.text_column].strip()) > 0)
    eos = tokenizer.eos_token_id
    encode = _bytes_encode if data_args.dataset_name is None and len(tokenizer) == 258 else None

    def tokenize(batch):
        texts = batch[data_args.text_column]
        ids = [encode(t) for t in texts] if encode else tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    return raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="tokenize")


def _bytes_encode(text: str) -> list[int]:
    """The embedded byte-level tokenizer's encoding (identical ids, ~50× faster on large files)."""
    return list(text.encode("utf-8"))


def parse_args():
    """(model_args, data_args, training_args, fcp_plugin) from the command line over this recipe's defaults."""
    return parse(DataArguments, DEFAULTS)


def main() -> dict:
    model_args, data_args, training_args, plugin = parse_args()
    setup_logging(training_args)
    tokenizer = load_tokenizer(model_args)
    key = {"recipe": "pretrain", "data": asdict(data_args),
           "tokenizer": [model_args.model_name_or_path, len(tokenizer)], "seed": training_args.seed}
    dataset = tokenize_once(lambda: load_documents(data_args, tokenizer, training_args.seed), key, training_args)
    set_seed(training_args.seed)  # the same initial weights on every run
    model = load_model(model_args, tokenizer, max_positions=plugin.tokens_per_rank * 64)
    logger.info("model: %s, %.2fM parameters", type(model).__name__, model.num_parameters() / 1e6)
    return run(model, tokenizer, dataset, training_args, plugin)


if __name__ == "__main__":
    cli(main)
