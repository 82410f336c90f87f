"""hf_fcp: flexible context parallelism for Hugging Face training.

Main entry points: :func:`plan_batch` (plan a global batch: placement + P2P rounds) and the per-rank
view ``plan.for_rank(rank)``.
"""

from .config import STRATEGIES, PlanOptions
from .layout import FCPPlan, Transfer, span_cost
from .planning import plan_batch
from .views import RankView

__version__ = "0.1.0"

__all__ = ["FCPPlan", "PlanOptions", "RankView", "STRATEGIES", "Transfer", "plan_batch", "span_cost"]
