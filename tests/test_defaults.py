"""One source for every default: the literal defaults of ``block_size`` and ``tokens_per_rank`` live in
``hf_fcp/plan/settings.py`` only (the plugin, collator, CLI and simulator read them from there), and the
recipes' own, smaller defaults in ``recipes/arguments.py`` only. Help text comes from field metadata."""

from __future__ import annotations

import ast
import dataclasses

from hf_fcp.testing.markers import ROOT

NAMES = {"block_size", "tokens_per_rank"}
FLAGS = {"--block-size", "--block_size", "--tokens-per-rank", "--tokens_per_rank"}


def _int(node) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _int_default(node) -> bool:
    """An int literal, or ``field(default=<int literal>)``."""
    return _int(node) or (isinstance(node, ast.Call) and any(k.arg == "default" and _int(k.value)
                                                              for k in node.keywords))


def default_literals(tree) -> list[int]:
    """Line numbers where ``tree`` gives block_size / tokens_per_rank a literal default."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            targets, value = [node.target.id], node.value
        elif isinstance(node, ast.Assign):
            targets, value = [t.id for t in node.targets if isinstance(t, ast.Name)], node.value
        else:
            targets, value = [], None
        if value is not None and _int_default(value) and any(
                t in NAMES or t.upper().endswith(("BLOCK_SIZE", "TOKENS_PER_RANK")) for t in targets):
            lines.append(node.lineno)
        if isinstance(node, ast.arguments):
            named = node.posonlyargs + node.args
            pairs = list(zip(named[len(named) - len(node.defaults):], node.defaults))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
            lines += [d.lineno for a, d in pairs if a.arg in NAMES and _int(d)]
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            first = node.args[0].value
            if first in FLAGS and any(k.arg == "default" and _int(k.value) for k in node.keywords):
                lines.append(node.lineno)  # add_argument("--block-size", default=4096)
            if first in NAMES and any(_int(a) for a in node.args[1:]):
                lines.append(node.lineno)  # _env("block_size", value, 4096, int)
        if isinstance(node, ast.List | ast.Tuple):  # ["--block_size", "512", ...] as parser defaults
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            lines += [node.lineno for a, b in zip(items, items[1:]) if a in FLAGS and str(b).isdigit()]
    return lines


def modules_with_default_literals(folder: str, skip: str = "//") -> dict[str, list[int]]:
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        if str(path.relative_to(ROOT)).startswith(skip):
            continue
        lines = default_literals(ast.parse(path.read_text()))
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    return found


def test_planner_defaults_are_written_once():
    # hf_fcp/testing builds tiny cases (blocks of 16 tokens) on purpose: it is the test harness, not a default
    assert list(modules_with_default_literals("hf_fcp", skip="hf_fcp/testing/")) == ["hf_fcp/plan/settings.py"]


def test_recipe_defaults_are_written_once():
    assert list(modules_with_default_literals("recipes")) == ["recipes/arguments.py"]


def test_the_scan_finds_each_kind_of_default():
    source = '''
block_size: int = 4096
tokens_per_rank: int = field(default=16384)
MY_TOKENS_PER_RANK = 8
def f(x, block_size=7): ...
p.add_argument("--block-size", default=9)
_env("tokens_per_rank", None, 3, int)
DEFAULTS = ["--block_size", "512"]
block_size = settings.block_size
'''
    assert default_literals(ast.parse(source)) == [2, 3, 4, 5, 6, 7, 8]


def test_help_comes_from_the_settings():
    from hf_fcp.integrations.accelerate import FCPPlugin
    from hf_fcp.plan.settings import BATCH_TOKENS_PER_RANK, PlanSettings, help_of

    meta = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(FCPPlugin)}
    assert f"default {PlanSettings.block_size}" in meta["block_size"]
    assert f"default {BATCH_TOKENS_PER_RANK}" in meta["tokens_per_rank"]
    assert help_of("block_size").endswith(f"(default {PlanSettings.block_size})")
    plugin = FCPPlugin()
    assert (plugin.block_size, plugin.tokens_per_rank) == (PlanSettings.block_size, BATCH_TOKENS_PER_RANK)
