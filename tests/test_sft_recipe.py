"""recipes/sft.py as users run it: ``accelerate launch`` on 2 gloo processes with the embedded default and a
LoRA adapter (a few steps): the loss falls, checkpoints and the adapter are written, ``--resume_from_checkpoint
last`` continues the run; a bad argument is one line from one rank."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--max_documents", "120", "--hidden_size", "32", "--num_layers", "2", "--tokens_per_rank", "512",
         "--block_size", "64", "--logging_steps", "1", "--save_steps", "3", "--learning_rate", "1e-2",
         "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"]


def launch(*flags: str) -> subprocess.CompletedProcess:
    cmd = ["accelerate", "launch", "--config_file", "recipes/accelerate/cpu.yaml", "--main_process_port", "0",
           "recipes/sft.py", *flags]
    return subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


def test_train_then_resume(tmp_path):
    out = tmp_path / "sft"
    first = launch(*SMALL, "--max_steps", "6", "--output_dir", str(out))
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    assert "world_size=2" in log and "LlamaForCausalLM + LoRA" in log and "terminate called" not in log
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses  # the loss falls
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-3" / "adapter_model.safetensors").is_file()

    resumed = launch(*SMALL, "--max_steps", "8", "--output_dir", str(out), "--resume_from_checkpoint", "last")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert "summary: steps 8" in log and log.count("{'loss': ") == 2, log[-4000:]  # steps 7 and 8 only
    history = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == list(range(1, 9)), steps  # 6 steps carried over from checkpoint-6, then 7 and 8


def test_bad_argument_is_one_line(tmp_path):
    run = launch("--lora_r", "0", "--output_dir", str(tmp_path / "bad"))
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("sft.py: error:")]
    assert run.returncode != 0 and lines == ["sft.py: error: --lora_r: got 0, expected a positive integer (>= 1)"]


@pytest.mark.parametrize("argv, words", [
    (["--lora_dropout", "1.5"], "--lora_dropout: got 1.5, expected a number in [0, 1)"),
    (["--max_length", "5000", "--tokens_per_rank", "1024"], "--max_length: got 5000, expected at most world_size"),
    (["--dataset_config_name", "x"], "--dataset_config_name: got 'x' without --dataset_name"),
])
def test_bad_sft_arguments(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import common
    import sft

    monkeypatch.setattr("sys.argv", ["sft.py", "--output_dir", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as stop:
        common.cli(sft.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith(f"sft.py: error: {words}"), err
    assert not (tmp_path / "out").exists()
