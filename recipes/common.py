"""Shared parts of recipes/pretrain.py and recipes/finetune.py: arguments, model, tokenizer, the run.

Defaults need no download: a tiny Llama-style model from scratch, the byte-level tokenizer and the
Python standard library as corpus (``hf_fcp.integrations.embedded``). ``--model_name_or_path`` and
``--dataset_name`` switch to the Hugging Face Hub.

Every argument is checked before any training or communication: a bad one raises
:class:`RecipeArgumentError`, which :func:`cli` prints as one line ``<script>: error: --<setting>: got X,
expected Y`` (exit status 2, no traceback).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pathlib
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import transformers
from arguments import build_parser
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_fcp.integrations.accelerate import FCPPlugin
from hf_fcp.integrations.embedded import byte_tokenizer, tiny_config
from hf_fcp.integrations.model_support import check_config
from hf_fcp.integrations.trainer import FCPTrainer, check_training_args
from hf_fcp.integrations.transformers import register
from hf_fcp.plan.checks import check_choice, check_int

logger = logging.getLogger("hf_fcp.recipes")
register()  # attn_implementation="fcp" (import hf_fcp does it too; idempotent)


@dataclass
class ModelArguments:
    _argument_group_name = "model"
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub model or local path to start from; default: a tiny model from scratch (no download)."})
    model_type: str = field(default="llama", metadata={"help": "From scratch: llama, qwen2 or mistral."})
    hidden_size: int = field(default=128, metadata={"help": "From scratch: hidden size."})
    num_layers: int = field(default=4, metadata={"help": "From scratch: decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "From scratch: query heads."})
    num_kv_heads: int = field(default=2, metadata={"help": "From scratch: key/value heads (GQA)."})

    def __post_init__(self) -> None:
        check_model_source(self.model_name_or_path)
        check_choice("--model_type", self.model_type, MODEL_TYPES)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            check_int(f"--{name}", getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise RecipeArgumentError(f"--num_kv_heads: got {self.num_kv_heads}, expected a divisor of "
                                      f"--num_heads={self.num_heads}")
        if self.hidden_size % (2 * self.num_heads):
            raise RecipeArgumentError(f"--hidden_size: got {self.hidden_size}, expected a multiple of 2 × "
                                      f"--num_heads = {2 * self.num_heads} (an even head dimension for RoPE)")


MODEL_TYPES = ("llama", "qwen2", "mistral")


class RecipeArgumentError(ValueError):
    """A bad recipe argument; :func:`cli` prints it as one line and exits 2."""


def check_model_source(path: str | None) -> None:
    """A local model directory must hold config.json; anything else must at least look like a Hub id."""
    if path is None:
        return
    local = pathlib.Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise RecipeArgumentError(f"--model_name_or_path: got {path!r}, a directory without config.json; "
                                      f"expected a saved model (e.g. outputs/pretrain) or a Hub model id")
        return
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or not path.strip():
        raise RecipeArgumentError(f"--model_name_or_path: got {path!r}, which does not exist; expected a saved "
                                  f"model directory (e.g. outputs/pretrain) or a Hub model id (org/name)")


def check_world_env() -> None:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK must agree before any process group is created."""
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(name)
        if raw not in (None, ""):
            if not raw.strip().isdigit():
                raise RecipeArgumentError(f"{name}: got {raw!r}, expected a non-negative integer (set by "
                                          f"accelerate launch / torchrun)")
            values[name] = int(raw)
    for size, index in (("WORLD_SIZE", "RANK"), ("LOCAL_WORLD_SIZE", "LOCAL_RANK"), ("WORLD_SIZE", "LOCAL_RANK")):
        if size in values and (values[size] < 1 or values.get(index, 0) >= values[size]):
            raise RecipeArgumentError(f"{size}: got {values[size]} with {index}={values.get(index, 0)}, expected "
                                      f"{size} >= 1 and 0 <= {index} < {size}; launch with accelerate launch")


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint directory, or ``last`` = the newest one in --output_dir."""
    if value is None:
        return None
    if value == "last":
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise RecipeArgumentError(f"--resume_from_checkpoint: got 'last', but --output_dir {output_dir!r} "
                                      f"holds no checkpoint-<step> directory; expected one to resume from")
        return last
    if not (pathlib.Path(value) / "trainer_state.json").is_file():
        raise RecipeArgumentError(f"--resume_from_checkpoint: got {value!r}, expected a checkpoint directory "
                                  f"holding trainer_state.json (e.g. {output_dir}/checkpoint-100) or 'last'")
    return value


def parse(data_cls, defaults: list[str], model_cls=None, training_cls=None):
    """(model_args, data_args, training_args, fcp_plugin) from the command line over recipe defaults
    (``model_cls`` / ``training_cls``: subclasses of ModelArguments / TrainingArguments, e.g. TRL's SFTConfig).

    Every argument is validated here, before TrainingArguments (which may join a process group) exists.
    """
    parser = build_parser(model_cls or ModelArguments, data_cls, defaults, *([training_cls] if training_cls else []))
    check_world_env()
    try:
        model_args, data_args, plugin, run_args, training_args, unknown = parser.parse_args_into_dataclasses(
            args=sys.argv[1:], return_remaining_strings=True)
    except ValueError as err:  # FCPPlugin / TrainingArguments: one line
        raise RecipeArgumentError(one_line(err)) from None
    if unknown:
        raise RecipeArgumentError(f"arguments: got unknown {unknown}, expected only the options listed by --help")
    try:
        check_training_args(training_args, flag_prefix="--")
    except ValueError as err:
        raise RecipeArgumentError(one_line(err)) from None
    training_args.resume_from_checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint,
                                                              training_args.output_dir)
    check_output_dir(training_args.output_dir, run_args.overwrite_output_dir, training_args.resume_from_checkpoint)
    return model_args, data_args, training_args, plugin


def check_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> None:
    """A finished run or its checkpoints are never overwritten by accident: a non-empty --output_dir needs
    --overwrite_output_dir true, unless the run resumes from a checkpoint there."""
    path = pathlib.Path(output_dir)
    if overwrite or resume is not None or not path.is_dir() or not any(path.iterdir()):
        return
    held = sorted(p.name for p in path.iterdir())
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    raise RecipeArgumentError(f"--output_dir: got {output_dir!r}, which already holds {shown}; expected an empty or "
                              f"new directory: continue that run with --resume_from_checkpoint last, or replace it "
                              f"with --overwrite_output_dir true")


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def cli(main) -> None:
    """Run a recipe's ``main`` under torch-elastic's ``record`` (a crash's traceback lands in the launcher's
    error file, so its failure summary names the cause). A :class:`RecipeArgumentError` becomes one stderr line
    and exit status 2, reported once per job (:func:`report_once`)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        (record(main) if os.environ.get("TORCHELASTIC_RUN_ID") else main)()
    except RecipeArgumentError as err:
        report_once(f"{pathlib.Path(sys.argv[0]).name}: error: {one_line(err)}")
        raise SystemExit(2) from None


def report_once(message: str, grace_s: float = 30.0) -> None:
    """Print ``message`` once per job, not once per rank, and hand it to the launcher.

    Under a torch-elastic launcher (``accelerate launch``, ``torchrun``) every rank writes ``message`` to its
    error file (``TORCHELASTIC_ERROR_FILE``), so the launcher's failure summary shows it as the root cause.
    Rank 0 prints it at once; the other ranks, which normally fail on the same argument, wait up to
    ``grace_s``: the launcher stops them once rank 0 has exited, and they leave quietly with status 0, so
    the summary lists rank 0 alone. A rank whose error rank 0 did not share prints it after the wait.
    """
    _write_error_file(message)
    rank = os.environ.get("RANK", "0")
    if not os.environ.get("TORCHELASTIC_RUN_ID") or not rank.isdigit() or int(rank) == 0:
        print(message, file=sys.stderr, flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the launcher stops the job: rank 0 reported it
    time.sleep(grace_s)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(message, file=sys.stderr, flush=True)


def _write_error_file(message: str) -> None:
    """torch-elastic's error-file format: the summary shows ``message`` (there is no traceback to show)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)


def setup_logging(args: TrainingArguments) -> None:
    """Recipe logs from the main process; Trainer's own progress bar only (no dataset or shard-writing bars)."""
    import datasets

    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" at every checkpoint
    datasets.disable_progress_bars()


def load_tokenizer(model_args: ModelArguments):
    if model_args.model_name_or_path is None:
        return byte_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError) as err:
        raise RecipeArgumentError(f"--model_name_or_path: got {model_args.model_name_or_path!r}, expected a saved "
                                  f"model directory or a reachable Hub model id ({one_line(err)})") from None
    if tokenizer.eos_token_id is None:
        raise RecipeArgumentError(f"tokenizer of {model_args.model_name_or_path}: got no eos_token, expected one "
                                  f"(documents are separated by EOS)")
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer, max_positions: int):
    """The model with attn_implementation="fcp" (from scratch by default)."""
    if model_args.model_name_or_path is not None:
        try:
            config = AutoConfig.from_pretrained(model_args.model_name_or_path)
        except (OSError, ValueError) as err:
            raise _not_a_checkpoint(model_args, err) from None
        try:  # the model-support guard before loading: e.g. Falcon would fail inside transformers (KeyError)
            check_config(config)
        except ValueError as err:
            raise RecipeArgumentError(
                f"--model_name_or_path {model_args.model_name_or_path}: {one_line(err)}") from None
        try:
            return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config,
                                                        attn_implementation="fcp", dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise _not_a_checkpoint(model_args, err) from None
    config = tiny_config(model_args.model_type, vocab_size=len(tokenizer), hidden_size=model_args.hidden_size,
                         layers=model_args.num_layers, heads=model_args.num_heads,
                         kv_heads=model_args.num_kv_heads, max_positions=max_positions)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="fcp")


