"""hf_fcp: flexible context parallelism for Hugging Face training.

Main entry points: :func:`plan_batch` (plan a global batch: placement + P2P rounds), the per-rank view
``plan.for_rank(rank)``, :func:`fcp_attention` (the exact distributed attention op), and for training
``attn_implementation="fcp"`` (registered by importing this package), :class:`FCPCollator`,
:class:`FCPPlugin` and :class:`FCPTrainer`.
"""

from .attention import fcp_attention
from .collator import FCPCollator
from .comm import PlanMismatchError, get_default_group, set_default_group
from .config import STRATEGIES, PlanOptions
from .integrations import ATTN_IMPLEMENTATION, register
from .layout import FCPPlan, Transfer, span_cost
from .planning import plan_batch
from .sampler import PieceDataset, TokenBudgetSampler
from .views import RankView

__version__ = "0.1.0"

register()  # attn_implementation="fcp" works from here on

_LAZY = {"FCPTrainer": ("trainer", "FCPTrainer"), "FCPPlugin": ("integrations.accelerate", "FCPPlugin")}


def __getattr__(name):  # FCPTrainer / FCPPlugin pull in transformers.Trainer and accelerate: load on use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'hf_fcp' has no attribute {name!r}")


__all__ = ["ATTN_IMPLEMENTATION", "FCPCollator", "FCPPlan", "FCPPlugin", "FCPTrainer", "PieceDataset",
           "PlanMismatchError", "PlanOptions", "RankView", "STRATEGIES", "TokenBudgetSampler", "Transfer",
           "fcp_attention", "get_default_group", "plan_batch", "set_default_group", "span_cost"]
