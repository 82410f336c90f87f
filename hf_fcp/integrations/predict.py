"""Evaluation and prediction under FCP: whole documents back from every rank's shard.

A rank holds pieces of the global batch's documents in the plan's local order. Loss evaluation needs
nothing more (the token-level loss is exact, see ``FCPTrainer``); per-token outputs (logits for
``predict()`` and ``compute_metrics``) are gathered over the FCP group and cut into documents::

    rank 0 logits (1, n_0, V) ─┐                     document 0 (len_0, V) ─┐
    rank 1 logits (1, n_1, V) ─┼─ all-gather + scatter ──► ...              ├─ (num_docs, longest, V),
    ...                        ┘  by token_index         document k         ┘   padded with -100

Every rank then holds the same whole batch, so the evaluation loop must not gather again (Trainer would
otherwise repeat every row once per rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

PAD = -100
"""What Trainer pads predictions and labels with (``EvalLoopContainer(padding_index=-100)``)."""


def gather_documents(local: torch.Tensor, view, group=None, pad: float = PAD) -> torch.Tensor:
    """Per-document rows of a per-token output, from every rank's shard.

    Args:
        local: ``(1, n_rows, *feature)`` (e.g. logits ``(1, n_rows, vocab)`` or labels ``(1, n_rows)``), the rows
            of this rank's tokens in the plan's local order; ``n_rows >= view.num_local`` (a rank the plan left
            without tokens holds one placeholder row, ignored).
        view: this rank's :class:`hf_fcp.RankView` of the batch.
        group: the FCP process group (None: one process).
        pad: the value of positions past a document's end.

    Returns:
        ``(view.num_seqs, longest, *feature)``, same dtype and device as ``local``: row ``i`` holds document
        ``i`` of the global batch (the batch's example order) in token order, then ``pad``. Equal on every rank.
    """
    rows = local[0, :view.num_local]
    index = view.token_index.to(rows.device)
    if group is not None and dist.get_world_size(group) > 1:
        rows, index = _all_gather_rows(rows, index, group)
    whole = rows.new_empty((view.num_tokens, *rows.shape[1:]))
    whole[index] = rows
    lengths = view.seq_lens.tolist()
    out = rows.new_full((len(lengths), max(lengths), *rows.shape[1:]), pad)
    for i, doc in enumerate(whole.split(lengths)):
        out[i, :doc.shape[0]] = doc
    return out


def _all_gather_rows(rows: torch.Tensor, index: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows, token index), concatenated (ranks hold different token counts: padded to the
    largest, then cut back)."""
    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    where = index.new_zeros(longest)
    where[:index.shape[0]] = index
    all_rows = [torch.empty_like(padded) for _ in range(world)]
    all_index = [torch.empty_like(where) for _ in range(world)]
    dist.all_gather(all_rows, padded.contiguous(), group=group)
    dist.all_gather(all_index, where, group=group)
    return (torch.cat([r[:n] for r, n in zip(all_rows, sizes)]), torch.cat([i[:n] for i, n in zip(all_index, sizes)]))


def whole_document_check(lengths, budget: int) -> None:
    """Per-token outputs are one document's only when no document is split over batches: raise ``ValueError``
    naming the first example longer than a global batch of ``budget`` tokens."""
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"predict/compute_metrics: example {i} has {n} tokens, more than a global batch "
                             f"(world_size × tokens_per_rank = {budget}); FCP would split it into pieces whose "
                             f"positions restart, so its logits would not be the document's. Supported: examples of "
                             f"at most {budget} tokens — raise tokens_per_rank, truncate the examples (SFTConfig "
                             f"max_length), or evaluate the loss only (prediction_loss_only=True)")
