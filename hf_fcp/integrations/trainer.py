"""``FCPTrainer``: ``transformers.Trainer`` with FCP dataloaders, exact token-level loss and plan stats.

Changes from ``Trainer`` (nothing else), all in :class:`FCPTrainerMixin`, which makes any ``Trainer``
subclass FCP (``FCPTrainer`` = mixin + ``Trainer``; ``hf_fcp.FCPSFTTrainer`` = mixin + TRL's ``SFTTrainer``):

* train/eval dataloaders come from :meth:`FCPPlugin.prepare_dataloader`: every rank iterates the same
  token-budget global batches and keeps its FCP shard (``per_device_*_batch_size`` is not used: a batch
  holds up to ``world_size × tokens_per_rank`` tokens); evaluation and prediction batches hold consecutive
  examples, in dataset order. With ``dataloader_num_workers`` ≥ 1 (the recipes' default) every loader plans
  its batches in DataLoader worker processes, off the training step;
* the loss is a token mean over the GLOBAL batch although ranks hold different token counts: Trainer's
  ``num_items_in_batch`` counts ``shift_labels`` across ranks in training; evaluation gets the same, and
  ``eval_loss`` is the one-process value (never scaled by the world size);
* ``predict()`` and ``compute_metrics`` get whole documents in dataset order, as under plain ``Trainer``:
  logits ``(num_examples, longest, vocab)`` and labels ``(num_examples, longest)``, padded with -100
  (:mod:`.predict`), with no row repeated per rank;
* plan figures (imbalance, comm MB, rounds, planner time, tokens) are averaged over the logging interval and
  logged as ``fcp/<name>``;
* ``ddp_find_unused_parameters`` defaults to False (every parameter of a causal LM is used; DDP's search
  for unused ones costs a graph traversal and warns on every rank);
* a CPU (gloo) job asked for FSDP gets Accelerate's FSDP2 path, which Accelerate reserves for accelerators;
* :meth:`close` ends a distributed run cleanly (gloo otherwise may abort at interpreter exit).
"""

from __future__ import annotations

import logging
import pathlib
from collections import defaultdict

import torch
from transformers import Trainer

from ..plan.checks import check_int
from .accelerate import FCPPlugin, shutdown
from .predict import gather_documents, whole_document_check
from .sampler import PieceDataset, TokenBudgetSampler, dataset_lengths
from .workers import WorkerCollate

logger = logging.getLogger(__name__)
LOGGED_STATS = {"compute_imbalance": ("compute_imbalance", 1.0), "memory_imbalance": ("memory_imbalance", 1.0),
                "comm_bytes": ("comm_MB", 1e-6), "rounds": ("rounds", 1.0), "plan_ms": ("plan_ms", 1.0),
                "tokens": ("tokens", 1.0)}
"""``PlanStats`` field → (logged as ``fcp/<name>``, scale); each the mean over the logging interval."""


