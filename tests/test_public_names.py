"""Every public name the README has documented stays importable; a module that moved keeps its old name as a
deprecated alias of the new one (the same module object, with a DeprecationWarning)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import hf_fcp

DOCUMENTED = [  # every ``hf_fcp...`` name the README has named, from `git log -p -- README.md`
    "hf_fcp.plan_batch", "hf_fcp.PlanSettings", "hf_fcp.fcp_attention", "hf_fcp.FCPPlugin", "hf_fcp.FCPTrainer",
    "hf_fcp.FCPCollator", "hf_fcp.TokenBudgetSampler", "hf_fcp.PeerFailureError", "hf_fcp.PlanMismatchError",
    "hf_fcp.RankView", "hf_fcp.integrations.model_support.check_config",
    "hf_fcp.integrations.model_support.allow_classes", "hf_fcp.engine.comm.set_timeout", "hf_fcp.plan.cost.FLASH",
    "hf_fcp.plan.validate.check_plan", "hf_fcp.plan.validate.check_view", "hf_fcp.testing.run_workers",
    "hf_fcp.cost.FLASH", "hf_fcp.comm.set_timeout",
]
MOVED = {"hf_fcp.comm": "hf_fcp.engine.comm", "hf_fcp.cost": "hf_fcp.plan.cost"}


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documented_name_is_importable(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert _resolve(name) is not None


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
@pytest.mark.parametrize("how", ["import", "attribute"])
def test_moved_module_is_a_deprecated_alias(old, new, how):
    sys.modules.pop(old, None)
    hf_fcp.__dict__.pop(old.rpartition(".")[2], None)  # as in a fresh process
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old) if how == "import" else getattr(hf_fcp, old.rpartition(".")[2])
    assert module is importlib.import_module(new)
