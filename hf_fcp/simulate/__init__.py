"""Scale simulator: what FCP buys against ring, all-gather, ByteScale-, WLB-LLM- and MagiAttention-style
context parallelism at 8–1024 GPUs, driven by the real planner's plans.

Main entry: :func:`run` with :class:`SimSettings` (or ``hf-fcp simulate`` on the command line). Pieces:
:mod:`.cluster` (hardware model), :mod:`.models` (attention shapes), :mod:`.strategies` (placements),
:mod:`.engine` (timing), :mod:`.runner` (sweeps), :mod:`.plots`; length distributions and batches come from
:mod:`hf_fcp.workloads`. It uses the planning layer only (numpy), never the engine.
"""

from ..workloads import Distribution, make_batches, parse_distribution
from .cluster import Cluster, load_cluster
from .engine import SimResult, simulate, simulate_strategy
from .models import AttentionModel, get_model
from .runner import Report, Row, SimSettings, run, speedups
from .strategies import STRATEGY_NAMES

__all__ = ["AttentionModel", "Cluster", "Distribution", "Report", "Row", "STRATEGY_NAMES", "SimResult", "SimSettings",
           "get_model", "load_cluster", "make_batches", "parse_distribution", "run", "simulate", "simulate_strategy",
           "speedups"]
