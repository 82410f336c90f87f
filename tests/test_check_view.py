"""``check_view`` is exact and bounded in memory: the README's example plan checks in well under a GB (it
grew past 22 GB when every query's key list was materialised), and a view that loses, repeats or mixes keys
is caught."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from hf_fcp.plan import plan_batch
from hf_fcp.plan.validate import PlanError, check_view


def test_readme_example_is_bounded_in_memory():
    code = ("import resource, hf_fcp\nfrom hf_fcp.plan.validate import check_view\n"
            "plan = hf_fcp.plan_batch([120, 70000, 9, 3000], world_size=4)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "[check_view(plan, r) for r in range(4)]\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    grown_mb = int(run.stdout.split()[-1]) / 1024
    assert grown_mb < 1024, f"check_view grew the process by {grown_mb:.0f} MB"


class _Plan:
    """The plan with one rank's view replaced; everything else is the plan's."""

    def __init__(self, plan, view):
        self.plan, self.view = plan, view

    def for_rank(self, rank):
        return self.view

    def __getattr__(self, name):
        return getattr(self.plan, name)


def _with_local_keys(view, k_rows: torch.Tensor, cu_k: torch.Tensor):
    tasks = dataclasses.replace(view.local_tasks, k_rows=k_rows, cu_k=cu_k)
    return dataclasses.replace(view, local_tasks=tasks)


@pytest.mark.parametrize("broken", ["gap", "repeat", "other sequence"])
def test_broken_views_are_caught(broken):
    plan = plan_batch([40, 25], world_size=2, block_size=16)
    view = plan.for_rank(0)
    check_view(plan, 0)
    tasks = view.local_tasks
    k_rows, cu_k = tasks.k_rows.clone(), tasks.cu_k.clone()
    if broken == "gap":  # the first segment loses its first key
        k_rows = torch.cat([k_rows[1:cu_k[1]], k_rows[cu_k[1]:]])
        cu_k = torch.cat([cu_k[:1], cu_k[1:] - 1])
    elif broken == "repeat":  # a key twice
        k_rows = torch.cat([k_rows[:1], k_rows])
        cu_k = torch.cat([cu_k[:1], cu_k[1:] + 1])
    else:  # a key of the other sequence
        other = int(torch.nonzero(view.seq_index != view.seq_index[k_rows[0]])[0])
        k_rows[0] = other
    with pytest.raises(PlanError, match="rank 0: query row"):
        check_view(_Plan(plan, _with_local_keys(view, k_rows, cu_k)), 0)