def _not_a_checkpoint(model_args: ModelArguments, err: Exception) -> RecipeArgumentError:
    return RecipeArgumentError(f"--model_name_or_path: got {model_args.model_name_or_path!r}, expected a causal LM "
                               f"checkpoint ({one_line(err)})")


def check_data_source(args) -> None:
    """Shared data-argument checks (``args``: a recipe's data dataclass)."""
    check_int("--max_documents", args.max_documents, minimum=0, optional=True)
    if args.dataset_name is None and args.dataset_config_name is not None:
        raise RecipeArgumentError(f"--dataset_config_name: got {args.dataset_config_name!r} without --dataset_name"
                                  f", expected it only together with a Hub dataset")
    name = args.dataset_name
    if name is not None and (not name.strip() or (name.startswith(("/", ".", "~")) and
                                                  not pathlib.Path(name).expanduser().exists())):
        raise RecipeArgumentError(f"--dataset_name: got {name!r}, which does not exist; expected a Hub dataset id "
                                  f"(e.g. wikitext) or an existing local dataset path")


def load_hub_dataset(args):
    """``datasets.load_dataset`` of --dataset_name / --dataset_config_name / --dataset_split; a failure
    (unknown name, configuration or split, no network) is a one-line :class:`RecipeArgumentError`."""
    from datasets import load_dataset

    try:
        return load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
    except Exception as err:  # noqa: BLE001 — datasets raises many types; the user sees one line
        raise RecipeArgumentError(
            f"--dataset_name/--dataset_config_name/--dataset_split: got {args.dataset_name!r}/"
            f"{args.dataset_config_name!r}/{args.dataset_split!r}, expected a loadable Hub or local dataset "
            f"({type(err).__name__}: {one_line(err)})") from None


