"""Helpers the tests share (one definition each): the tiny batches' constants, the one relative-error
measure and assertion, seeded length lists and datasets, and the tiny model with its global batch."""

from __future__ import annotations

import numpy as np
import torch

LENS = (37, 5, 1, 64, 20, 9)
"""The model tests' global batch: a 1-token document and documents spanning several blocks and ranks."""
BLOCK = 16
"""Their block size: small, so a 37-token document is three blocks on up to four ranks."""
VOCAB = 97
"""The tiny models' vocabulary (ids 0-2 are special)."""


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ``|got - ref| / |ref|`` in the 2-norm, computed in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Asserts ``rel(got, ref) <= tol``, naming ``what``."""
    err = rel(got, ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def random_lens(rng: np.random.Generator, world: int, block: int) -> tuple[int, ...]:
    """Random sequence lengths for ``world`` ranks and blocks of ``block``: 1-token sequences, one sequence
    spanning every rank, random others (shuffled); now and then a batch with fewer tokens than ranks."""
    if rng.random() < 0.1:
        return tuple([1] * int(rng.integers(1, world + 1)))
    lens = [1] * int(rng.integers(1, 4))
    lens.append(block * world * int(rng.integers(1, 4)) + int(rng.integers(0, block + 1)))
    lens += rng.integers(1, 3 * block + 3, size=int(rng.integers(0, 6))).tolist()
    rng.shuffle(lens)
    return tuple(int(n) for n in lens)


def token_dataset(lens=(70, 5, 33, 12, 90, 1, 41, 8, 64, 19, 27, 3, 130), seed: int = 0, vocab: int = VOCAB):
    """A ``datasets.Dataset`` of one random document per row (``input_ids`` in [3, vocab)), ``len(lens)`` rows:
    by default 3 global batches of at most 192 tokens (the Trainer tests')."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    return Dataset.from_dict({"input_ids": [rng.integers(3, vocab, n).tolist() for n in lens]})


def make_model(model_type: str, impl: str, seed: int = 0):
    """The tiny model of the model tests (:func:`.models.tiny_model` with :data:`VOCAB`)."""
    from .models import tiny_model

    return tiny_model(model_type, impl, seed, vocab_size=VOCAB)


def examples(lens=LENS, seed: int = 0) -> list[dict]:
    """The model tests' global batch: documents with labels, the first one with a masked (-100) SFT prompt."""
    from .models import labelled_documents

    return labelled_documents(lens, VOCAB, min(10, lens[0] - 2), seed)
