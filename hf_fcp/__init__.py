"""hf_fcp: flexible context parallelism for Hugging Face training.

Main entry points: :func:`plan_batch` (plan a global batch: placement + P2P rounds) and the per-rank
view ``plan.for_rank(rank)``.
"""

from .attention import fcp_attention
from .comm import PlanMismatchError, get_default_group, set_default_group
from .config import STRATEGIES, PlanOptions
from .layout import FCPPlan, Transfer, span_cost
from .planning import plan_batch
from .views import RankView

__version__ = "0.1.0"

__all__ = ["FCPPlan", "PlanMismatchError", "PlanOptions", "RankView", "STRATEGIES", "Transfer", "fcp_attention",
           "get_default_group", "plan_batch", "set_default_group", "span_cost"]
