"""Executes notebooks/what_if.ipynb end to end on small sizes (the what-if report a user would run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "what_if.ipynb"


def test_what_if_notebook_executes():
    for module in ("nbformat", "nbclient", "ipykernel", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install hf-fcp[notebooks]); the notebook cannot run")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(NOTEBOOK.parent)}}
    NotebookClient(nb, timeout=120, kernel_name="python3", resources=resources).execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in code]
    assert "fcp speedup" in outputs[1]  # the comparison table
    assert sum(1 for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})) >= 4
    assert "of best" in outputs[4]  # the block-size sweep table
