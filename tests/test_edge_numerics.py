"""Numerics at the edges, through the collator and a real model (llama, GQA) on W = 2..4 gloo ranks.

Not repeated here (already covered): ranks with no token at all and fewer tokens than ranks
(tests/test_integration_model.py::test_ranks_without_tokens_take_part), 1-token documents and idle ranks in
the attention op (tests/test_attention_dist.py), fully masked kernel rows (tests/test_kernels.py).

Added: a rank that holds tokens but no label token (an all-padding / fully prompt-masked document),
ranks holding exactly one token, all-padding examples among real ones, a batch of 1-token documents only.
Each: finite loss and gradients, equal to the single-process sdpa step on the packed batch.
"""

from __future__ import annotations

import pytest
import torch

from hf_fcp.integrations.collator import FCPCollator
from hf_fcp.testing import fcp_subgroups, run_workers
from hf_fcp.testing.helpers import BLOCK, VOCAB, assert_close
from hf_fcp.testing.models import fcp_step, reference_step, tiny_model

PAD = 2


def _doc(n: int, seed: int, masked: bool = False) -> dict:
    """A document of n tokens; ``masked``: an all-padding example (pad ids, every label -100)."""
    if masked:
        return {"input_ids": [PAD] * n, "labels": [-100] * n}
    ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": ids}


CASES = {
    # 80 padding tokens and one labelled token (a 2-token document): whatever the placement, every rank but
    # one holds label-free tokens only
    "rank_without_labels": [_doc(80, 0, masked=True), _doc(2, 1), _doc(1, 2)],
    # 1-token documents (two of them all-padding; they carry no label after the shift) and one 2-token document
    # holding the batch's only label token: ranks of exactly one token, most ranks without a label
    "one_token_documents": [_doc(1, 4), _doc(1, 5, masked=True), _doc(2, 6), _doc(1, 7, masked=True)],
    # all-padding examples between real ones, documents spanning several blocks and ranks
    "padding_examples_mixed": [_doc(7, 9, masked=True), _doc(33, 10), _doc(2, 11, masked=True), _doc(20, 12)],
}


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    out = {}
    for size, group in fcp_subgroups(rank, world):
        for name, batch in CASES.items():
            shard = FCPCollator(world_size=size, rank=rank, block_size=BLOCK)(batch)
            loss, g, n_local = fcp_step(tiny_model("llama", "fcp", vocab_size=VOCAB), rank, size, group, batch, BLOCK)
            labels = int(shard["shift_labels"].ne(-100).sum()) if shard["fcp_plan"].num_local else 0
            stats = torch.tensor([n_local, labels], dtype=torch.int64)
            parts = [torch.empty_like(stats) for _ in range(size)]
            dist.all_gather(parts, stats, group=group)
            out[size, name] = (loss, g, [tuple(p.tolist()) for p in parts])
    return out


def _reference(batch):
    return reference_step(tiny_model("llama", "sdpa", vocab_size=VOCAB), batch)


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, 4, timeout=120)[0]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_edge_batches_match_reference(results, name, world):
    loss, g, shards = results[world, name]
    ref_loss, ref_grads = _reference(CASES[name])
    assert torch.isfinite(ref_loss)
    assert torch.isfinite(loss), f"{name} W={world}: loss {loss}"
    assert all(torch.isfinite(t).all() for t in g.values()), f"{name} W={world}: non-finite gradient"
    assert sum(n for n, _ in shards) == sum(len(e["input_ids"]) for e in CASES[name])
    assert_close(loss, ref_loss, 1e-5, f"{name} W={world} loss")
    assert set(g) == set(ref_grads)
    # relative to the larger of the tensor's and the whole model's gradient norm: with one label token
    # attending to itself only, q_proj/k_proj gradients are exactly 0 and each side has only rounding noise
    total = torch.sqrt(sum(t.norm() ** 2 for t in ref_grads.values()))
    for key, ref in ref_grads.items():
        err = (g[key] - ref).norm() / torch.maximum(ref.norm(), total)
        assert err <= 1e-5, f"{name} W={world} grad {key}: error {err:.2e} relative to {ref.norm():.2e}"
    # the edge is really exercised (guards against a planner change silently removing it)
    if name == "rank_without_labels":
        assert any(n > 0 and labels == 0 for n, labels in shards), shards
    if name == "one_token_documents" and world >= 3:
        assert any(n == 1 for n, _ in shards), shards
