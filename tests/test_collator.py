"""FCPCollator: shards cover the global batch exactly once, labels are shifted before cutting, SFT prompt
masks survive, every rank agrees on the plan, bad examples fail with the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_fcp import PlanSettings
from hf_fcp.integrations.collator import FCPCollator
from hf_fcp.plan.views import RankView


def docs(lens, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 1000, n).tolist()} for n in lens]


def global_arrays(examples):
    ids = np.concatenate([e["input_ids"] for e in examples])
    labels = [np.asarray(e.get("labels", e["input_ids"])) for e in examples]
    shifted = np.concatenate([np.append(lab[1:], -100) for lab in labels])
    pos = np.concatenate([np.arange(len(e["input_ids"])) for e in examples])
    return ids, np.concatenate(labels), shifted, pos


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_batch_once_with_shifted_labels(world):
    examples = docs([37, 1, 64, 5, 100, 2])
    ids, labels, shifted, pos = global_arrays(examples)
    seen = np.zeros(len(ids), dtype=int)
    fingerprints = set()
    for rank in range(world):
        batch = FCPCollator(world_size=world, rank=rank, block_size=16)(examples)
        view = batch["fcp_plan"]
        assert isinstance(view, RankView) and view.rank == rank and view.world_size == world
        index = view.token_index.numpy()
        n = len(index)
        for key in ("input_ids", "position_ids", "labels", "shift_labels"):
            assert batch[key].shape == (1, n) and batch[key].dtype == torch.int64, key
        np.testing.assert_array_equal(batch["input_ids"][0].numpy(), ids[index])
        np.testing.assert_array_equal(batch["position_ids"][0].numpy(), pos[index])
        np.testing.assert_array_equal(batch["labels"][0].numpy(), labels[index])
        np.testing.assert_array_equal(batch["shift_labels"][0].numpy(), shifted[index])
        seen[index] += 1
        fingerprints.add(view.fingerprint)
    assert (seen == 1).all()
    assert len(fingerprints) == 1  # every rank derived the same plan independently


def test_sft_prompt_mask_is_respected():
    prompt, answer = [5, 6, 7, 8], [9, 10, 11]
    example = {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    batch = FCPCollator(world_size=1, rank=0)([example, {"input_ids": [1, 2, 3]}])
    shift = batch["shift_labels"][0].tolist()
    # tokens predict their successor; a prompt token's successor is masked unless it is the first answer token
    assert shift[:7] == [-100, -100, -100, 9, 10, 11, -100]
    assert shift[7:] == [2, 3, -100]  # unlabelled example: labels = input_ids, -100 at its end
    assert batch["labels"][0].tolist()[:7] == example["labels"]


def test_tensor_and_numpy_examples_and_stats():
    examples = [{"input_ids": torch.arange(10)}, {"input_ids": np.arange(4), "labels": np.arange(4)},
                {"input_ids": torch.arange(3)[None]}]
    batch = FCPCollator(world_size=2, rank=1, block_size=4, return_stats=True,
                        settings=PlanSettings(kv_heads=2, head_dim=8))(examples)
    stats = batch["fcp_stats"]
    assert stats.tokens == 17 and stats.sequences == 3 and stats["tokens"] == 17
    assert {"compute_imbalance", "memory_imbalance", "comm_bytes", "rounds", "plan_ms"} <= set(stats.keys())


def test_tokens_per_rank_caps_the_shard():
    examples = docs([50, 30, 20])
    sizes = [FCPCollator(world_size=2, rank=r, block_size=8, tokens_per_rank=50)(examples)["input_ids"].shape[1]
             for r in range(2)]
    assert sizes == [50, 50]
    with pytest.raises(ValueError, match="tokens_per_rank=40 is too small"):
        FCPCollator(world_size=2, rank=0, tokens_per_rank=40)(examples)


@pytest.mark.parametrize("examples, message", [
    ([], "got no examples"),
    ([{"input_ids": []}], "empty 'input_ids'"),
    ([{"input_ids": [1, 2], "labels": [1, 2, 3]}], "got 3 labels for 2 input_ids"),
    ([{"text": "hello"}], "without 'input_ids'"),
    ([{"input_ids": [[1, 2], [3, 4]]}], "expected a 1D list"),
    ([{"input_ids": [0.5, 1.5]}], "expected a 1D list of integer"),
])
def test_bad_examples(examples, message):
    with pytest.raises(ValueError, match=message):
        FCPCollator(world_size=1, rank=0)(examples)


def test_bad_settings():
    with pytest.raises(ValueError, match=r"rank: got 2, expected an integer in \[0, 2\)"):
        FCPCollator(world_size=2, rank=2)
    with pytest.raises(ValueError, match="block_size"):
        FCPCollator(world_size=2, rank=0, block_size=0)
    with pytest.raises(ValueError, match="strategy"):
        FCPCollator(world_size=2, rank=0, strategy="zigzag")


def test_rank_without_tokens_gets_one_placeholder():
    batch = FCPCollator(world_size=4, rank=3, block_size=16, pad_token_id=7)([{"input_ids": [1, 2, 3]}])
    assert batch["fcp_plan"].num_local == 0
    assert batch["input_ids"].tolist() == [[7]] and batch["position_ids"].tolist() == [[0]]
    assert batch["labels"].tolist() == [[-100]] and batch["shift_labels"].tolist() == [[-100]]
