"""Supervised fine-tuning (SFT) with FCP: the loss covers the responses only (prompt labels are -100).

The embedded default needs no download: prompt = a function's docstring from the Python standard
library, response = the function's source; the model is the tiny one from scratch, or the pretrained
one from recipes/pretrain.py::

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/finetune.py \\
        --model_name_or_path outputs/pretrain

Hub data: ``--dataset_name <name> --prompt_column prompt --response_column completion``.
"""

from __future__ import annotations

import ast
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

from hf_fcp.plan.checks import check_int
from hf_fcp.workloads import stdlib_files

DEFAULTS = ["--output_dir", "outputs/finetune", "--max_steps", "60", "--learning_rate", "1e-3",
            "--warmup_steps", "5", "--lr_scheduler_type", "cosine", "--logging_steps", "10",
            "--save_strategy", "steps", "--save_steps", "20", "--save_total_limit", "2", "--report_to", "none",
            *EMBEDDED_FCP_DEFAULTS, "--long_sequence_policy", "error", "--seed", "0"]
TEMPLATE = "### Docstring\n{doc}\n### Code\n"


@dataclass
class SFTDataArguments:
    _argument_group_name = "data"
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset with prompt/response columns; default: standard-library docstring → code."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    response_column: str = field(default="completion", metadata={"help": "Column holding the responses."})
    max_documents: int | None = field(default=300, metadata={"help": "Standard-library files to read (0 = all)."})
    max_examples: int | None = field(default=None, metadata={"help": "Use at most this many examples."})
    max_length: int | None = field(default=None, metadata={
        "help": "Drop examples longer than this (default: --tokens_per_rank); SFT examples are never split."})

    def __post_init__(self) -> None:
        check_data_source(self)
        check_int("--max_examples", self.max_examples, optional=True)
        check_int("--max_length", self.max_length, optional=True)


def stdlib_functions(max_files: int | None, seed: int = 0) -> dict[str, list[str]]:
    """Prompt/response pairs from the standard library: documented functions → (docstring, source)."""
    prompts, responses = [], []
    for path in stdlib_files(max_files, seed):
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
                code = ast.get_source_segment(source, node)
                if code:
                    prompts.append(TEMPLATE.format(doc=ast.get_docstring(node).strip()))
                    responses.append(code)
    return {"prompt": prompts, "completion": responses}


def encode_sft(prompt_ids: list[int], response_ids: list[int], eos: int) -> dict[str, list[int]]:
    """One SFT example: input_ids = prompt + response + EOS; labels -100 over the prompt."""
    response = [*response_ids, eos]
    return {"input_ids": [*prompt_ids, *response], "labels": [-100] * len(prompt_ids) + response}


def load_examples(data_args: SFTDataArguments, tokenizer, seed: int, max_length: int):
    from datasets import Dataset

    if data_args.dataset_name is None:
        raw = Dataset.from_dict(stdlib_functions(data_args.max_documents or None, seed))
        prompt_col, response_col = "prompt", "completion"
    else:
        raw = load_hub_dataset(data_args)
        prompt_col, response_col = data_args.prompt_column, data_args.response_column
        missing = [c for c in (prompt_col, response_col) if c not in raw.column_names]
        if missing:
            raise RecipeArgumentError(f"--prompt_column/--response_column: got {missing}, expected columns "
                                      f"among {raw.column_names}")
    if data_args.max_examples is not None and data_args.max_examples < len(raw):
        raw = raw.shuffle(seed=seed).select(range(data_args.max_examples))
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        prompts = tokenizer(batch[prompt_col], add_special_tokens=False)["input_ids"]
        responses = tokenizer(batch[response_col], add_special_tokens=False)["input_ids"]
        rows = [encode_sft(p, r, eos) for p, r in zip(prompts, responses)]
        return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}

    data = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="tokenize")
    return data.filter(lambda e: len(e["input_ids"]) <= max_length, desc="drop long examples")


def check_max_length(max_length: int | None, world_size: int, tokens_per_rank: int) -> int:
    """Examples longer than a global batch can never be placed (SFT examples are never split)."""
    limit = world_size * tokens_per_rank
    if max_length is not None and max_length > limit:
        raise RecipeArgumentError(f"--max_length: got {max_length}, expected at most world_size × --tokens_per_rank"
                                  f" = {world_size} × {tokens_per_rank} = {limit} (a global batch)")
    return max_length or tokens_per_rank


def parse_args():
    """(model_args, data_args, training_args, fcp_plugin) from the command line over this recipe's defaults."""
    return parse(SFTDataArguments, DEFAULTS)


def main() -> dict:
    model_args, data_args, training_args, plugin = parse_args()
    max_length = check_max_length(data_args.max_length, training_args.world_size, plugin.tokens_per_rank)
    setup_logging(training_args)
    tokenizer = load_tokenizer(model_args)
    key = {"recipe": "finetune", "data": asdict(data_args),
           "tokenizer": [model_args.model_name_or_path, len(tokenizer)], "seed": training_args.seed,
           "max_length": max_length}
    dataset = tokenize_once(lambda: load_examples(data_args, tokenizer, training_args.seed, max_length), key,
                            training_args)
    set_seed(training_args.seed)  # the same initial weights on every run
    model = load_model(model_args, tokenizer, max_positions=plugin.tokens_per_rank * 64)
    logger.info("SFT: %d examples, %s", len(dataset), type(model).__name__)
    return run(model, tokenizer, dataset, training_args, plugin)


if __name__ == "__main__":
    cli(main)
