"""The recipes' command line: ``HfArgumentParser`` over the model, data, FCP, run and ``TrainingArguments``
dataclasses, with the recipe's own defaults (shown by ``--help``) and help text for every FCP flag.

Precedence: command line > ``FCP_<NAME>`` environment variable (FCP flags only) > recipe default > the
dataclass default. ``--help`` lists the recipe's groups first, then every ``TrainingArguments`` flag.
"""

from __future__ import annotations

import ast
import inspect
import os
import textwrap
from dataclasses import dataclass, field, fields

import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_fcp.integrations.accelerate import FCPPlugin

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


def attribute_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string right below each field), one line each."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


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
    """The parser of one recipe; ``parse_args_into_dataclasses`` returns (model, data, FCPArguments,
    RunArguments, ``training_cls`` (TrainerArguments, or e.g. TRL's SFTConfig), remaining strings)."""
    parser = HfArgumentParser((model_cls, data_cls, FCPArguments, RunArguments, training_cls))
    parser.usage = USAGE
    parser.set_defaults(**recipe_defaults(defaults))
    docs = attribute_docs(FCPPlugin)
    for action in parser._actions:
        if action.dest in docs and not action.help:
            env = os.environ.get(f"FCP_{action.dest.upper()}")
            shown = f" [now: FCP_{action.dest.upper()}={env}]" if env else ""
            # a field without a recipe default is None (the docstring names the real default): hide "None"
            recipe = " This recipe: %(default)s." if action.default is not None else "%(default).0s"  # no "None"
            action.help = docs[action.dest] + shown + recipe
    return parser
