"""The recipes and the notebook as users run them: the README main job under ``accelerate launch`` on 2
gloo processes (few steps), SFT prompt masking in recipes/finetune.py, notebooks/train_tiny.ipynb."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_main_job_two_processes(tmp_path):
    out = tmp_path / "pretrain"
    cmd = ["accelerate", "launch", "--config_file", "recipes/accelerate/cpu.yaml", "--main_process_port", "0",
           "recipes/pretrain.py", "--max_steps", "4", "--logging_steps", "2", "--max_documents", "30",
           "--tokens_per_rank", "512", "--block_size", "128", "--hidden_size", "32", "--num_layers", "2",
           "--save_steps", "4", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "world_size=2" in log and "'fcp/compute_imbalance'" in log and "4/4" in log
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    assert "terminate called" not in log  # clean gloo teardown
    assert "find_unused_parameters" not in log and "Writing model shards" not in log  # quiet logs
    assert "summary: steps 4" in log and "None" not in log.split("summary:")[-1]
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()  # checkpoints by default


def test_sft_prompt_masking(tmp_path, monkeypatch, recipes):
    finetune = recipes.finetune

    from hf_fcp.integrations.embedded import byte_tokenizer

    example = finetune.encode_sft([5, 6, 7], [8, 9], eos=256)
    assert example == {"input_ids": [5, 6, 7, 8, 9, 256], "labels": [-100, -100, -100, 8, 9, 256]}
    args = finetune.SFTDataArguments(max_documents=8)
    data = finetune.load_examples(args, byte_tokenizer(), seed=0, max_length=2048)
    assert len(data) > 0
    for row in data.select(range(min(20, len(data)))):
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = labels.index(next(x for x in labels if x != -100))
        prompt = bytes(ids[:n_prompt]).decode()
        assert prompt.startswith("### Docstring\n") and prompt.endswith("### Code\n")
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == 256 and len(ids) <= 2048
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--max_documents", "8", "--max_steps", "2",
                                      "--hidden_size", "32", "--num_layers", "1", "--tokens_per_rank", "1024",
                                      "--output_dir", str(tmp_path / "ft"), "--logging_steps", "1",
                                      "--disable_tqdm", "true"])
    summary = finetune.main()
    assert summary["steps"] == 2 and summary["last_loss"] > 0
    assert (tmp_path / "ft" / "model.safetensors").exists()


def test_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "train_tiny.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the block layout and the loss
    text = "".join(o.get("text", "") for o in outputs)
    assert "identical to sdpa: True" in text and "compute_imbalance" in text and "held-out bits per byte" in text


def test_a_local_checkpoint_of_an_unsupported_family_is_refused_before_loading(tmp_path, recipes):
    """The recipes run the model-support guard on the checkpoint's config first: Falcon (unverified: it fails
    inside transformers with a bare KeyError: 'fcp' on some releases, drops the plan on others) is refused
    with the guard's reason before anything is loaded."""
    from hf_fcp.testing.families import tiny_config

    common = recipes.common

    tiny_config("falcon").save_pretrained(tmp_path)
    args = common.ModelArguments(model_name_or_path=str(tmp_path))
    refused = r"--model_name_or_path .*model_type 'falcon': not among the families FCP has verified exact"
    with pytest.raises(common.RecipeArgumentError, match=refused):
        common.load_model(args, tokenizer=None, max_positions=64)
