"""Tiny random-init transformers models and one exact training step, with FCP on a group of ranks or in one
process: the pieces of the "FCP equals one process" model tests (tests/test_integration_model.py and its
successors). Each rank's step returns the loss and gradients summed over the group, so rank 0 holds what
one process holding the whole batch would compute."""

from __future__ import annotations

import contextlib
import copy

import torch


def tiny_model(model_type: str = "llama", impl: str = "fcp", seed: int = 0, vocab_size: int = 97, **overrides):
    """A tiny random-init causal LM (:func:`hf_fcp.integrations.embedded.tiny_config`, hidden 32, 2 layers,
    4 query / 2 KV heads) with ``attn_implementation=impl``; the same weights for the same seed."""
    from transformers import AutoModelForCausalLM

    from ..integrations.embedded import tiny_config

    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size, hidden_size=32, layers=2, heads=4, kv_heads=2, bos_token_id=0,
                    eos_token_id=1, pad_token_id=2)
    cfg = tiny_config(model_type, **{**settings, **overrides})
    return AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl)


def labelled_documents(lens, vocab: int, prompt: int, seed: int = 0) -> list[dict]:
    """Seeded documents of ``lens`` tokens (ids in [3, vocab): 0-2 stay special) with ``labels``; the first
    document's first ``prompt`` labels are -100 (a prompt that carries no loss)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lens):
        ids = torch.randint(3, vocab, (n,), generator=gen)
        labels = ids.clone()
        if i == 0:
            labels[:prompt] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def grads(model) -> dict[str, torch.Tensor]:
    """Copies of every parameter gradient, by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def autocast(dtype: torch.dtype | None):
    """``torch.autocast("cpu", dtype=dtype)`` (what ``--bf16 true`` does on a CPU), or no context for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def reference_step(model, examples, amp: torch.dtype | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process, the whole global batch packed into one row (documents restart their position_ids):
    (loss, gradients) of ``model`` (e.g. ``attn_implementation="sdpa"``), the forward under
    ``autocast(amp)``."""
    from ..integrations.collator import FCPCollator

    batch = FCPCollator(world_size=1, rank=0, block_size=10**6)(examples)
    batch.pop("fcp_plan")
    with autocast(amp):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), grads(model)


def fcp_step(model, rank: int, size: int, group, examples, block_size: int = 16, amp: torch.dtype | None = None):
    """One FCP training step of ``model`` on this rank's shard of ``examples`` (a list of documents with
    ``input_ids``/``labels``), the token-level loss normalised by the global label count as ``FCPTrainer``
    does, the forward under ``autocast(amp)``. Returns (loss, gradients, tokens held here), loss and
    gradients summed over ``group`` (in float32 for low-precision parameters)."""
    import torch.distributed as dist

    from ..integrations.collator import FCPCollator

    batch = FCPCollator(world_size=size, rank=rank, block_size=block_size)(examples)
    count = batch["shift_labels"].ne(-100).sum()
    dist.all_reduce(count, group=group)
    with autocast(amp):
        loss = model(**batch, num_items_in_batch=count, use_cache=False).loss
    loss.backward()
    g = {name: t.float() for name, t in grads(model).items()}
    flat = torch.cat([loss.detach().float().reshape(1)] + [t.reshape(-1) for t in g.values()])
    dist.all_reduce(flat, group=group)
    parts, start = [], 1
    for t in g.values():
        parts.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return flat[0], dict(zip(g, parts)), batch["fcp_plan"].num_local


# ----------------------------------------------------------------------------- FCPTrainer runs
TRAIN_LENS = (70, 5, 33, 12, 90, 1, 41, 8, 64, 19, 27, 3, 130)
"""Document lengths of :func:`train_dataset`: 3 batches of <= 192 tokens per epoch."""


def train_dataset(lens=TRAIN_LENS, seed: int = 0, vocab_size: int = 97):
    """A ``datasets.Dataset`` of seeded random documents (``input_ids``)."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    return Dataset.from_dict({"input_ids": [rng.integers(3, vocab_size, n).tolist() for n in lens]})


def full_parameters(model) -> torch.Tensor:
    """Every parameter flattened into one float32 vector, whole even when FSDP2 shards it (DTensor)."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().reshape(-1)
                      for p in model.parameters()])


def train_run(output_dir: str, world: int, *, steps: int = 3, global_tokens: int = 192, block_size: int = 16,
              **training_args) -> dict:
    """Train the tiny Llama (seed 0) with ``FCPTrainer`` for ``steps`` steps on :func:`train_dataset`, each global
    batch holding up to ``global_tokens`` tokens over ``world`` ranks; ``training_args`` go to ``TrainingArguments``
    (``fsdp``, ``gradient_checkpointing``, ``gradient_accumulation_steps``, ``torch_compile``, ``bf16``, ...).
    Returns ``update`` (final − initial parameters, flat float32), ``losses`` (logged per step) and ``wrapped``
    (the class name of the model Trainer trained: DistributedDataParallel, FSDP..., OptimizedModule)."""
    from transformers import TrainingArguments

    from ..integrations.accelerate import FCPPlugin
    from ..integrations.trainer import FCPTrainer

    model = tiny_model("llama", "fcp", seed=0)
    start = full_parameters(model)
    settings = dict(output_dir=output_dir, max_steps=steps, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="constant")
    args = TrainingArguments(**{**settings, **training_args})
    plugin = FCPPlugin(block_size=block_size, tokens_per_rank=global_tokens // world)
    trainer = FCPTrainer(model=model, args=args, train_dataset=train_dataset(), fcp_plugin=plugin)
    trainer.train()
    out = {"update": full_parameters(trainer.model) - start, "wrapped": type(trainer.model_wrapped).__name__,
           "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    trainer.close(destroy_process_group=False)
    return out


def train_runs_worker(rank: int, world: int, output_dir: str, cases: dict[str, dict]) -> dict[str, dict]:
    """Worker side (:func:`hf_fcp.testing.run_workers`): :func:`train_run` for every named case of
    ``cases`` (name → ``TrainingArguments`` overrides), one after the other in this spawned group."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    out = {}
    for name, overrides in cases.items():
        out[name] = train_run(os.path.join(output_dir, name), world, **overrides)
        for key in [k for k in os.environ if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")]:
            del os.environ[key]  # Accelerate exports its FSDP settings; the next case starts clean
    return out
