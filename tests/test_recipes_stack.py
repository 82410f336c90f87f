"""The recipes as a newcomer runs them, under ``accelerate launch`` on 2 gloo processes:

* the FSDP2 config (``recipes/accelerate/fsdp2_cpu.yaml``): trains, checkpoints by default, and a run
  resumed from its step-2 checkpoint ends with exactly the weights of the uninterrupted run;
* ``--bf16 true --activation_checkpointing true`` with FSDP2, continuing that run with
  ``--resume_from_checkpoint last``;
* a bad argument: one line from one rank, and the launcher's failure summary names it (error file);
* in one process: a non-empty ``--output_dir`` is refused without ``--overwrite_output_dir true``;
  ``--help`` documents every FCP flag and shows the recipe's own defaults.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--max_documents", "30", "--tokens_per_rank", "512", "--block_size", "128", "--hidden_size", "32",
        "--num_layers", "2", "--logging_steps", "1", "--save_steps", "2"]


def launch(config: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = ["accelerate", "launch", "--config_file", f"recipes/accelerate/{config}", "--main_process_port", "0",
           "recipes/pretrain.py", *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    run = launch("fsdp2_cpu.yaml", "--max_steps", "4", "--output_dir", str(out))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return out, run.stdout + run.stderr


def test_fsdp2_recipe_trains_and_checkpoints(fsdp_run):
    out, log = fsdp_run
    assert "terminate called" not in log and "find_unused_parameters" not in log
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    for step in (2, 4):  # checkpoints by default: the README's resume works on a default run
        assert (out / f"checkpoint-{step}" / "pytorch_model_fsdp.bin").is_file()  # FSDP wrote them
    summary = log.split("summary:")[-1]
    assert "'fcp/comm_MB'" in log and "summary: steps 4" in log and "None" not in summary
    assert "mixed_precision no" in summary and "activation_checkpointing False" in summary  # the defaults ran


def test_fsdp2_resume_is_exact(fsdp_run, tmp_path):
    out, _ = fsdp_run
    resumed = tmp_path / "resumed"
    run = launch("fsdp2_cpu.yaml", "--max_steps", "4", "--output_dir", str(resumed),
                 "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    want, got = weights(out), weights(resumed)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_bf16_checkpointing_resume_last(fsdp_run):
    out, _ = fsdp_run
    run = launch("fsdp2_cpu.yaml", "--max_steps", "6", "--output_dir", str(out), "--resume_from_checkpoint", "last",
                 "--bf16", "true", "--activation_checkpointing", "true")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)
    summary = log.split("summary:")[-1]  # what the trainer ran with: bf16 autocast and checkpointed layers
    assert "mixed_precision bf16" in summary and "activation_checkpointing True" in summary, summary[:400]


def test_bad_argument_is_reported_once(tmp_path):
    run = launch("cpu.yaml", "--max_steps", "0", "--output_dir", str(tmp_path / "out"), timeout=120)
    line = "pretrain.py: error: --max_steps: got 0"
    assert run.returncode != 0
    printed = [x for x in run.stderr.splitlines() if x.startswith(line)]
    assert len(printed) == 1, run.stderr[-3000:]  # one rank reports it
    summary = run.stderr.split("Root Cause")[-1]
    assert f"traceback : {line}" in summary, run.stderr[-3000:]  # the launcher names the cause
    assert "<NO_OTHER_FAILURES>" in run.stderr  # the other rank left quietly


def run_recipe(monkeypatch, capsys, recipes, *argv: str) -> tuple[int, str]:
    common, pretrain = recipes.common, recipes.pretrain

    monkeypatch.setattr(sys, "argv", ["pretrain.py", *argv])
    try:
        common.cli(pretrain.main)
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def test_non_empty_output_dir_is_refused(tmp_path, monkeypatch, capsys, recipes):
    (tmp_path / "config.json").write_text("{}")
    code, err = run_recipe(monkeypatch, capsys, recipes, "--output_dir", str(tmp_path), "--max_steps", "1")
    assert code == 2 and "--output_dir: got" in err and "--overwrite_output_dir true" in err, err
    assert (tmp_path / "config.json").read_text() == "{}"
    code, err = run_recipe(monkeypatch, capsys, recipes, "--output_dir", str(tmp_path), "--overwrite_output_dir",
                           "true", *TINY, "--max_documents", "3", "--max_steps", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


def test_help_shows_fcp_flags_and_recipe_defaults():
    run = subprocess.run([sys.executable, "recipes/pretrain.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    fcp = text.split("FCP (flexible context parallelism")[1].split("run:")[0]
    for flag in ("--block_size", "--tokens_per_rank", "--kernel", "--overlap", "--long_sequence_policy"):
        after = fcp.split(flag)[1][:300]
        assert "FCP_" in after, (flag, after)  # help text, naming the environment variable
    assert "This recipe: 512." in fcp and "This recipe: 2048." in fcp and "None" not in fcp
    for flag, default in (("--max_steps", "150"), ("--learning_rate", "3e-3"), ("--save_strategy", "steps"),
                          ("--output_dir", "outputs/pretrain")):
        assert f"(default: {default})" in text.split(flag + " ")[1][:800], flag