def run(model, tokenizer, train_dataset, training_args: TrainingArguments, plugin: FCPPlugin,
        eval_dataset=None, trainer_cls=FCPTrainer, **trainer_kwargs) -> dict:
    """Train with FCPTrainer (or ``trainer_cls``, given ``trainer_kwargs``), save the model and tokenizer, end
    the process group cleanly."""
    if len(train_dataset) == 0:
        raise RecipeArgumentError("training data: got 0 examples after filtering, expected at least one; check "
                                  "--max_documents / --max_examples / --max_length / --tokens_per_rank")
    try:  # FCP settings the trainer rejects (e.g. a kernel this machine lacks), before any FCP traffic
        trainer = trainer_cls(model=model, args=training_args, train_dataset=train_dataset,
                              eval_dataset=eval_dataset, processing_class=tokenizer, fcp_plugin=plugin,
                              **trainer_kwargs)
    except (ValueError, ImportError) as err:
        raise RecipeArgumentError(one_line(err)) from None
    logger.info("FCP: world_size=%d block_size=%d tokens_per_rank=%d kernel=%s documents=%d",
                plugin.world_size, plugin.block_size, plugin.tokens_per_rank, plugin.kernel, len(train_dataset))
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary = summarize(trainer.state.log_history, result.training_loss, trainer.state.global_step,
                        time.perf_counter() - start)
    trained = trainer.accelerator.unwrap_model(trainer.model)  # what ran, not what was asked for
    summary.update(mixed_precision=trainer.accelerator.mixed_precision,
                   activation_checkpointing=bool(getattr(trained, "is_activation_checkpointing", False)))
    if eval_dataset is not None:
        summary.update(trainer.evaluate())
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        logger.info("summary: %s; model saved to %s", ", ".join(f"{k} {v}" for k, v in summary.items()),
                    training_args.output_dir)
    trainer.close()
    return summary


def summarize(history: list[dict], train_loss: float, steps: int, seconds: float) -> dict:
    """The run in a few numbers; the logged losses only when some step was logged (no ``None``)."""
    losses = [h["loss"] for h in history if "loss" in h]
    summary = {"steps": steps, "train_seconds": round(seconds, 1), "train_loss": round(train_loss, 4)}
    if losses:
        summary.update(first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4))
    return summary


def tokenize_once(build, key: dict, training_args: TrainingArguments):
    """The tokenised dataset, built by the main process only: it saves it under the datasets cache, keyed by
    ``key`` (the data arguments) and this recipe code; the other ranks wait for it and load that copy.
    A later run with the same key loads it too."""
    import datasets

    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode())
    for source in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    path = pathlib.Path(datasets.config.HF_DATASETS_CACHE) / "hf_fcp_recipes" / digest.hexdigest()[:16]
    with training_args.main_process_first(desc="tokenize"):
        if (path / "dataset_info.json").is_file():
            return datasets.load_from_disk(str(path))
        data = build()
        if training_args.process_index == 0 and len(data):  # (datasets cannot reload an empty saved dataset)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            data.save_to_disk(str(tmp))
            os.replace(tmp, path)
            data = datasets.load_from_disk(str(path))
        return data
