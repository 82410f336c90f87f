"""``FCPCollator``: a global batch of documents → this rank's FCP shard and its plan view.

Every rank gets the SAME list of examples (the whole global batch), plans it with the same deterministic
planner and keeps its own tokens; no communication. Labels are shifted on the global documents BEFORE the
documents are cut into blocks, so a token whose successor lives on another rank still gets its label::

    document:      t0  t1  t2  t3          labels (given or = input_ids)
    shift_labels:  t1  t2  t3  -100        -100 at each document end (and wherever the label was -100)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..plan import PlanSettings, plan_batch
from ..plan.checks import check_int

IGNORE_INDEX = -100


@dataclass(kw_only=True)
class FCPCollator:
    """Collate a global batch into this rank's FCP shard.

    Output of ``collator(examples)`` (all int64, shape (1, n_local), tokens in the plan's local order):
    ``input_ids``; ``position_ids`` (document-relative, restart at 0); ``labels`` (the example's labels of
    these tokens, -100 = ignored); ``shift_labels`` (the label of each token's successor in its document,
    -100 at document ends); ``fcp_plan`` (the :class:`hf_fcp.RankView` to pass to the model); with
    ``return_stats``, ``fcp_stats`` (``plan.stats()``, a :class:`hf_fcp.PlanStats` — pop it before
    ``model(**batch)``).
    A rank the plan leaves without tokens gets one placeholder token (``pad_token_id``, label -100).
    """

    world_size: int
    """Ranks sharing the global batch (the FCP group's size)."""
    rank: int
    """This process's rank in the FCP group."""
    settings: PlanSettings = field(default_factory=PlanSettings)
    """How batches are planned (block size, token cap, strategy, cost model, kernel, ...)."""
    block_size: int | None = None
    """Shorthand for ``settings.block_size`` (applied once, at construction)."""
    tokens_per_rank: int | None = None
    """Shorthand for ``settings.tokens_per_rank``."""
    strategy: str | None = None
    """Shorthand for ``settings.strategy``."""
    return_stats: bool = False
    """Also return ``fcp_stats`` (plan figures for logging)."""
    pad_token_id: int = 0
    """Token id of the one placeholder token a rank gets when the plan leaves it no tokens (a batch
    smaller than the ranks' blocks); it has label -100 and attention ignores it."""

    def __post_init__(self) -> None:
        self.world_size = check_int("world_size", self.world_size)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: got {self.rank!r}, expected an integer in [0, {self.world_size})")
        if not isinstance(self.settings, PlanSettings):
            raise ValueError(f"settings: got {type(self.settings).__name__}, expected an hf_fcp.PlanSettings")
        shorthand = {name: getattr(self, name) for name in ("block_size", "tokens_per_rank", "strategy")
                     if getattr(self, name) is not None}
        if shorthand:  # validated here, once; every batch then plans with the same settings object
            self.settings = replace(self.settings, **shorthand)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids, labels = _read_examples(examples)
        lens = [len(x) for x in ids]
        plan = plan_batch(lens, world_size=self.world_size, settings=self.settings)
        view = plan.for_rank(self.rank)
        index = view.token_index.numpy()
        all_ids = np.concatenate(ids)
        all_labels = np.concatenate(labels)
        shifted = np.concatenate([np.append(lab[1:], IGNORE_INDEX) for lab in labels])
        row = lambda a: torch.from_numpy(np.ascontiguousarray(a[index], dtype=np.int64)).unsqueeze(0)  # noqa: E731
        batch = {"input_ids": row(all_ids), "position_ids": view.position_ids.unsqueeze(0).clone(),
                 "labels": row(all_labels), "shift_labels": row(shifted), "fcp_plan": view}
        if view.num_local == 0:  # models cannot run an empty sequence: one placeholder token, no loss
            one = lambda value: torch.full((1, 1), value, dtype=torch.int64)  # noqa: E731
            batch.update(input_ids=one(self.pad_token_id), position_ids=one(0), labels=one(IGNORE_INDEX),
                         shift_labels=one(IGNORE_INDEX))
        if self.return_stats:
            batch["fcp_stats"] = plan.stats()
        return batch


def _as_int_array(value, name: str, i: int) -> np.ndarray:
    arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"examples[{i}]['{name}']: got shape {arr.shape} dtype {arr.dtype}, expected a 1D "
                         f"list of integer token ids (one document per example, unpadded)")
    return arr.astype(np.int64, copy=False)


def _read_examples(examples) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """input_ids and labels of each example, validated (labels default to input_ids)."""
    if isinstance(examples, Mapping) or not examples:
        raise ValueError("FCPCollator: got no examples, expected a non-empty list of dicts with 'input_ids'")
    ids, labels = [], []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            raise ValueError(f"examples[{i}]: got {type(ex).__name__} without 'input_ids', expected a dict "
                             f"with 'input_ids' (and optionally 'labels')")
        x = _as_int_array(ex["input_ids"], "input_ids", i)
        if x.size == 0:
            raise ValueError(f"examples[{i}]: got an empty 'input_ids', expected at least one token; filter "
                             f"empty documents out (dataset.filter(lambda e: len(e['input_ids']) > 0))")
        y = x if ex.get("labels") is None else _as_int_array(ex["labels"], "labels", i)
        if y.shape != x.shape:
            raise ValueError(f"examples[{i}]: got {y.size} labels for {x.size} input_ids, expected one label "
                             f"per token (-100 where no loss is wanted), unshifted")
        ids.append(x)
        labels.append(y)
    return ids, labels
