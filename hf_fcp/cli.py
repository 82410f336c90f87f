"""``hf-fcp`` command line: ``plan`` (plan one batch and show it) and ``simulate`` (what-if at scale).

Bad input prints one line ``hf-fcp: error: ...`` naming the value and what is allowed, and exits with
status 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import sys

from .plan.settings import STRATEGIES, PlanSettings, help_of


class CLIError(ValueError):
    """A user error: printed as one line, exit status 2."""


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="plan one global batch and print its balance and communication",
                       description="Plan one global batch: placement of every sequence's blocks over the "
                                   "ranks and the congestion-free P2P rounds.")
    p.add_argument("--lengths", required=True, metavar="FILE",
                   help="sequence lengths: a JSON list of integers or one integer per line")
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="number of ranks")
    defaults = PlanSettings()  # every default is the planner's own
    p.add_argument("--block-size", type=int, default=defaults.block_size, metavar="B", help=help_of("block_size"))
    p.add_argument("--tokens-per-rank", type=int, default=defaults.tokens_per_rank, metavar="T",
                   help=help_of("tokens_per_rank", "None"))
    p.add_argument("--strategy", default=defaults.strategy, choices=STRATEGIES, help=help_of("strategy"))
    p.add_argument("--rounds-per-stage", type=int, default=defaults.rounds_per_stage, metavar="K",
                   help=help_of("rounds_per_stage"))
    p.add_argument("--kv-heads", type=int, default=defaults.kv_heads, help=help_of("kv_heads"))
    p.add_argument("--head-dim", type=int, default=defaults.head_dim, help=help_of("head_dim"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--assignment", action="store_true",
                   help="with --json: add 'ranks', each rank's [seq_index, start, end] spans in local order")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(plan) -> str:
    loads = plan.rank_loads()
    share = loads["cost"] / max(loads["cost"].sum(), 1.0)
    per_tok = plan.settings.kv_bytes_per_token
    rows = [f"{'rank':>5} {'tokens':>10} {'spans':>6} {'attn share':>11} {'KV in':>11} {'KV out':>11}"]
    for r in range(plan.world_size):
        rows.append(f"{r:>5} {loads['tokens'][r]:>10} {loads['spans'][r]:>6} {share[r]:>10.2%} "
                    f"{_human_bytes(loads['kv_in'][r] * per_tok):>11} {_human_bytes(loads['kv_out'][r] * per_tok):>11}")
    st = plan.stats()
    rows.append("")
    rows.append(f"strategy {plan.strategy}: {plan.num_tokens} tokens in {len(plan.seq_lens)} sequences, "
                f"world size {plan.world_size}, block {plan.block_size}, cap {plan.tokens_per_rank} tokens/rank")
    rows.append(f"compute imbalance {st['compute_imbalance']:.2%}, memory imbalance {st['memory_imbalance']:.2%}, "
                f"KV moved {_human_bytes(st['comm_bytes'])} (max per rank {_human_bytes(st['max_rank_comm_bytes'])}), "
                f"{st['rounds']} rounds, planned in {st['plan_ms']:.1f} ms")
    return "\n".join(rows)


def run_plan(args) -> int:
    from .plan import plan_batch
    from .workloads import read_lengths

    try:
        lengths = read_lengths(args.lengths)
    except ValueError as err:
        raise CLIError(f"--lengths: {err}") from None
    plan = plan_batch(lengths, world_size=args.world_size, block_size=args.block_size,
                      tokens_per_rank=args.tokens_per_rank, strategy=args.strategy,
                      rounds_per_stage=args.rounds_per_stage, kv_heads=args.kv_heads, head_dim=args.head_dim)
    if args.json:
        print(json.dumps(plan.to_dict(assignment=args.assignment), default=_json_default))
    else:
        if args.assignment:
            raise CLIError("--assignment needs --json (the table shows per-rank totals only)")
        print(_table(plan))
    return 0


def _json_default(o):
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-fcp", description="Flexible context parallelism for Hugging Face training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _plan_parser(sub)
    from .simulate.cli import add_simulate_parser

    add_simulate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            return run_plan(args)
        from .simulate.cli import run_simulate

        return run_simulate(args)
    except (CLIError, ValueError) as e:
        print(f"hf-fcp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-fcp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `hf-fcp plan ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
