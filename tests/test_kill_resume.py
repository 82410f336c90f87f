"""A run killed with SIGKILL mid-step resumes from its last checkpoint: nothing lost, nothing trained twice.

This file is also the training script: ``python tests/test_kill_resume.py OUT LOG [--kill-at S] [--resume]``
trains the tiny Llama of the Trainer tests (on ``hf_fcp.testing.helpers.token_dataset``) with ``FCPTrainer`` for
``STEPS`` steps, saving a checkpoint every ``SAVE_STEPS`` steps, and appends ``"<step> <exact loss>"`` to LOG
after each optimizer step. With ``--kill-at S`` it stops inside step S (after its backward, before its optimizer
step), writes LOG + ".ready" and sleeps; the test then SIGKILLs it. The test compares an uninterrupted run with
the killed run resumed (``resume_from_checkpoint=True``: the last checkpoint in OUT). The batches span epoch
boundaries (3 batches per epoch), so a wrong sampler position, data order or RNG state changes the losses.
"""

from __future__ import annotations

import copy
import os
import pathlib
import signal
import subprocess
import sys
import time

STEPS, SAVE_STEPS, KILL_AT = 8, 2, 6  # killed inside step 6: checkpoint-4 is the last one on disk
LAST_CHECKPOINT = (KILL_AT - 1) // SAVE_STEPS * SAVE_STEPS
HERE = pathlib.Path(__file__).resolve()
TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- the training script
def train(out: str, log: str, kill_at: int | None, resume: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    from hf_fcp.integrations.accelerate import FCPPlugin
    from hf_fcp.integrations.embedded import tiny_config
    from hf_fcp.integrations.trainer import FCPTrainer
    from hf_fcp.testing.helpers import VOCAB
    from hf_fcp.testing.helpers import token_dataset as dataset

    class StepLog(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step + 1 == kill_at:  # inside step kill_at: backward done, no update yet
                pathlib.Path(log + ".ready").write_text(str(kill_at))
                time.sleep(TIMEOUT_S)

        def on_step_end(self, args, state, control, **kwargs):
            with open(log, "a") as f:
                f.write(f"{state.global_step} {trainer.last_loss!r}\n")

    class LossTrainer(FCPTrainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.last_loss = float(loss)
            return loss

    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, kv_heads=2,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fcp")
    args = TrainingArguments(output_dir=out, max_steps=STEPS, learning_rate=1e-2, logging_steps=1,
                             save_strategy="steps", save_steps=SAVE_STEPS, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=2)
    trainer = LossTrainer(model=model, args=args, train_dataset=dataset(), callbacks=[StepLog()],
                          fcp_plugin=FCPPlugin(block_size=16, tokens_per_rank=192))
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.close()


# ----------------------------------------------------------------------------- the test
def launch(out, log, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}  # the repository root
    return subprocess.Popen([sys.executable, str(HERE), str(out), str(log), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"training exited with {proc.returncode}:\n{output[-4000:]}"


def steps_and_losses(log) -> list[tuple[int, float]]:
    return [(int(s), float(x)) for s, x in (line.split() for line in pathlib.Path(log).read_text().splitlines())]


def kill_inside_step(proc: subprocess.Popen, ready: pathlib.Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {KILL_AT} (exit {proc.returncode}):\n"
                                 f"{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, f"step {KILL_AT} not reached within {TIMEOUT_S} s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def safetensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_sigkill_mid_step_then_resume_loses_nothing(tmp_path):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    procs = [launch(straight_dir, tmp_path / "straight.log"),
             launch(killed_dir, tmp_path / "killed.log", "--kill-at", str(KILL_AT))]
    try:
        kill_inside_step(procs[1], tmp_path / "killed.log.ready")
        killed = steps_and_losses(tmp_path / "killed.log")
        assert [s for s, _ in killed] == list(range(1, KILL_AT)), killed  # step KILL_AT never finished
        saved = sorted(p.name for p in killed_dir.glob("checkpoint-*"))
        assert saved == [f"checkpoint-{s}" for s in range(SAVE_STEPS, KILL_AT, SAVE_STEPS)], saved
        procs.append(launch(killed_dir, tmp_path / "resumed.log", "--resume"))
        for proc in (procs[0], procs[2]):
            finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    straight = dict(steps_and_losses(tmp_path / "straight.log"))
    resumed = steps_and_losses(tmp_path / "resumed.log")
    assert list(straight) == list(range(1, STEPS + 1)), straight
    assert [s for s, _ in resumed] == list(range(LAST_CHECKPOINT + 1, STEPS + 1)), (
        f"resumed run trained steps {[s for s, _ in resumed]}, expected {LAST_CHECKPOINT + 1}..{STEPS}")
    for step, loss in killed + resumed:  # same batches, same weights: the same losses
        assert abs(loss - straight[step]) <= 1e-6 * abs(straight[step]), (step, loss, straight[step])
    a, b = safetensors(straight_dir / f"checkpoint-{STEPS}"), safetensors(killed_dir / f"checkpoint-{STEPS}")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


if __name__ == "__main__":
    argv = sys.argv[1:]
    train(argv[0], argv[1], int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else None,
          "--resume" in argv)
