"""The recipes' command line: ``HfArgumentParser`` over the model, data, FCP, run and ``TrainingArguments``
dataclasses, with the recipe's own defaults (shown by ``--help``) and help text for every FCP flag.

Precedence: command line > ``FCP_<NAME>`` environment variable (FCP flags only) > recipe default > the
dataclass default. ``--help`` lists the recipe's groups first, then every ``TrainingArguments`` flag.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_fcp.integrations.accelerate import FCPPlugin

EMBEDDED_FCP_DEFAULTS = ["--block_size", "512", "--tokens_per_rank", "2048"]
"""The recipes' FCP defaults, smaller than the plugin's on purpose: the embedded tiny model trains on two
CPU processes, where a 2 × 2048-token batch of 512-token blocks spreads a document over both ranks in
seconds per step (the plugin's defaults, from ``PlanSettings``, are sized for GPUs)."""
EMBEDDED_SFT_FCP_DEFAULTS = ["--block_size", "128", "--tokens_per_rank", "1024"]
"""recipes/sft.py on its embedded arithmetic chats: conversations of a few dozen tokens, so smaller blocks and
batches than the corpus recipes keep several documents per rank and every rank busy."""

LOADER_DEFAULTS = ["--dataloader_num_workers", "1", "--dataloader_persistent_workers", "true"]
"""Every recipe collates in a DataLoader worker process: the FCP collator plans each global batch
(``hf_fcp.plan_batch``), so planning runs beside the training step instead of on it. A plan takes a few
milliseconds at a few ranks but tens to hundreds of milliseconds at hundreds of ranks.

Rule for the count: one worker per rank. Each step needs one plan, and with the DataLoader's prefetch (two
batches per worker) one worker hides planning completely whenever a plan takes less time than a step; more
workers help only when a plan is slower than a step, and each costs a process and a CPU core beside the
step's. Persistent, so the worker (and the planner's caches in it) lives across epochs instead of being
forked again at each one. ``--dataloader_num_workers 0`` plans in the training process again. A recipe's own
``DEFAULTS`` override these."""

USAGE = ("%(prog)s [--FLAG VALUE ...]\n\nFlags are grouped below: model, data, FCP and run (this recipe), then "
         "every transformers.TrainingArguments flag. Defaults shown are this recipe's.")


class FCPArguments(FCPPlugin):
    """``FCPPlugin`` as a flag group (no new fields)."""

    _argument_group_name = "FCP (flexible context parallelism; each flag also reads FCP_<NAME> from the environment)"


@dataclass
class RunArguments:
    _argument_group_name = "run"
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace a non-empty --output_dir. Without it the recipe refuses, so a finished run and its "
                "checkpoints are never overwritten by accident (--resume_from_checkpoint last continues it)."})


@dataclass
class TrainerArguments(TrainingArguments):
    """``TrainingArguments`` as the last flag group (no new fields)."""

    _argument_group_name = "Trainer (transformers.TrainingArguments)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None (an FCP flag left at None takes ``FCP_<NAME>``, else the default
    its help names); an FCP flag's recipe default is shown as "This recipe: X." after the plugin's own."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        if "FCP_" in (action.help or ""):
            return action.help + " This recipe: %(default)s."
        return super()._get_help_string(action)


def recipe_defaults(defaults: list[str]) -> dict[str, str]:
    """``--flag value`` pairs as parser defaults, minus the FCP settings given as ``FCP_<NAME>`` variables (so the
    environment overrides a recipe default), plus ``use_cpu`` on a machine without CUDA."""
    fcp = {f.name for f in fields(FCPPlugin) if f.init}
    pairs = dict(zip((flag[2:] for flag in defaults[::2]), defaults[1::2]))
    out = {k: v for k, v in pairs.items() if not (k in fcp and os.environ.get(f"FCP_{k.upper()}"))}
    if not torch.cuda.is_available():
        out.setdefault("use_cpu", "true")
    return out


def build_parser(model_cls, data_cls, defaults: list[str], training_cls=TrainerArguments) -> HfArgumentParser:
    """The parser of one recipe, with :data:`LOADER_DEFAULTS` and then the recipe's ``defaults`` as parser
    defaults; ``parse_args_into_dataclasses`` returns (model, data, FCPArguments, RunArguments, ``training_cls``
    (TrainerArguments, or e.g. TRL's SFTConfig), remaining strings)."""
    parser = HfArgumentParser((model_cls, data_cls, FCPArguments, RunArguments, training_cls),
                              formatter_class=HelpFormatter)  # help: each field's metadata
    parser.usage = USAGE
    parser.set_defaults(**recipe_defaults([*LOADER_DEFAULTS, *defaults]))
    return parser
