"""Bad input catalogue: each row is (entry point, bad input, words the message must contain: what was wrong
and what is allowed). Entry points already catalogued elsewhere are referenced, not repeated:

* plan_batch / PlanOptions: tests/test_planning.py            * CLI ``hf-fcp plan``: tests/test_cli.py
* fcp_attention / kernels: tests/test_attention.py, test_kernels.py (plan mismatch: test_attention_dist.py)
* FCPCollator: tests/test_collator.py                         * TokenBudgetSampler: tests/test_sampler.py
* model forward with a plan: tests/test_integration_model.py  * FCPTrainer args: test_integration_trainer.py

Added here: the FCP timeout (FCPPlugin(timeout_s=...), FCP_TIMEOUT_S, comm.set_timeout) and the plugin
settings and environment variables not checked elsewhere; ``hf-fcp simulate`` arguments.
"""

from __future__ import annotations

import pytest

from hf_fcp import comm
from hf_fcp.integrations.accelerate import FCPPlugin


@pytest.mark.parametrize("kwargs, env, words", [
    (dict(timeout_s=0), {}, ["timeout_s: got 0", "positive finite number of seconds"]),
    (dict(timeout_s=float("inf")), {}, ["timeout_s: got inf", "positive finite"]),
    (dict(timeout_s="30"), {}, ["timeout_s: got '30'", "number of seconds"]),
    ({}, {"FCP_TIMEOUT_S": "soon"}, ["FCP_TIMEOUT_S: got 'soon'", "positive finite number of seconds"]),
    ({}, {"FCP_TIMEOUT_S": "-5"}, ["FCP_TIMEOUT_S: got -5.0", "positive"]),
    (dict(block_size=0), {}, ["block_size", ">= 1", "got 0"]),
    (dict(tokens_per_rank=2.5), {}, ["tokens_per_rank", "positive integer", "2.5"]),
    (dict(kernel="cuda"), {}, ["kernel: got 'cuda'", "torch_cpu"]),
    (dict(strategy="zigzag"), {}, ["strategy: got 'zigzag'", "'fcp'", "'ring'"]),
    ({}, {"FCP_OVERLAP": "maybe"}, ["FCP_OVERLAP: got 'maybe'", "'true'", "'false'"]),
    ({}, {"FCP_KERNEL": "triton"}, ["kernel: got 'triton'", "flash_attn"]),
    ({}, {"FCP_TOKENS_PER_RANK": "-1"}, ["tokens_per_rank", ">= 1", "-1"]),
])
def test_plugin_settings(monkeypatch, kwargs, env, words):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError) as info:
        FCPPlugin(**kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize("value, words", [
    (0, ["timeout: got 0", "positive finite number of seconds"]),
    (True, ["timeout: got True"]),
    ("5", ["timeout: got '5'"]),
])
def test_comm_set_timeout(value, words):
    with pytest.raises(ValueError) as info:
        comm.set_timeout(value)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert comm.get_timeout() == comm.DEFAULT_TIMEOUT_S  # a rejected value changes nothing


def test_timeout_precedence(monkeypatch):
    monkeypatch.setenv("FCP_TIMEOUT_S", "12.5")
    assert comm.get_timeout() == 12.5
    comm.set_timeout(3)
    try:
        assert comm.get_timeout() == 3.0
    finally:
        comm.set_timeout(None)
    monkeypatch.delenv("FCP_TIMEOUT_S")
    assert comm.get_timeout() == comm.DEFAULT_TIMEOUT_S


@pytest.mark.parametrize("args, words", [
    (["simulate", "--world-sizes", "0"], ["--world-sizes", "positive integers", "'0'"]),
    (["simulate", "--world-sizes", "2,x"], ["--world-sizes", "positive integers"]),
    (["plan", "--world-size", "2"], ["required", "--lengths"]),
])
def test_cli_one_line_exit_2(capsys, args, words):
    from hf_fcp.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "Traceback" not in err and all(w in err for w in words), err