class FCPTrainerMixin:
    """Makes a ``transformers.Trainer`` subclass train models loaded with ``attn_implementation="fcp"``:
    ``class MyFCPTrainer(FCPTrainerMixin, MyTrainer)``. The changes are listed in this module's docstring.

    Args:
        *args, **kwargs: as for the ``Trainer`` subclass (``data_collator`` is ignored: FCP collates).
        fcp_plugin: FCP settings (default ``FCPPlugin()``, i.e. ``FCP_*`` environment variables).
    """

    def __init__(self, model=None, args=None, *rest, fcp_plugin: FCPPlugin | None = None, **kwargs):
        if args is not None and args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False  # a causal LM uses every parameter: skip DDP's search
        super().__init__(model, args, *rest, **kwargs)
        check_training_args(self.args)
        self.fcp = (fcp_plugin or FCPPlugin()).setup(self.accelerator, job_timeout_s=self.args.ddp_timeout)
        try:
            if self.fcp.world_size != self.accelerator.num_processes:
                raise ValueError(f"FCP group: got {self.fcp.world_size} ranks, expected "
                                 f"{self.accelerator.num_processes} (every process of the job takes part in FCP)")
            self.fcp.prepare_model(self.model)
        except Exception:
            self.fcp.teardown()  # a refused model leaves no FCP group or wait limit behind in the process
            raise
        self._fcp_sums: dict[str, float] = defaultdict(float)
        self._fcp_steps = 0

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if _promote_fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    # ---- data ----------------------------------------------------------------------------------------
    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: training requires a train_dataset.")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if not self.args.dataloader_num_workers:
            logger.info("FCP plans every batch on the training step (dataloader_num_workers=0); "
                        "dataloader_num_workers=1 plans in a DataLoader worker, beside the step")
        return self.fcp.prepare_dataloader(self.train_dataset, self.accelerator, shuffle=True, seed=seed,
                                           model_config=self.model.config, **self._loader_kwargs())

    def get_eval_dataloader(self, eval_dataset=None):
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError(f"{type(self).__name__}: evaluation requires an eval_dataset.")
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        return self._in_order_loader(eval_dataset if eval_dataset is not None else self.eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._in_order_loader(test_dataset)

    def _in_order_loader(self, dataset):
        """Evaluation / prediction: batches of consecutive examples (first-fit looks no further than the next
        example), so per-document outputs come back in dataset order."""
        from accelerate.data_loader import prepare_data_loader

        self.fcp.setup(self.accelerator)
        sampler = TokenBudgetSampler(dataset_lengths(dataset), max_tokens=self._global_budget(), shuffle=False,
                                     long_sequence_policy=self.fcp.long_sequence_policy, window=1)
        loader = torch.utils.data.DataLoader(PieceDataset(dataset), batch_sampler=sampler,
                                             collate_fn=WorkerCollate(self.fcp.collator(self.model.config)),
                                             **self._loader_kwargs(persistent=False))
        return prepare_data_loader(loader, device=self.accelerator.device, num_processes=1, process_index=0,
                                   put_on_device=True, rng_types=None, non_blocking=self.accelerator.non_blocking,
                                   use_seedable_sampler=False)

    def _global_budget(self) -> int:
        return self.fcp.world_size * self.fcp.tokens_per_rank

    def _loader_kwargs(self, persistent: bool = True) -> dict:
        """``DataLoader`` options from ``TrainingArguments``. With ``dataloader_num_workers`` ≥ 1 the FCP
        collator, and so the planner, runs in the worker processes, off the training step; ``persistent``
        False for loaders built per call (evaluation, prediction), whose workers would outlive their use."""
        workers = self.args.dataloader_num_workers
        return {"num_workers": workers, "pin_memory": self.args.dataloader_pin_memory,
                **({"persistent_workers": persistent and self.args.dataloader_persistent_workers,
                    "prefetch_factor": self.args.dataloader_prefetch_factor} if workers else {})}

    # ---- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stats = inputs.pop("fcp_stats", None)
        if stats is not None and model.training:
            self._record(stats)
        if num_items_in_batch is None and "shift_labels" in inputs and not model.training:
            num_items_in_batch = self._global_label_count(inputs["shift_labels"])
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _global_label_count(self, shift_labels: torch.Tensor) -> torch.Tensor:
        """Label tokens of the whole global batch (evaluation: one batch, summed over ranks)."""
        count = shift_labels.ne(-100).sum()
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    # ---- evaluation and prediction --------------------------------------------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        loss_only = self.args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        if not loss_only:
            whole_document_check(dataset_lengths(dataloader.dataset.dataset), self._global_budget())
        self.gather_function = _already_whole  # prediction_step returns the whole global batch on every rank
        return super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                       ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The parent's step on this rank's shard; then the loss averaged over ranks (each rank's share is
        scaled ×world against DDP averaging, as in training) and logits / labels gathered into whole documents
        (:func:`.predict.gather_documents`): the same on every rank."""
        view, labels = inputs["fcp_plan"], inputs.get("labels")
        loss, logits, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if loss is not None and self.fcp.world_size > 1:
            loss = self.accelerator.reduce(loss.detach().float(), reduction="mean")
        if prediction_loss_only or logits is None:
            return loss, None, None
        if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.shape[:2] != labels.shape[:2]:
            shapes = [tuple(t.shape) for t in logits] if isinstance(logits, (tuple, list)) else type(logits).__name__
            raise ValueError(f"{type(self).__name__}.predict: got model outputs {shapes} besides the loss, expected "
                             f"one per-token tensor (the logits, (1, tokens, vocab)); FCP gathers per-token outputs "
                             f"only: drop the others with ignore_keys / keys_to_ignore_at_inference")
        group = self.fcp.group
        return loss, gather_documents(logits, view, group), gather_documents(labels, view, group)

    # ---- logging -------------------------------------------------------------------------------------
    def _record(self, stats) -> None:  # a PlanStats
        for field, (name, scale) in LOGGED_STATS.items():
            self._fcp_sums[name] += float(getattr(stats, field)) * scale
        self._fcp_steps += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._fcp_steps and "loss" in logs:
            logs.update({f"fcp/{k}": round(v / self._fcp_steps, 3) for k, v in self._fcp_sums.items()})
            self._fcp_sums.clear()
            self._fcp_steps = 0
        super().log(logs, *args, **kwargs)

    # ---- teardown ------------------------------------------------------------------------------------
    def close(self, destroy_process_group: bool = True) -> None:
        """End of a run: release the model and optimizer, destroy the FCP group and (by default) the
        default process group, in the order that avoids gloo's abort at interpreter exit."""
        self.accelerator.free_memory()
        self.model_wrapped = self.model = self.optimizer = self.lr_scheduler = None
        self.fcp.teardown()
        shutdown(destroy_process_group=destroy_process_group)


class FCPTrainer(FCPTrainerMixin, Trainer):
    """``transformers.Trainer`` for models loaded with ``attn_implementation="fcp"`` (see :class:`FCPTrainerMixin`).

    Args:
        *args, **kwargs: as for ``transformers.Trainer`` (``data_collator`` is ignored: FCP collates).
        fcp_plugin: FCP settings (default ``FCPPlugin()``, i.e. ``FCP_*`` environment variables).
    """


def _already_whole(tensor):
    """The evaluation loop's gather under FCP: every rank already holds the whole global batch."""
    return tensor


def check_training_args(args, flag_prefix: str = "") -> None:
    """``TrainingArguments`` that transformers accepts but that break or silently distort an FCP run raise
    ``ValueError`` naming the setting (``flag_prefix + name``: the recipes pass ``"--"``)."""

    def name(field: str) -> str:
        return flag_prefix + field

    if args.max_steps == 0 or args.max_steps < -1 or (args.max_steps == -1 and args.num_train_epochs <= 0):
        raise ValueError(f"{name('max_steps')}: got {args.max_steps} ({name('num_train_epochs')} "
                         f"{args.num_train_epochs}), expected a positive number of steps, or -1 with "
                         f"{name('num_train_epochs')} > 0")
    if not args.learning_rate > 0:
        raise ValueError(f"{name('learning_rate')}: got {args.learning_rate}, expected a positive number")
    check_int(name("gradient_accumulation_steps"), args.gradient_accumulation_steps)
    if args.save_strategy == "steps" and not args.save_steps > 0:
        raise ValueError(f"{name('save_steps')}: got {args.save_steps}, expected a positive number with "
                         f"{name('save_strategy')} steps")
    if args.output_dir and pathlib.Path(args.output_dir).is_file():
        raise ValueError(f"{name('output_dir')}: got {args.output_dir!r}, an existing file; expected a directory")
    if args.label_smoothing_factor:
        raise ValueError(f"{name('label_smoothing_factor')}: got {args.label_smoothing_factor}, expected 0 (the "
                         f"label smoother re-shifts labels; FCP batches carry shift_labels computed before cutting)")
    if "inputs" in (args.include_for_metrics or []):
        raise ValueError(f"{name('include_for_metrics')}: got {args.include_for_metrics}, expected no 'inputs' (a rank "
                         f"holds pieces of documents in the plan's order; 'loss' is supported, and the labels and "
                         f"logits compute_metrics gets are whole documents)")
    if args.world_size > 1 and not args.average_tokens_across_devices:
        raise ValueError(f"{name('average_tokens_across_devices')}: got False, expected True (ranks hold "
                         f"different token counts; the loss is exact only when the label count is summed over ranks)")


def _promote_fsdp_on_cpu(accelerator, args) -> bool:
    """Accelerate runs FSDP only on accelerators: a multi-process CPU (gloo) job asked for FSDP (``--fsdp`` /
    ``fsdp_config`` or an accelerate config with ``distributed_type: FSDP``) silently falls back to DDP. Here
    such a job gets the FSDP plugin it asked for, so the CPU runs the same Accelerate FSDP2 code path
    (``fully_shard`` on a CPU device mesh) as a GPU job. Returns whether it promoted the state."""
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wanted = args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}))
    if plugin.fsdp_version != 2:
        raise ValueError(f"fsdp_config version: got {plugin.fsdp_version}, expected 2 on a CPU (gloo) job; FSDP1 "
                         f"needs accelerators")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # Accelerate has no setter for the job's distributed type; PartialState is a Borg (every instance shares one
    # attribute dict), so assigning the public attribute updates it for all, as AcceleratorState.__init__ does.
    PartialState().distributed_type = DistributedType.FSDP
    return True
