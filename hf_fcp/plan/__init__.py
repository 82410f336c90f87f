"""Planning: from the sequence lengths of a global batch to where every token lives and which K/V blocks
move where, in which congestion-free round. Pure and deterministic (no torch.distributed; numpy only —
torch is loaded when a rank's view is built), so every rank computes the same plan.

Main entry: :func:`plan_batch` with :class:`PlanSettings`; ``plan.for_rank(r)`` gives rank ``r``'s
:class:`~hf_fcp.plan.views.RankView`. Modules, in import order: :mod:`.checks` (argument checks),
:mod:`.spans` (span arithmetic), :mod:`.cost` (kernel tile model), :mod:`.settings`, :mod:`.fcp_plan`
(plan types and figures), :mod:`.baseline_placements` and :mod:`.placement` (who holds what),
:mod:`.rounds` (who sends what, when), :mod:`.execution` (fused or split, overlapped or not: the modelled
layer time), :mod:`.search` and :mod:`.candidates` (the candidate placements, grouped ones too, and the
choice), :mod:`.schedule` and :mod:`.timeline` (the exchange's schedule on the engine's timeline),
:mod:`.planner` (``plan_batch``), :mod:`.views` (per-rank view), :mod:`.validate` (independent checks).
"""

from .fcp_plan import FCPPlan, PlanStats, RankLoads, Transfer, imbalance
from .planner import make_plan, plan_batch
from .settings import BALANCE, KERNELS, STRATEGIES, PlanSettings
from .spans import span_cost


def __getattr__(name):  # RankView needs torch: load it on use, so planning alone stays numpy-only
    if name == "RankView":
        from .views import RankView

        return RankView
    raise AttributeError(f"module 'hf_fcp.plan' has no attribute {name!r}")


__all__ = ["BALANCE", "FCPPlan", "KERNELS", "PlanSettings", "PlanStats", "RankLoads", "RankView", "STRATEGIES",
           "Transfer", "imbalance", "make_plan", "plan_batch", "span_cost"]
