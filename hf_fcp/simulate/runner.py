"""Sweeps: every strategy (or every fcp block size) × world size × step on the same seeded batches,
aggregated into report rows. Used by the CLI, the what-if notebook and ``benchmarks/simulate_report.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..plan.settings import WEAK_SCALING_TOKENS_PER_RANK, PlanSettings, settings_from
from ..plan.spans import span_cost
from ..workloads import Distribution, make_batches
from .cluster import Cluster
from .engine import SimResult, at_equal_memory, ideal_step_s, simulate, simulate_strategy
from .models import BWD_FLOP_RATIO, AttentionModel
from .strategies import STAGES, STRATEGY_NAMES, NotApplicable, build

SWEEP_BLOCK_SIZES = (512, 1024, 2048, 4096, 8192, 16384, 32768)
JSON_KEYS = ("strategy", "world_size", "attention_mfu", "step_ms", "compute_imbalance", "comm_imbalance",
             "comm_bytes", "exposed_comm_ms", "plan_ms")


@dataclass(kw_only=True)
class SimSettings:
    """What to simulate."""

    distribution: Distribution
    """Where sequence lengths come from (:func:`.workloads.parse_distribution`)."""
    model: AttentionModel
    """Attention shape (:data:`.models.MODELS`)."""
    cluster: Cluster
    """Hardware model (:func:`.cluster.load_cluster`)."""
    world_sizes: tuple[int, ...] = (16, 64, 256)
    """Ranks (GPUs) to simulate."""
    tokens_per_rank: int = WEAK_SCALING_TOKENS_PER_RANK  # the paper's weak-scaling setting, not a training budget
    """Tokens per rank; a batch holds exactly world_size × tokens_per_rank tokens."""
    block_size: int = PlanSettings.block_size
    """fcp block size (and magi's dispatch chunk)."""
    block_sizes: tuple[int, ...] = ()
    """Non-empty: sweep fcp over these block sizes instead of comparing strategies."""
    strategies: tuple[str, ...] = STRATEGY_NAMES
    """Strategies to compare."""
    steps: int = 3
    """Batches (training steps) per world size; results are aggregated over them."""
    seed: int = 0
    """Seed of the batches."""
    cp_size: str | int = "best"
    """CP group size of ring/allgather/wlb/magi: "best" (the fastest per batch, the default: every baseline
    at its best), "min" (the smallest holding the longest sequence) or an integer."""
    stages: int = STAGES
    """Communication stages of fcp and magi, at most (rounds coalesced, the count chosen per plan; 0 = one stage
    per round)."""
    fcp_options: dict = field(default_factory=dict)
    """Planner options for fcp (``hf_fcp.PlanSettings`` fields, e.g. ``{"locality": 1.0}``)."""

    def __post_init__(self) -> None:
        for name in ("tokens_per_rank", "block_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        bad = [w for w in self.world_sizes if isinstance(w, bool) or not isinstance(w, int) or w < 1]
        if not self.world_sizes or bad:
            raise ValueError(f"world_sizes must be positive integers, got {self.world_sizes!r}")
        bad = [s for s in self.strategies if s not in STRATEGY_NAMES]
        if bad or not self.strategies:
            raise ValueError(f"strategies must be some of {list(STRATEGY_NAMES)}, got {list(self.strategies)}")
        if not isinstance(self.stages, int) or self.stages < 0:
            raise ValueError(f"stages must be an integer >= 0, got {self.stages!r}")
        settings_from(None, dict(self.fcp_options))  # raises on unknown names or bad values


@dataclass(kw_only=True)
class Row:
    """One strategy at one world size (and block size), aggregated over the steps."""

    strategy: str
    world_size: int
    block_size: int
    attention_mfu: float
    """Σ useful FLOPs / (ranks × peak × Σ step time)."""
    step_ms: float
    compute_imbalance: float
    comm_imbalance: float
    comm_bytes: float
    """Mean per step, all ranks, forward + backward."""
    exposed_comm_ms: float
    plan_ms: float
    flop_imbalance: float
    memory_imbalance: float
    kernel_efficiency: float
    """Useful FLOPs / (peak × busy compute time), mean over ranks: how well the kernels run."""
    cp_size: int
    """CP group size used (the most frequent over the steps)."""
    of_ideal: float = 1.0
    """attention_mfu over the ``ideal`` reference's (the same batches on one modelled GPU: whole
    documents, one kernel per document, no communication; :func:`.engine.ideal_step_s`)."""

    def to_json(self) -> dict:
        d = asdict(self)
        return {**{k: d[k] for k in JSON_KEYS}, **{k: v for k, v in d.items() if k not in JSON_KEYS}}


@dataclass(kw_only=True)
class Example:
    """One batch in detail, for plots: per-rank loads of each strategy and the trace of one fcp rank."""

    world_size: int
    rank_compute_s: dict[str, np.ndarray] = field(default_factory=dict)
    trace_rank: int = 0
    trace: list = field(default_factory=list)


@dataclass(kw_only=True)
class Report:
    settings: SimSettings
    rows: list[Row]
    not_applicable: list[dict]
    example: Example | None = None

    def to_json(self) -> dict:
        return {"rows": [r.to_json() for r in self.rows], "not_applicable": self.not_applicable}


def _ideal(batches, s: SimSettings, w: int, block: int) -> Row:
    """The ``ideal`` row: the same batches' attention on one modelled GPU (:func:`.engine.ideal_step_s`)."""
    useful = sum(float(span_cost(0, np.asarray(lens)).sum()) for lens in batches) * \
        s.model.fwd_flops_per_pair * (1 + BWD_FLOP_RATIO)
    t = sum(ideal_step_s(lens, s.model, s.cluster) for lens in batches)
    return Row(strategy="ideal", world_size=w, block_size=block, attention_mfu=useful / (s.cluster.peak_flops * t),
               step_ms=1e3 * t / len(batches) / w, compute_imbalance=0.0, comm_imbalance=0.0, comm_bytes=0.0,
               exposed_comm_ms=0.0, plan_ms=0.0, flop_imbalance=0.0, memory_imbalance=0.0,
               kernel_efficiency=useful / (s.cluster.peak_flops * t), cp_size=1)


def _aggregate(results: list[SimResult], cluster: Cluster, ideal: Row) -> Row:
    r0, w = results[0], results[0].world_size
    useful = sum(r.useful_flops for r in results)
    mean = lambda f: float(np.mean([getattr(r, f) for r in results]))  # noqa: E731
    busy = sum(float(r.rank_compute_s.mean()) for r in results)
    cps = [r.cp_size for r in results]
    return Row(strategy=r0.strategy, world_size=w, block_size=r0.block_size,
               attention_mfu=useful / (w * cluster.peak_flops * sum(r.step_s for r in results)),
               step_ms=1e3 * mean("step_s"), compute_imbalance=mean("compute_imbalance"),
               comm_imbalance=mean("comm_imbalance"), comm_bytes=mean("comm_bytes"),
               exposed_comm_ms=1e3 * mean("exposed_comm_s"), plan_ms=mean("plan_ms"),
               flop_imbalance=mean("flop_imbalance"), memory_imbalance=mean("memory_imbalance"),
               kernel_efficiency=useful / (w * cluster.peak_flops * busy), cp_size=max(set(cps), key=cps.count),
               of_ideal=useful / (w * cluster.peak_flops * sum(r.step_s for r in results)) / ideal.attention_mfu)


def run(settings: SimSettings, progress: bool | None = None) -> Report:
    """Simulate every (world size, step, strategy or block size); ``progress`` shows a tqdm bar on stderr
    (None: only when stderr is a terminal)."""
    from tqdm.auto import tqdm

    s = settings
    jobs = [(b, name) for b in s.block_sizes for name in ("fcp",)] or [(s.block_size, n) for n in s.strategies]
    bar = tqdm(total=len(s.world_sizes) * s.steps * len(jobs), desc="simulate", unit="plan",
               disable=(None if progress is None else not progress), leave=False)
    rows, skipped, example = [], [], None
    for w in s.world_sizes:
        batches = make_batches(s.distribution, world_size=w, tokens_per_rank=s.tokens_per_rank, steps=s.steps,
                               seed=s.seed)
        ideal = _ideal(batches, s, w, s.block_size)
        if not s.block_sizes:
            rows.append(ideal)
        done = _one_world(s, w, batches, jobs, bar, skipped)
        rows += [_aggregate(results, s.cluster, ideal) for results in done.values()]
        if w == max(s.world_sizes) and not s.block_sizes and done:
            example = Example(world_size=w)
            example.rank_compute_s = {name: results[-1].rank_compute_s for (_, name), results in done.items()}
            if "fcp" in s.strategies:
                _trace_fcp(example, batches[-1], s)
    bar.close()
    return Report(settings=s, rows=rows, not_applicable=skipped, example=example)


def _one_world(s: SimSettings, w: int, batches, jobs, bar, skipped: list) -> dict[tuple, list[SimResult]]:
    """Every job's results on the batches of world size ``w``, in job order; fcp runs last, raced at the
    memory of each batch's fastest other strategy (:func:`.engine.at_equal_memory`)."""
    done: dict[tuple, list[SimResult]] = {}
    for block, name in sorted(jobs, key=lambda job: job[1] == "fcp"):
        bar.set_postfix_str(f"W={w} {name} B={block}")
        kw = dict(world_size=w, block_size=block, model=s.model, cluster=s.cluster, cp_size=s.cp_size,
                  stages=s.stages, fcp_options=s.fcp_options)
        try:
            results = [simulate_strategy(name, lens, tokens_per_rank=s.tokens_per_rank, **kw)
                       for lens in _ticking(batches, bar)]
        except NotApplicable as e:
            skipped.append({"strategy": name, "world_size": w, "block_size": block, "reason": str(e)})
            continue
        if name == "fcp" and not s.block_sizes:
            others = [r for (_, n), r in done.items() if n != "fcp"]
            results = at_equal_memory(results, others, batches, tokens_per_rank=s.tokens_per_rank, **kw)
        done[block, name] = results
    return {job: done[job] for job in jobs if job in done}


def _ticking(items, bar):
    for item in items:
        yield item
        bar.update(1)


def _trace_fcp(example: Example, lens, s: SimSettings) -> None:
    """Trace the fcp rank that finishes last in the example batch."""
    cand = build("fcp", lens, world_size=example.world_size, block_size=s.block_size,
                 tokens_per_rank=s.tokens_per_rank, stages=s.stages, fcp_options=s.fcp_options)[0]
    first = simulate(cand, s.model, s.cluster)
    example.trace_rank = int(np.argmax(first.rank_finish_s))
    example.trace = simulate(cand, s.model, s.cluster, trace_rank=example.trace_rank).trace


def speedups(rows: list[Row]) -> dict[tuple[int, str], float]:
    """fcp's attention MFU over each strategy's, per (world size, strategy)."""
    fcp = {(r.world_size, r.block_size): r.attention_mfu for r in rows if r.strategy == "fcp"}
    per_world = {w: v for (w, _), v in fcp.items() if sum(k[0] == w for k in fcp) == 1}  # a strategy's own block
    # (magi's chunk) may differ from fcp's: compare with fcp's row of that world size when there is one
    return {(r.world_size, r.strategy): fcp.get((r.world_size, r.block_size), per_world.get(r.world_size)) /
            r.attention_mfu for r in rows
            if ((r.world_size, r.block_size) in fcp or r.world_size in per_world) and r.attention_mfu > 0}
