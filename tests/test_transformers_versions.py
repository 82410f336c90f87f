"""Which transformers releases FCP has verified, and what the guard does with another one
(hf_fcp.integrations.verified_models, hf_fcp.integrations.model_support).

* the installed transformers has a model matrix of its own, and setup.cfg declares exactly the verified range;
* outside that range the guard says so once (versions and the command that verifies the release), keeps
  every verified family, trusts a class new in a verified modeling file, and still refuses token mixers
  and unverified families; inside it, an unlisted class is refused."""

from __future__ import annotations

import configparser
import dataclasses
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

from hf_fcp.integrations import model_support, verified_models
from hf_fcp.testing.families import build_model, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_installed_transformers_has_a_matrix_of_its_own():
    matrix = verified_models.current()
    assert matrix.in_range, (f"transformers {transformers.__version__} has no model matrix (verified: "
                             f"{matrix.verified}); run `{verified_models.REGENERATE}` and commit what it writes")
    assert verified_models.minor(matrix.transformers) == verified_models.minor(transformers.__version__)


def test_setup_cfg_declares_exactly_the_verified_range():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requirement = next(line.strip() for line in cfg["options"]["install_requires"].splitlines()
                       if line.strip().startswith("transformers"))
    versions = verified_models.verified_versions()
    major, minor = verified_models.minor(versions[-1])
    assert requirement == f"transformers>={versions[0]},<{major}.{minor + 1}", (
        f"setup.cfg says {requirement!r} but the verified matrices are {versions}; "
        f"`{verified_models.REGENERATE}` writes both")
    data = cfg["options.package_data"]["hf_fcp.integrations"]
    assert data == f"{verified_models.PACKAGE_DIR}/*.json"  # the matrices ship with the package


@pytest.mark.parametrize("installed, applied, in_range", [
    ("5.24.0", (5, 24), True), ("5.24.3", (5, 24), True), ("5.25.0.dev0", (5, 25), True),
    ("5.26.0", (5, 25), False), ("6.0.0", (5, 25), False), ("5.23.0", (5, 24), False)])
def test_matrix_for_a_release(installed, applied, in_range):
    matrix = verified_models.for_version(installed)
    assert verified_models.minor(matrix.transformers) == applied
    assert matrix.in_range is in_range and matrix.installed == installed
    assert "llama" in matrix.families and "falcon" not in matrix.families
    assert "transformers.models.llama.modeling_llama.LlamaRMSNorm" in matrix.classes


def _newer_release(version: str, *, drop: str) -> verified_models.Matrix:
    """The current matrix as applied to a release it was not generated on, missing class ``drop`` (as a class
    new in that release would be)."""
    matrix = verified_models.current()
    return dataclasses.replace(matrix, classes=matrix.classes - {drop}, installed=version)


NORM = "transformers.models.llama.modeling_llama.LlamaRMSNorm"


def test_a_class_new_in_a_verified_family_is_trusted_outside_the_range_with_one_warning():
    model = build_model("llama", "fcp")
    matrix = _newer_release("5.97.0", drop=NORM)
    with pytest.warns(UserWarning) as record:
        assert model_support.check_model(model, matrix=matrix).model == "LlamaForCausalLM"
    text = str(record[0].message)
    assert "transformers 5.97.0 is installed" in text and verified_models.REGENERATE in text
    assert matrix.describe_range() in text and f"transformers {matrix.transformers} model matrix" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: a second check is silent
        model_support.check_model(model, matrix=matrix)


def test_inside_the_range_an_unlisted_class_is_refused():
    model = build_model("llama", "fcp")
    matrix = _newer_release(transformers.__version__, drop=NORM)
    assert matrix.in_range
    with pytest.raises(ValueError, match=r"LlamaRMSNorm\) is not among the modules FCP has verified exact "
                                         rf"\(the model matrix, transformers {re.escape(matrix.transformers)}\)"):
        model_support.check_model(model, matrix=matrix)


class LlamaShortConv(torch.nn.Module):
    """A token mixer that a newer release might add to a verified family's modeling file."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 4, 3, groups=4)

    def forward(self, x):
        return x


LlamaShortConv.__module__ = "transformers.models.llama.modeling_llama"


def test_outside_the_range_token_mixers_and_unverified_families_stay_refused():
    matrix = _newer_release("5.98.0", drop=NORM)
    model = build_model("llama", "fcp")
    model.model.layers[0].mixer = LlamaShortConv()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="token mixing outside attention"):
        model_support.check_model(model, matrix=matrix)
    with pytest.raises(ValueError, match=r"model_type 'falcon'.*applied to the installed 5.98.0"):
        model_support.check_config(tiny_config("falcon"), matrix=matrix)
    outside = model_support.out_of_range_message(matrix)
    low, (major, minor) = matrix.verified[0], verified_models.minor(matrix.verified[-1])
    assert f"pip install 'transformers>={low},<{major}.{minor + 1}'" in outside


FORCED = """
import sys, warnings, torch, transformers
from hf_fcp.integrations.collator import FCPCollator
from hf_fcp.integrations.transformers import register
from hf_fcp.testing.families import build_model
from hf_fcp.testing.matrix import documents
register()
model = build_model("llama", "fcp")
# as if a user forced a release outside the declared range; set on the module object transformers holds
# after building a model (loading its modelling code replaces sys.modules["transformers"])
sys.modules["transformers"].__version__ = "5.99.0"
batch = FCPCollator(world_size=1, rank=0, block_size=8)(documents((9, 3)))
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], fcp_plan=batch["fcp_plan"],
          use_cache=False)
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], fcp_plan=batch["fcp_plan"],
          use_cache=False)
print("WARNINGS", sum("transformers 5.99.0 is installed" in str(w.message) for w in seen))
"""


def test_first_fcp_call_says_the_installed_release_is_outside_the_range():
    out = subprocess.run([sys.executable, "-c", FORCED], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "WARNINGS 1" in out.stdout, out.stdout + out.stderr[-2000:]
    assert verified_models.REGENERATE in out.stderr  # the log says it too, with the command
