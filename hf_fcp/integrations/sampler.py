"""Token-budget batching: every global batch holds at most ``max_tokens`` tokens, no per-document padding.

:class:`TokenBudgetSampler` is a batch sampler over *pieces* ``(example index, start, end)``: a document
is one piece unless it is longer than the budget, which the long-sequence policy handles (``split`` into
budget-sized pieces, ``truncate`` to the budget, or ``error``). :class:`PieceDataset` wraps a dataset so a
``DataLoader(PieceDataset(ds), batch_sampler=sampler)`` yields lists of (sliced) examples. The order is a
pure function of (lengths, seed, epoch): every rank iterates the same global batches.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..plan.checks import check_choice, check_int

LONG_SEQUENCE_POLICIES = ("split", "truncate", "error")
Piece = tuple[int, int, int]  # (example index, start token, end token)


class TokenBudgetSampler(Sampler[list[Piece]]):
    """Batches of pieces with at most ``max_tokens`` tokens each, filled first-fit.

    Args:
        lengths: tokens of each example (≥ 1).
        max_tokens: the global batch budget, ``world_size × tokens_per_rank``.
        long_sequence_policy: for examples longer than ``max_tokens``: "split" (default) into pieces of
            ``max_tokens`` (each its own document, positions restart), "truncate", or "error".
        shuffle: shuffle the examples each epoch (seeded by ``seed + epoch``).
        seed: shuffling seed; must be equal on every rank.
        drop_last: drop the last batch of each epoch (usually under-filled).
        window: first-fit looks this many pieces ahead for one that fits the open batch.
    """

    def __init__(self, lengths: Sequence[int], *, max_tokens: int, long_sequence_policy: str = "split",
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, window: int = 256):
        self.max_tokens = check_int("max_tokens", max_tokens)
        self.window = check_int("window", window)
        self.policy = check_choice("long_sequence_policy", long_sequence_policy, LONG_SEQUENCE_POLICIES)
        self.lengths = _check_lengths(lengths, self.max_tokens, self.policy)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0
        self._skip = 0  # batches to skip at the start of the next iteration (resume)
        self._yielded = 0
        self._cache: tuple[int, list[list[Piece]]] | None = None

    # ---- epochs and state ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (Trainer and Accelerate call this)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """Checkpointable position: the epoch and how many of its batches were already yielded."""
        return {"epoch": self.epoch, "seed": self.seed, "batches_done": self._yielded}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume: the next iteration yields epoch ``state['epoch']`` from batch ``batches_done`` on."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state: got seed {state['seed']}, expected {self.seed} (this sampler's)")
        self.epoch, self._skip = int(state["epoch"]), int(state["batches_done"])

    # ---- batches -------------------------------------------------------------------------------------
    def batches(self, epoch: int | None = None) -> list[list[Piece]]:
        """All batches of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._build(epoch))
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[Piece]]:
        batches = self.batches()
        start, self._skip = self._skip, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield list(batch)

    def _build(self, epoch: int) -> list[list[Piece]]:
        order = np.arange(len(self.lengths))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        pieces = [p for i in order.tolist() for p in self._pieces(i)]
        batches = _first_fit(pieces, self.max_tokens, self.window)
        if self.drop_last and batches:
            batches.pop()
        return batches

    def _pieces(self, i: int) -> list[Piece]:
        n, cap = int(self.lengths[i]), self.max_tokens
        if n <= cap:
            return [(i, 0, n)]
        if self.policy == "truncate":
            return [(i, 0, cap)]
        return [(i, a, min(a + cap, n)) for a in range(0, n, cap)]


def _check_lengths(lengths, max_tokens: int, policy: str) -> np.ndarray:
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if arr.size == 0:
        raise ValueError("lengths: got an empty dataset, expected at least one example")
    empty = np.flatnonzero(arr < 1)
    if empty.size:
        raise ValueError(f"lengths: example {int(empty[0])} has {int(arr[empty[0]])} tokens, expected >= 1; "
                         f"filter empty documents out (dataset.filter(lambda e: len(e['input_ids']) > 0))")
    long = np.flatnonzero(arr > max_tokens)
    if policy == "error" and long.size:
        raise ValueError(f"example {int(long[0])} has {int(arr[long[0]])} tokens, more than the batch budget "
                         f"max_tokens={max_tokens} (world_size × tokens_per_rank); set long_sequence_policy="
                         f"'split' or 'truncate', or raise tokens_per_rank")
    return arr


def _first_fit(pieces: list[Piece], budget: int, window: int) -> list[list[Piece]]:
    """Fill batches in order; an open batch takes the first of the next ``window`` pieces that fits."""
    batches, pending = [], list(pieces)
    while pending:
        batch, room, rest = [], budget, []
        for j, p in enumerate(pending):
            size = p[2] - p[1]
            if size <= room:
                batch.append(p)
                room -= size
            else:
                rest.append(p)
            if room == 0 or len(rest) >= window:
                rest.extend(pending[j + 1:])
                break
        batches.append(batch)
        pending = rest
    return batches


class PieceDataset(Dataset):
    """A view of ``dataset`` indexed by pieces: ``ds[(i, a, b)]`` is example ``i`` with its token columns
    (``input_ids`` and, when present, ``labels`` / ``attention_mask``) sliced to ``[a, b)``."""

    token_columns = ("input_ids", "labels", "attention_mask")

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, piece: Piece) -> dict[str, Any]:
        i, a, b = piece
        example = dict(self.dataset[int(i)])
        for name in self.token_columns:
            if example.get(name) is not None:
                example[name] = example[name][a:b]
        return example

    def __getitems__(self, pieces: list[Piece]) -> list[dict[str, Any]]:
        return [self[p] for p in pieces]


def dataset_lengths(dataset, column: str = "input_ids") -> list[int]:
    """Tokens per example: a ``length`` column if the dataset has one, else ``len`` of ``column``."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if "length" in names:
            return [int(x) for x in dataset["length"]]
        if column not in names:
            raise ValueError(f"dataset: got columns {names}, expected a {column!r} column (tokenize first)")
        return [len(x) for x in dataset[column]]
    return [len(dataset[i][column]) for i in range(len(dataset))]

