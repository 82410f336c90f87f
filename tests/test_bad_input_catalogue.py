"""Bad input catalogue: each row is (entry point, bad input, words the message must contain: what was wrong
and what is allowed). Entry points already catalogued elsewhere are referenced, not repeated:

* plan_batch / PlanSettings: tests/test_planning.py            * CLI ``hf-fcp plan``: tests/test_cli.py
* fcp_attention / kernels: tests/test_attention.py, test_kernels.py (plan mismatch: test_attention_dist.py)
* FCPCollator: tests/test_collator.py                         * TokenBudgetSampler: tests/test_sampler.py
* model forward with a plan: tests/test_integration_model.py  * FCPTrainer args: test_integration_trainer.py

Added here: the FCP timeout (FCPPlugin(timeout_s=...), FCP_TIMEOUT_S, comm.set_timeout) and the plugin
settings and environment variables not checked elsewhere; ``hf-fcp simulate`` arguments; every argument
of recipes/pretrain.py and recipes/finetune.py (run in-process through the recipes' own ``cli`` wrapper,
one row also as the real script): exit status 2, one ``<script>: error:`` line, no traceback, nothing
trained or saved.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from hf_fcp.engine import comm
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
    (dict(balance="flops"), {}, ["balance: got 'flops'", "'kernel'", "'pairs'"]),
    ({}, {"FCP_BALANCE": "time"}, ["balance: got 'time'", "'pairs'"]),
    (dict(kernel_cost="/no/such.json"), {}, ["kernel_cost", "cannot read calibration file", "/no/such.json"]),
    (dict(kernel_cost="setup.cfg"), {}, ["kernel_cost", "not JSON"]),
    (dict(kernel_cost="docs/measurements/h200_replay.json"), {}, ["lacks numeric field", "calibrate_attention.py"]),
])
def test_plugin_settings(monkeypatch, kwargs, env, words):
    monkeypatch.chdir(pathlib.Path(__file__).resolve().parent.parent)  # the file rows name repository files
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError) as info:
        FCPPlugin(**kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_plugin_passes_a_calibrated_kernel_to_the_planner(monkeypatch):
    from hf_fcp.simulate.cluster import load_cluster

    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "measurements" / "h200_torch_flash.json"
    monkeypatch.setenv("FCP_KERNEL_COST", str(path))
    collator = FCPPlugin(balance="kernel").collator()
    assert collator.settings.kernel_cost == load_cluster(str(path)).kernel_cost()
    assert FCPPlugin(balance="pairs").collator().settings.balance == "pairs"


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


# ----------------------------------------------------------------------------- recipe arguments
RECIPES = pathlib.Path(__file__).resolve().parents[1] / "recipes"
TINY = ["--max_documents", "3", "--hidden_size", "32", "--num_layers", "1", "--max_steps", "1"]
SHARED_ROWS = [  # (argv, environment, words)
    (["--block_size", "0"], {}, ["block_size", ">= 1", "got 0"]),
    (["--tokens_per_rank", "-5"], {}, ["tokens_per_rank", ">= 1", "got -5"]),
    (["--kernel", "cuda"], {}, ["kernel: got 'cuda'", "torch_cpu"]),
    (["--kernel", "flash_attn"], {}, ["flash_attn", "torch_cpu"]),
    (["--long_sequence_policy", "drop"], {}, ["long_sequence_policy: got 'drop'", "'split'"]),
    (["--strategy", "zigzag"], {}, ["strategy: got 'zigzag'", "'fcp'"]),
    ([], {"FCP_BLOCK_SIZE": "big"}, ["FCP_BLOCK_SIZE: got 'big'"]),
    (["--model_type", "gpt2"], {}, ["--model_type: got 'gpt2'", "'llama'"]),
    (["--hidden_size", "0"], {}, ["--hidden_size: got 0", ">= 1"]),
    (["--num_layers", "-1"], {}, ["--num_layers: got -1", ">= 1"]),
    (["--num_heads", "0"], {}, ["--num_heads: got 0", ">= 1"]),
    (["--num_kv_heads", "3"], {}, ["--num_kv_heads: got 3", "divisor of --num_heads=4"]),
    (["--hidden_size", "36"], {}, ["--hidden_size: got 36", "multiple of 2 × --num_heads = 8"]),
    (["--model_name_or_path", "/nonexistent/model"], {}, ["--model_name_or_path: got '/nonexistent/model'",
                                                         "does not exist", "Hub model id"]),
    (["--model_name_or_path", "{tmp}"], {}, ["--model_name_or_path", "without config.json", "saved model"]),
    (["--dataset_name", "/nonexistent/data"], {}, ["--dataset_name: got '/nonexistent/data'", "Hub dataset id"]),
    (["--dataset_config_name", "raw"], {}, ["--dataset_config_name: got 'raw' without --dataset_name"]),
    (["--max_documents", "-1"], {}, ["--max_documents: got -1", ">= 0"]),
    (["--max_steps", "0"], {}, ["--max_steps: got 0", "positive number of steps"]),
    (["--learning_rate", "-0.1"], {}, ["--learning_rate: got -0.1", "positive"]),
    (["--gradient_accumulation_steps", "0"], {}, ["--gradient_accumulation_steps: got 0", ">= 1"]),
    (["--save_strategy", "steps", "--save_steps", "0"], {}, ["--save_steps: got 0", "positive"]),
    (["--logging_steps", "0"], {}, ["--logging_steps", "non-zero"]),
    (["--warmup_steps", "-3"], {}, ["warmup_steps = -3", ">= 0"]),
    (["--label_smoothing_factor", "0.1"], {}, ["--label_smoothing_factor: got 0.1", "expected 0"]),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], {}, ["--resume_from_checkpoint: got '/nonexistent/ckpt'",
                                                             "trainer_state.json", "'last'"]),
    (["--resume_from_checkpoint", "last"], {}, ["--resume_from_checkpoint: got 'last'", "no checkpoint-<step>"]),
    (["--output_dir", "{tmp}/file"], {}, ["--output_dir", "an existing file", "expected a directory"]),
    (["--bogus", "1"], {}, ["got unknown ['--bogus', '1']", "--help"]),
    (["--block_size", "big"], {}, ["argument --block_size", "invalid int value: 'big'"]),
    ([], {"WORLD_SIZE": "2", "RANK": "2"}, ["WORLD_SIZE: got 2 with RANK=2", "0 <= RANK < WORLD_SIZE"]),
    ([], {"WORLD_SIZE": "two"}, ["WORLD_SIZE: got 'two'", "non-negative integer"]),
]
PRETRAIN_ROWS = [(["--text_column", "body"], {}, ["--text_column: got 'body'", "['text', 'path']"])]
FINETUNE_ROWS = [
    (["--max_length", "5000"], {}, ["--max_length: got 5000", "at most world_size × --tokens_per_rank = 1 × 2048"]),
    (["--max_length", "0"], {}, ["--max_length: got 0", ">= 1"]),
    (["--max_examples", "0"], {}, ["--max_examples: got 0", ">= 1"]),
    (["--max_length", "2"], {}, ["got 0 examples after filtering", "--max_length"]),
]
ROWS = ([("pretrain", *row) for row in SHARED_ROWS + PRETRAIN_ROWS] +
        [("finetune", *row) for row in SHARED_ROWS[:2] + SHARED_ROWS[7:9] + FINETUNE_ROWS])


@pytest.mark.parametrize("recipe, argv, env, words", ROWS, ids=[f"{r[0]}:{' '.join(r[1]) or r[2]}" for r in ROWS])
def test_recipe_arguments(tmp_path, monkeypatch, capsys, recipes, recipe, argv, env, words):  # noqa: PLR0913
    common = recipes.common
    module = getattr(recipes, recipe)
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py", *TINY, "--output_dir", str(out), *argv])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as info:
        common.cli(module.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err, err
    assert err[-1].startswith(f"{recipe}.py: error: ") and "Traceback" not in "\n".join(err), err
    assert all(w in err[-1] for w in words), f"{words} not all in: {err[-1]}"
    assert not out.exists() or not any(out.iterdir()), f"saved {list(out.iterdir())} before rejecting its arguments"


def test_recipe_script_prints_one_line(tmp_path):
    """The real script: a bad argument gives one line on stderr, exit status 2, no traceback."""
    run = subprocess.run([sys.executable, str(RECIPES / "pretrain.py"), "--tokens_per_rank", "0", "--output_dir",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.strip().splitlines()[-1] == (
        "pretrain.py: error: tokens_per_rank: got 0, expected a positive integer (>= 1) or None"), run.stderr
    assert not (tmp_path / "out").exists()
