"""The package's architecture as tests: no import cycles, each layer imports only the layers below it, and
importing the package (or planning, or the command line) does not load transformers.

Layers, bottom up (README "Architecture"): ``plan`` (and ``workloads``) → ``engine`` → ``baselines`` /
``integrations``; ``simulate`` sits on ``plan``; ``testing`` and ``cli`` on top. Function-level imports
count as edges like module-level ones.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hf_fcp"

# layer -> the hf_fcp layers it may import (besides itself)
ALLOWED = {
    "plan": set(),
    "workloads": {"plan"},
    "engine": {"plan"},
    "baselines": {"plan", "engine"},
    "integrations": {"plan", "engine", "workloads"},
    "simulate": {"plan", "workloads"},
    "testing": {"plan", "engine", "baselines", "integrations", "workloads"},
    "cli": {"plan", "simulate", "workloads"},
    "__init__": {"integrations"},  # the registration hook; every other name loads lazily
}
THIRD_PARTY_BANNED = {"plan": {"torch.distributed", "transformers", "accelerate", "datasets"},
                      "workloads": {"torch", "transformers", "accelerate", "datasets"},
                      "simulate": {"torch", "transformers", "accelerate", "datasets"},
                      "engine": {"transformers", "accelerate", "datasets"}}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """Every module an import statement in ``path`` names (hf_fcp modules resolved, others as written)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(name, path, modules):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            is_parent_init = modules.get(target, path).name == "__init__.py" and name.startswith(target + ".")
            if target and target != name and not is_parent_init:
                edges.add(target)
        graph[name] = edges
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_the_layers_below():
    bad = []
    for module, targets in _graph().items():
        layer = _layer(module)
        for target in targets:
            other = _layer(target)
            if other != layer and other not in ALLOWED[layer]:
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_low_layers_stay_free_of_distributed_and_hf_libraries():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        banned = THIRD_PARTY_BANNED.get(_layer(name), set())
        for target in _imports(name, path, modules):
            if any(target == b or target.startswith(b + ".") for b in banned):
                bad.append(f"{name} imports {target}")
    assert not bad, bad


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_planning_and_the_cli_do_not_load_transformers_or_torch():
    out = _python("import sys, hf_fcp\n"
                  "plan = hf_fcp.plan_batch([120, 70000, 9, 3000], world_size=4)\n"
                  "plan.stats()\n"
                  "from hf_fcp.cli import build_parser\n"
                  "build_parser()\n"
                  "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    assert out == "[]", out


@pytest.mark.parametrize("first", ["hf_fcp", "transformers"])
def test_fcp_is_registered_whichever_is_imported_first(first):
    second = "transformers" if first == "hf_fcp" else "hf_fcp"
    out = _python(f"import {first}\nimport {second}\n"
                  "from transformers import AttentionInterface\n"
                  "from transformers.masking_utils import AttentionMaskInterface\n"
                  "from hf_fcp.integrations.transformers import fcp_attention_forward\n"
                  "print(AttentionInterface._global_mapping.get('fcp') is fcp_attention_forward,\n"
                  "      'fcp' in AttentionMaskInterface._global_mapping)")
    assert out == "True True", out
