"""Tiny random-init transformers models and one exact training step, with FCP on a group of ranks or in one
process: the pieces of the "FCP equals one process" model tests (tests/test_integration_model.py and its
successors). Each rank's step returns the loss and gradients summed over the group, so rank 0 holds what
one process holding the whole batch would compute."""

from __future__ import annotations

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


def grads(model) -> dict[str, torch.Tensor]:
    """Copies of every parameter gradient, by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """``|got - ref| / |ref| <= tol`` in the 2-norm (asserts, naming ``what``)."""
    err = (got - ref).norm() / ref.norm().clamp_min(1e-30)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def reference_step(model, examples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process, the whole global batch packed into one row (documents restart their position_ids):
    (loss, gradients) of ``model`` (e.g. ``attn_implementation="sdpa"``)."""
    from ..integrations.collator import FCPCollator

    batch = FCPCollator(world_size=1, rank=0, block_size=10**6)(examples)
    batch.pop("fcp_plan")
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), grads(model)


def fcp_step(model, rank: int, size: int, group, examples, block_size: int = 16):
    """One FCP training step of ``model`` on this rank's shard of ``examples`` (a list of documents with
    ``input_ids``/``labels``), the token-level loss normalised by the global label count as ``FCPTrainer``
    does. Returns (loss, gradients, tokens held here), loss and gradients summed over ``group``."""
    import torch.distributed as dist

    from ..integrations.collator import FCPCollator

    batch = FCPCollator(world_size=size, rank=rank, block_size=block_size)(examples)
    count = batch["shift_labels"].ne(-100).sum()
    dist.all_reduce(count, group=group)
    loss = model(**batch, num_items_in_batch=count, use_cache=False).loss
    loss.backward()
    g = grads(model)
    flat = torch.cat([loss.detach().reshape(1)] + [t.reshape(-1) for t in g.values()])
    dist.all_reduce(flat, group=group)
    parts, start = [], 1
    for t in g.values():
        parts.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return flat[0], dict(zip(g, parts)), batch["fcp_plan"].num_local
