"""hf_fcp: flexible context parallelism for Hugging Face training.

Main entry points: :func:`plan_batch` (plan a global batch: placement + P2P rounds) with
:class:`PlanSettings`, the per-rank view ``plan.for_rank(rank)``, :func:`fcp_attention` (the exact
distributed attention op), and for training ``attn_implementation="fcp"`` (registered by importing this
package), :class:`FCPCollator`, :class:`FCPPlugin` and :class:`FCPTrainer` (TRL: :class:`FCPSFTTrainer`).

Importing the package is cheap: every name below loads its layer on first use, and ``"fcp"`` is
registered with transformers the moment transformers' attention and mask interfaces are loaded (at once
if they already are), so planning and the ``hf-fcp`` command line never pay for importing transformers.
"""

from importlib import import_module

from .integrations.registration import register_on_import

__version__ = "0.1.0"

_EXPORTS = {  # name -> module that defines it
    **dict.fromkeys(("FCPPlan", "PlanSettings", "PlanStats", "RankLoads", "STRATEGIES", "Transfer", "plan_batch",
                     "span_cost"), "hf_fcp.plan"),
    "RankView": "hf_fcp.plan.views",
    "fcp_attention": "hf_fcp.engine.attention",
    **dict.fromkeys(("PeerFailureError", "PlanMismatchError", "get_default_group", "set_default_group"),
                    "hf_fcp.engine.comm"),
    "FCPCollator": "hf_fcp.integrations.collator",
    **dict.fromkeys(("PieceDataset", "TokenBudgetSampler"), "hf_fcp.integrations.sampler"),
    "FCPPlugin": "hf_fcp.integrations.accelerate",
    **dict.fromkeys(("FCPTrainer", "FCPTrainerMixin"), "hf_fcp.integrations.trainer"),
    "FCPSFTTrainer": "hf_fcp.integrations.sft",
    **dict.fromkeys(("ATTN_IMPLEMENTATION", "register"), "hf_fcp.integrations.transformers"),
}

_MOVED = ("comm", "cost")  # modules that moved into a layer; hf_fcp.<name> is a deprecated alias of the new place

register_on_import()  # attn_implementation="fcp" works from here on


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _MOVED:
        return import_module(f"hf_fcp.{name}")  # warns once, then is an attribute of the package
    raise AttributeError(f"module 'hf_fcp' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
