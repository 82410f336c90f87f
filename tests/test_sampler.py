"""TokenBudgetSampler: batches within the budget, every token once per epoch (split), long-sequence
policies, same order on every rank, epochs reshuffle, state_dict resumes mid-epoch; PieceDataset slices."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset
from torch.utils.data import DataLoader

from hf_fcp.integrations.collator import FCPCollator
from hf_fcp.integrations.sampler import (
    PieceDataset,
    TokenBudgetSampler,
    dataset_lengths,
)

LENS = np.random.default_rng(0).lognormal(4.0, 1.3, 300).astype(int).clip(1, 1000).tolist() + [5000, 1201]


def covered(batches, lens):
    seen = [np.zeros(n, dtype=int) for n in lens]
    for batch in batches:
        for i, a, b in batch:
            seen[i][a:b] += 1
    return seen


def test_split_policy_covers_every_token_once_within_budget():
    sampler = TokenBudgetSampler(LENS, max_tokens=1200, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    sizes = [sum(b - a for _, a, b in batch) for batch in batches]
    assert max(sizes) <= 1200
    assert all((s == 1).all() for s in covered(batches, LENS))
    assert np.mean(sizes[:-1]) > 0.97 * 1200  # first-fit keeps batches full
    pieces_of_long = sorted(p for batch in batches for p in batch if p[0] == len(LENS) - 2)
    assert [b - a for _, a, b in pieces_of_long] == [1200, 1200, 1200, 1200, 200]


def test_truncate_and_error_policies():
    batches = list(TokenBudgetSampler(LENS, max_tokens=1200, long_sequence_policy="truncate"))
    seen = covered(batches, LENS)
    assert seen[-2][:1200].min() == 1 and seen[-2][1200:].max() == 0
    assert all((s == 1).all() for s, n in zip(seen, LENS) if n <= 1200)
    with pytest.raises(ValueError, match=r"example 300 has 5000 tokens.*long_sequence_policy"):
        TokenBudgetSampler(LENS, max_tokens=1200, long_sequence_policy="error")
    with pytest.raises(ValueError, match="long_sequence_policy: got 'drop'"):
        TokenBudgetSampler(LENS, max_tokens=1200, long_sequence_policy="drop")
    with pytest.raises(ValueError, match="example 1 has 0 tokens"):
        TokenBudgetSampler([3, 0], max_tokens=10)


def test_same_order_on_every_rank_new_order_each_epoch():
    a, b = (TokenBudgetSampler(LENS, max_tokens=1000, seed=7) for _ in range(2))
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    assert list(TokenBudgetSampler(LENS, max_tokens=1000, shuffle=False)) == \
        list(TokenBudgetSampler(LENS, max_tokens=1000, shuffle=False, seed=99))


def test_state_dict_resumes_mid_epoch():
    sampler = TokenBudgetSampler(LENS, max_tokens=1000, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    for _ in range(5):
        next(it)
    state = sampler.state_dict()
    assert state == {"epoch": 2, "seed": 1, "batches_done": 5}
    fresh = TokenBudgetSampler(LENS, max_tokens=1000, seed=1)
    fresh.load_state_dict(state)
    assert list(fresh) == full[5:]
    assert list(fresh) == full  # the skip applies to one iteration only
    with pytest.raises(ValueError, match="seed"):
        TokenBudgetSampler(LENS, max_tokens=1000, seed=2).load_state_dict(state)


def test_piece_dataset_feeds_the_collator():
    ds = Dataset.from_dict({"input_ids": [list(range(n)) for n in (30, 7, 12)],
                            "labels": [[-100] * 5 + list(range(5, n)) for n in (30, 7, 12)]})
    assert dataset_lengths(ds) == [30, 7, 12]
    sampler = TokenBudgetSampler(dataset_lengths(ds), max_tokens=20, shuffle=False)
    loader = DataLoader(PieceDataset(ds), batch_sampler=sampler, collate_fn=FCPCollator(world_size=1, rank=0))
    batches = list(loader)
    assert sum(b["input_ids"].shape[1] for b in batches) == 49
    first = batches[0]
    assert first["input_ids"][0].tolist() == list(range(20))  # piece [0, 20) of document 0
    assert first["labels"][0].tolist()[:6] == [-100] * 5 + [5]
    assert sorted(b["fcp_plan"].num_seqs for b in batches) == [1, 1, 2]
    with pytest.raises(ValueError, match="expected a 'input_ids' column"):
        dataset_lengths(Dataset.from_dict({"text": ["a"]}))
