"""Fixtures shared by the test files. Helpers (references, spawned process groups, tiny models and batches)
live in :mod:`hf_fcp.testing`; no test file imports another."""

from __future__ import annotations

import importlib
import types

import numpy as np
import pytest

from hf_fcp.testing.markers import ROOT


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator: the same draws on every run."""
    return np.random.default_rng(0)


@pytest.fixture
def recipes(monkeypatch) -> types.SimpleNamespace:
    """The recipe scripts as modules (``recipes.common``, ``.pretrain``, ``.finetune``, ``.arguments``).
    recipes/ is a folder of scripts that import each other by name, as ``python recipes/pretrain.py`` runs
    them; the folder is on the import path for this test only."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    names = ("arguments", "common", "pretrain", "finetune")
    return types.SimpleNamespace(**{name: importlib.import_module(name) for name in names})


def pytest_report_header(config) -> str:
    """The versions this run tested (what pip resolved), at the top of every run's output."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    names = ("torch", "transformers", "accelerate", "datasets", "trl", "peft")
    return "hf_fcp against: " + ", ".join(f"{n} {installed(n)}" for n in names)
