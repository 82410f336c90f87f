"""``FCPSFTTrainer``: TRL's ``SFTTrainer`` with FCP's data path (``pip install hf_fcp[trl]``).

TRL prepares the data as usual (``text``, ``prompt``/``completion`` and conversational ``messages`` through
the tokenizer's chat template; ``completion_only_loss``, ``assistant_only_loss``, ``dataset_text_field``,
``max_length``, ``formatting_func``) and computes its loss (``loss_type`` ``nll`` or ``dft``, with TRL's
fused LM head, which scores the pre-shifted ``shift_labels`` FCP emits). :class:`FCPTrainerMixin` supplies
the rest: token-budget global batches cut into each rank's FCP shard, the exact token mean over the global
batch, plan statistics, evaluation and prediction on whole documents. What differs from ``SFTTrainer``:

* ``packing`` and ``padding_free`` are accepted and need nothing: FCP always packs whole documents into
  token-budget batches and never pads. TRL's own packing (which would concatenate documents into rows) is
  not applied, so ``max_length`` always truncates each document (``truncation_mode`` as in TRL);
* a model given by name is loaded with ``attn_implementation="fcp"`` unless ``model_init_kwargs`` says
  otherwise (then the guard refuses it with the way out);
* ``peft_config`` works as in TRL; the adapter must be token-local (:mod:`.adapters`).
"""

from __future__ import annotations

import logging

from .trainer import FCPTrainerMixin

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # an optional extra
    raise ImportError("hf_fcp.FCPSFTTrainer needs TRL: pip install 'hf_fcp[trl]' (and 'hf_fcp[peft]' for "
                      "adapters)") from err

logger = logging.getLogger(__name__)


class FCPSFTTrainer(FCPTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` under FCP. Arguments as for ``trl.SFTTrainer``, plus ``fcp_plugin``
    (:class:`hf_fcp.FCPPlugin`; default: ``FCP_*`` environment variables). ``data_collator`` is ignored.

    Switching a TRL script: load the model with ``attn_implementation="fcp"`` (after ``import hf_fcp``) and
    replace ``SFTTrainer`` by ``FCPSFTTrainer``; see ``docs/finetuning.md``.
    """

    def __init__(self, model, args: SFTConfig | None = None, *rest, fcp_plugin=None, **kwargs):
        if args is not None:
            _fcp_packs(args)
        if isinstance(model, str) and args is not None:
            args.model_init_kwargs = {"attn_implementation": "fcp", **(args.model_init_kwargs or {})}
        super().__init__(model, args, *rest, fcp_plugin=fcp_plugin, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation, never its packing: FCP packs whole documents itself."""
        return super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)

    def get_test_dataloader(self, test_dataset):
        """``predict()`` takes the dataset formats ``evaluate()`` takes (prepared like the eval dataset)."""
        if not self._skip_prepare_dataset:
            test_dataset = self._prepare_dataset(test_dataset, self.processing_class, self.args, False,
                                                 self._formatting_func, "test")
        return super().get_test_dataloader(test_dataset)


def _fcp_packs(args) -> None:
    """``packing`` / ``padding_free`` asked for: FCP does both by construction. TRL's packing would join
    documents into rows and its padding-free collator would refuse ``max_length``; both are switched off in
    ``args`` (logged), and ``max_length`` truncates each document."""
    asked = [name for name in ("packing", "padding_free", "eval_packing") if getattr(args, name, None)]
    if asked:
        logger.info("FCPSFTTrainer: %s satisfied by FCP (whole documents packed into token-budget batches, never "
                    "padded); TRL's own packing is off, max_length=%s truncates each document", "/".join(asked),
                    args.max_length)
    args.packing = args.padding_free = False
    args.eval_packing = None
