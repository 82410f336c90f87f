"""``hf-fcp simulate``: what FCP buys on a length distribution at 8–1024 GPUs, and which block size to pick.

    hf-fcp simulate (--lengths FILE | --distribution lognormal[:mu,sigma,max] | paper | light | bimodal | stdlib)
        --world-sizes 16,64,256 --tokens-per-rank 32768 [--block-size B | --sweep-block-size [LIST]]
        [--model llama3-70b|llama3-8b|...] [--cluster h200|h100|FILE] [--steps N] [--json] [--plot DIR]
        [--strategies fcp,ring,...] [--cp-size best|min|N] [--stages N] [--fcp-option K=V] [--seed S]

``--json`` prints ``{"rows": [{"strategy", "world_size", "attention_mfu", "step_ms", "compute_imbalance",
"comm_imbalance", "comm_bytes", "exposed_comm_ms", "plan_ms", ...}], "not_applicable": [...]}``; the
default output is a table with fcp's speedup over each strategy. Bad input: one line, exit status 2.
``hf_fcp.cli`` wires this in with :func:`add_simulate_parser` and :func:`run_simulate`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..plan.checks import check_int
from ..plan.settings import help_of
from ..workloads import parse_distribution
from .cluster import load_cluster
from .models import MODELS, get_model
from .runner import SWEEP_BLOCK_SIZES, Report, SimSettings, run, speedups
from .strategies import STAGES, STRATEGY_NAMES


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(check_int("value", int(x)) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        return check_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def _cp_size(text: str) -> str | int:
    return text if text in ("min", "best") else _positive(text)


def _strategy_list(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in STRATEGY_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(STRATEGY_NAMES)}, got {text!r}")
    return names


def _option(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a planner option such as locality=1.0), got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, value


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "simulate", help="simulate strategies at scale on a length distribution (attention MFU, balance, comm)",
        description="Simulate one attention layer (forward + backward) of fcp and the baselines on a modelled "
                    "GPU cluster, driven by the real planner's plans.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--lengths", metavar="FILE", help="sequence lengths to sample from (JSON list or one per line)")
    src.add_argument("--distribution", metavar="SPEC", default="lognormal",
                     help="lognormal[:mu,sigma,max] (default: 6.35,2.34,2M), paper (tails to 512K), light (sigma 1.5), "
                          "bimodal[:p_long], stdlib (this machine's Python stdlib files)")
    p.add_argument("--world-sizes", type=_int_list, default=(16, 64, 256), metavar="LIST", help="default 16,64,256")
    p.add_argument("--tokens-per-rank", type=_positive, default=SimSettings.tokens_per_rank, metavar="T",
                   help=f"default {SimSettings.tokens_per_rank}")
    blk = p.add_mutually_exclusive_group()
    blk.add_argument("--block-size", type=_positive, default=SimSettings.block_size, metavar="B",
                     help=help_of("block_size"))
    blk.add_argument("--sweep-block-size", type=_int_list, nargs="?", const=SWEEP_BLOCK_SIZES, default=None,
                     metavar="LIST", help="sweep fcp's block size (default 512,...,32768) instead of comparing")
    p.add_argument("--model", default="llama3-70b", choices=sorted(MODELS), help="attention shape (default llama3-70b)")
    p.add_argument("--cluster", default="h200", metavar="h200|h100|FILE",
                   help="cluster preset or JSON overrides (default h200: the attention kernel measured on an H200, "
                        "the preset of the README's tables; h100: FlashAttention-3's published curve)")
    p.add_argument("--steps", type=_positive, default=3, metavar="N", help="batches per world size (default 3)")
    p.add_argument("--strategies", type=_strategy_list, default=STRATEGY_NAMES, metavar="LIST",
                   help=f"default {','.join(STRATEGY_NAMES)}")
    p.add_argument("--cp-size", type=_cp_size, default="best", metavar="best|min|N",
                   help="CP group of ring/allgather/wlb/magi: the fastest per batch (best, default), the smallest "
                        "holding the longest sequence (min) or N")
    p.add_argument("--stages", type=int, default=STAGES, metavar="N",
                   help="communication stages of fcp and magi, at most: each plan runs in N, N/2 or N/4 stages, "
                        f"whichever its timeline finds fastest (0 = one per round; default {STAGES})")
    p.add_argument("--fcp-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="fcp planner option (hf_fcp.PlanSettings), e.g. locality=1.0; repeatable")
    p.add_argument("--seed", type=int, default=0, help="batch seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="DIR", help="write PNG figures into DIR")
    return p


def settings_from_args(args) -> SimSettings:
    """Validated :class:`SimSettings` from parsed arguments (raises ValueError naming the bad value)."""
    dist = parse_distribution(f"file:{args.lengths}" if args.lengths else args.distribution)
    return SimSettings(distribution=dist, model=get_model(args.model), cluster=load_cluster(args.cluster),
                       world_sizes=tuple(args.world_sizes), tokens_per_rank=args.tokens_per_rank,
                       block_size=args.block_size, block_sizes=tuple(args.sweep_block_size or ()),
                       strategies=tuple(args.strategies), steps=args.steps, seed=args.seed, cp_size=args.cp_size,
                       stages=args.stages, fcp_options=dict(args.fcp_option))


def run_simulate(args) -> int:
    """Run ``hf-fcp simulate``; returns the exit status (2 with a one-line message on bad input)."""
    try:
        settings = settings_from_args(args)
        report = run(settings, progress=None)
        if args.plot:
            from .plots import write_plots

            paths = write_plots(report, args.plot)
        print(json.dumps(report.to_json()) if args.json else format_report(report))
        if args.plot and not args.json:
            print("figures: " + ", ".join(str(p) for p in paths))
    except (ValueError, OSError) as e:
        print(f"hf-fcp: error: {e}", file=sys.stderr)
        return 2
    return 0


def format_report(report: Report) -> str:
    """The comparison table (fcp's speedup per strategy) or, for a block sweep, the sweep table."""
    s = report.settings
    head = (f"{s.distribution.name} on {s.cluster.name} · {s.model.name} · {s.tokens_per_rank} tokens/rank · "
            f"{s.steps} step(s) · cp size {s.cp_size} · {f'at most {s.stages}' if s.stages else 'per-round'} stages")
    lines = [head, ""]
    if s.block_sizes:
        lines += _sweep_table(report)
    else:
        lines += _compare_table(report)
    for na in report.not_applicable:
        lines.append(f"not applicable: {na['strategy']} at {na['world_size']} ranks: {na['reason']}")
    return "\n".join(lines)


def _compare_table(report: Report) -> list[str]:
    up = speedups(report.rows)
    out = [f"{'ranks':>5}  {'strategy':<10}{'cp':>4}{'attn MFU':>10}{'of ideal':>10}{'step ms':>10}{'comp imb':>10}"
           f"{'comm imb':>10}{'comm GB':>10}{'exposed ms':>12}{'plan ms':>9}{'fcp speedup':>13}"]
    for r in report.rows:
        sp = up.get((r.world_size, r.strategy))
        out.append(f"{r.world_size:>5}  {r.strategy:<10}{r.cp_size:>4}{r.attention_mfu:>10.1%}{r.of_ideal:>10.1%}"
                   f"{r.step_ms:>10.1f}{r.compute_imbalance:>10.1%}{r.comm_imbalance:>10.1%}{r.comm_bytes / 1e9:>10.1f}"
                   f"{r.exposed_comm_ms:>12.1f}{r.plan_ms:>9.1f}{(f'{sp:.2f}x' if sp else '-'):>13}")
    return out


def _sweep_table(report: Report) -> list[str]:
    best = {}
    for r in report.rows:
        best[r.world_size] = max(best.get(r.world_size, 0.0), r.attention_mfu)
    out = [f"{'ranks':>5}{'block':>7}{'attn MFU':>10}{'of best':>9}{'kernel eff':>12}{'comm GB':>10}"
           f"{'exposed ms':>12}{'comp imb':>10}{'plan ms':>9}"]
    for r in report.rows:
        out.append(f"{r.world_size:>5}{r.block_size:>7}{r.attention_mfu:>10.1%}"
                   f"{r.attention_mfu / best[r.world_size]:>9.1%}"
                   f"{r.kernel_efficiency:>12.1%}{r.comm_bytes / 1e9:>10.1f}{r.exposed_comm_ms:>12.1f}"
                   f"{r.compute_imbalance:>10.1%}{r.plan_ms:>9.1f}")
    return out
