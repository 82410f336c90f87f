"""``benchmarks/scale.py``: its ceiling column (ideal over the best other strategy: the most any plan can be
ahead of it) and ``--write``, which replaces the tables of the world sizes a run measured again and keeps
the others."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from hf_fcp.simulate import get_model, load_cluster, parse_distribution
from hf_fcp.simulate.engine import ideal_step_s, simulate_strategy
from hf_fcp.testing.markers import ROOT
from hf_fcp.workloads import make_batches


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload,tokens,world", [("stdlib", 2048, 4), ("lognormal", 4096, 3)])
def test_the_ceiling_is_the_ideal_over_the_best_other_and_bounds_fcp(scale, workload, tokens, world):
    cell = scale.measure(workload, "llama3-8b", tokens, world, steps=1, seed=1, strategies=("fcp", "ring", "magi"))
    model, cluster = get_model("llama3-8b"), load_cluster(scale.CLUSTER)
    lens = make_batches(parse_distribution(workload), world_size=world, tokens_per_rank=tokens, steps=1, seed=1)[0]
    best = simulate_strategy(cell.best_other, lens, world_size=world, block_size=4096, model=model, cluster=cluster,
                             cp_size="best", tokens_per_rank=tokens)
    assert cell.ceiling == pytest.approx(world * best.step_s / ideal_step_s(lens, model, cluster), rel=1e-9)
    assert cell.speedup == pytest.approx(cell.of_ideal * cell.ceiling, rel=1e-9)
    assert 1.0 <= cell.speedup <= cell.ceiling  # fcp never behind, never past the ideal
    assert f"| {cell.ceiling:.3f}× |" in scale.row(cell)


def _run(scale, worlds, tag):
    cells = [scale.Cell(workload="lognormal", model="llama3-8b", tokens=8192, world=w, speedup=1.0 + w / 1e4,
                        best_other="magi", best_cp=w, of_ideal=0.9, ceiling=1.2, exposed_ms=0.0, comm_imbalance=0.1,
                        plan_ms=1.0, seconds=0.0) for w in worlds]
    return scale.table(cells, f"python benchmarks/scale.py {tag}", 1)


def _block(scale, path):
    return path.read_text().split(scale.BEGIN)[1].split(scale.END)[0]


def test_write_replaces_the_runs_of_the_world_sizes_measured_again_and_keeps_the_others(scale, tmp_path):
    path = tmp_path / "performance.md"
    path.write_text("# Performance\n\nbefore\n\n" + scale.BEGIN + "\nold text\n" + scale.END + "\n\nafter\n")
    scale.write(_run(scale, (8, 16), "first"), path)  # text before the first run's table is replaced
    scale.write(_run(scale, (1024,), "big"), path)
    scale.write(_run(scale, (256,), "middle"), path)  # kept in order of world size
    scale.write(_run(scale, (8, 16), "again"), path)  # replaces "first" only
    block = _block(scale, path)
    assert "old text" not in block and "first" not in block
    order = [block.index(t) for t in ("again", "middle", "big")]
    assert order == sorted(order)
    assert path.read_text().startswith("# Performance\n\nbefore\n\n") and path.read_text().endswith("\n\nafter\n")
    assert scale._runs(block) == [_run(scale, w, t).strip() for w, t in (((8, 16), "again"), ((256,), "middle"),
                                                                          ((1024,), "big"))]
    scale.write(_run(scale, (256,), "extra"), path, append=True)  # --append replaces nothing
    assert "middle" in _block(scale, path) and "extra" in _block(scale, path)


def test_write_refuses_to_replace_part_of_an_earlier_run(scale, tmp_path):
    path = tmp_path / "performance.md"
    scale.write(_run(scale, (8, 16, 64), "grid"), path)
    before = path.read_text()
    for worlds in ((16,), (16, 1024)):
        with pytest.raises(ValueError, match=r"world sizes \[8, 16, 64\].*--world-sizes 8,16,64"):
            scale.check_write(worlds, path)
        with pytest.raises(ValueError, match="part of an earlier table"):
            scale.write(_run(scale, worlds, "part"), path)
    assert path.read_text() == before
    scale.check_write((8, 16, 64, 256), path)  # a superset replaces it
