"""``attn_implementation="fcp"`` for transformers models that use the attention interface.

:func:`register` (called by ``import hf_fcp``) adds ``"fcp"`` to transformers' ``AttentionInterface`` and,
as its mask function, transformers' own ``flash_attention_mask``: a padding mask stays a cheap 2D boolean
mask and no (T×T) or 4D mask is ever built. Then::

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fcp")
    out = model(**batch)  # batch from hf_fcp.FCPCollator: input_ids/position_ids (1, n_local), fcp_plan=...

Every attention layer receives the batch's per-rank plan as the ``fcp_plan=`` keyword (a
:class:`hf_fcp.RankView`) and runs :func:`hf_fcp.fcp_attention` over the FCP process group, with the
kernel the plan names (``view.kernel``, from ``PlanSettings.kernel``).
Without a plan (single process, ``generate()``, evaluation) the layer computes exact local attention:
documents are read from ``position_ids`` restarts (packed batches), padding from the 2D mask, and a KV
cache is attended bottom-right aligned (decoding), so a model trained with FCP evaluates and generates as is.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..engine.attention import add_sinks, fcp_attention
from ..engine.kernels import varlen_forward
from ..plan import plan_batch
from ..plan.views import RankView
from . import model_support

ATTN_IMPLEMENTATION = "fcp"
"""The name to pass as ``attn_implementation``."""


def register() -> None:
    """Register ``"fcp"`` with transformers' attention and mask interfaces now (importing them). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, fcp_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def _follow_autocast(fn):
    """Run ``fn(module, query, key, value, ...)`` under the autocast policy ``sdpa`` follows.

    Under ``torch.autocast`` transformers hands the attention function q/k in fp32 (RoPE upcasts) and v in
    the autocast dtype; like ``scaled_dot_product_attention``, q/k/v are cast to the autocast dtype (float64
    stays float64, as autocast leaves it) and the output comes back in that dtype. Autocast is then switched
    off inside, so the engine's fp32 accumulators (the LSE merge, dq/dk/dv) are never downcast. Without
    autocast the tensors pass unchanged (plain bf16/fp16 weights give q/k/v of one dtype already).
    """

    @functools.wraps(fn)
    def wrapper(module, query, key, value, *args, **kwargs):
        device = query.device.type
        if not torch.is_autocast_enabled(device):
            return fn(module, query, key, value, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t if t.dtype == torch.float64 else t.to(dtype) for t in (query, key, value))
        with torch.autocast(device, enabled=False):
            return fn(module, query, key, value, *args, **kwargs)

    return wrapper


@torch.compiler.disable  # torch.compile: one clean graph break per attention call (the P2P exchange stays eager)
@_follow_autocast
def fcp_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, softcap: float | None = None,
                          fcp_plan: RankView | None = None, position_ids: Tensor | None = None,
                          **kwargs) -> tuple[Tensor, None]:
    """The attention function transformers calls in every layer when ``attn_implementation="fcp"``.

    Args:
        module: the attention module.
        query: (B, Hq, S, D); key, value: (B, Hkv, Sk, D) — GQA heads NOT repeated; Sk > S with a KV cache;
            value's head dim may differ (MLA: the smaller side is zero-padded for the kernel, the output sliced).
        attention_mask: None, or a (B, Sk) boolean padding mask (True = real token).
        dropout: must be 0 (attention dropout is not supported).
        scaling: softmax scale (default D ** -0.5).
        sliding_window: the layer's window in keys (the query's own included); a layer the config makes slide
            without passing it (Qwen2-MoE) counts too. Planned: the plan's exchange for that window
            (``PlanSettings.attention_layers``, which ``FCPPlugin`` reads from the model's config).
        softcap: logit soft-capping (Gemma 2); needs a kernel that computes it (``naive`` on CPU,
            ``flash_attn`` on CUDA).
        fcp_plan: this rank's plan view for the batch (``FCPCollator`` output); requires B == 1, S == n_local.
        position_ids: (B, S) int64 document-relative positions; used only without a plan.
        kwargs: other model keywords; ``s_aux`` (Hq,): attention-sink logits (gpt-oss), differentiable.

    Returns:
        (out, None) with out (B, S, Hq, Dv) in query's dtype (Dv: value's head dim).
    """
    _check_supported(module, dropout)
    head_dim = value.shape[-1]
    query, key, value, scaling = _match_head_dims(query, key, value, scaling)  # MLA: value head dim != q/k's
    options = {"window": model_support.layer_window(module, sliding_window),  # also where only the mask slides
               "softcap": softcap, "sinks": kwargs.get("s_aux")}
    if fcp_plan is not None:
        support = model_support.on_attention_call(module)  # the whole model, checked on its first planned call
        if getattr(module, "layer_idx", 0) == 0:  # once per forward
            _check_positions(position_ids, fcp_plan)
            _check_limits(support, fcp_plan)
        out = _planned(query, key, value, attention_mask, fcp_plan, scaling, options)
    elif key.shape[2] != query.shape[2]:
        model_support.require_plan(module)
        out = _cached(query, key, value, attention_mask, scaling, options)
    else:
        model_support.require_plan(module)
        out = _local(query, key, value, attention_mask, position_ids, scaling, options)
    return (out if out.shape[-1] == head_dim else out[..., :head_dim]), None


# ----------------------------------------------------------------------------- checks
def _check_supported(module, dropout) -> None:
    if dropout and module.training:
        raise ValueError(f"attn_implementation='fcp': got attention dropout {dropout}, expected 0.0; set "
                         f"config.attention_dropout=0.0")
    if getattr(module, "is_causal", True) is False:
        raise ValueError("attn_implementation='fcp' computes causal attention only; got a non-causal "
                         f"attention module ({type(module).__name__})")


def _window(options: dict, longest: int) -> dict:
    """``options`` with a sliding window no shorter than the longest document dropped: it changes nothing."""
    window = options["window"]
    return {**options, "window": None} if window is not None and window >= longest else options


def _check_limits(support, view) -> None:
    """This batch's documents against the model's limits (``model_support``: e.g. a sliding window or a
    length-switching rope that equals plain causal attention only for documents up to some length)."""
    if support.limits and isinstance(view, RankView):
        support.check_batch(view.longest)


def _match_head_dims(q, k, v, scale):
    """MLA (value head dim != query/key head dim): pad the smaller side with zeros, as transformers' flash
    path does — zero value columns give zero output columns (sliced off by the caller), zero q/k columns
    leave every score unchanged. The softmax scale stays that of the original q/k head dim."""
    dq, dv = q.shape[-1], v.shape[-1]
    if dq == dv:
        return q, k, v, scale
    scale = dq ** -0.5 if scale is None else scale
    if dv < dq:
        return q, k, torch.nn.functional.pad(v, (0, dq - dv)), scale
    return torch.nn.functional.pad(q, (0, dv - dq)), torch.nn.functional.pad(k, (0, dv - dq)), v, scale


def _check_positions(position_ids, view) -> None:
    """RoPE needs the collator's document-relative positions; a missing position_ids silently breaks it."""
    if not isinstance(view, RankView) or position_ids is None or position_ids.shape[-1] != view.num_local:
        return  # shape problems are reported by _planned
    want = view.position_ids.to(position_ids.device)
    message = ("position_ids: got positions that differ from fcp_plan.position_ids, expected the collator's "
               "document-relative position_ids; pass the FCPCollator batch to the model as is")
    same = position_ids.reshape(-1, want.numel())[0] == want
    if position_ids.device.type != "cpu":  # checked on the device: no host sync (a device-side assert)
        torch._assert_async(same.all(), message)
    elif not bool(same.all()):
        raise ValueError(message)


# ----------------------------------------------------------------------------- the three paths
def _planned(q, k, v, attention_mask, view: RankView, scale, options: dict) -> Tensor:
    """Plan path: q (1, Hq, n_local, D), k/v (1, Hkv, n_local, D) in the view's local order."""
    if not isinstance(view, RankView):
        raise TypeError(f"fcp_plan: got {type(view).__name__}, expected a RankView (plan.for_rank(rank), as "
                        f"FCPCollator emits)")
    placeholder = view.num_local == 0 and q.shape[2] == 1  # FCPCollator's token for a rank without tokens
    if q.shape[0] != 1 or (q.shape[2] != view.num_local and not placeholder) or k.shape[2] != q.shape[2]:
        raise ValueError(f"fcp_plan: got query of shape {tuple(q.shape)} and key of shape {tuple(k.shape)}, "
                         f"expected batch 1 and {view.num_local} tokens (rank {view.rank}'s shard of the plan) "
                         f"and no KV cache; feed the FCPCollator batch as is with use_cache=False")
    if attention_mask is not None:
        raise ValueError("fcp_plan: got a padding attention_mask, expected None (FCP batches are packed without "
                         "padding; drop attention_mask from the batch)")
    n = view.num_local
    out = fcp_attention(q[0, :, :n].transpose(0, 1), k[0, :, :n].transpose(0, 1), v[0, :, :n].transpose(0, 1),
                        view, scale=scale, **_window(options, view.longest))
    if placeholder:  # keep the (empty) FCP node in the graph: its backward takes part in the exchange
        out = torch.cat([out, q.new_zeros((1,) + out.shape[1:])])
    return out.unsqueeze(0)


def _local(q, k, v, attention_mask, position_ids, scale, options: dict) -> Tensor:
    """No plan, no cache: exact causal attention within the documents of each row.

    q (B, Hq, S, D); k/v (B, Hkv, S, D); attention_mask None or (B, S) bool; position_ids None or (B|1, S).
    Real tokens are gathered row-major, documents start where a position does not follow its predecessor
    (or at a row start), and one world-size-1 plan covers them all. Padded rows get out 0.
    """
    b, hq, s, d = q.shape
    keep = None if attention_mask is None else attention_mask.to(torch.bool).reshape(-1)
    lens = _document_lengths(position_ids, attention_mask, b, s)
    view = _local_view(tuple(lens), str(q.device))
    order = view.token_index
    if keep is not None:
        order = keep.nonzero().squeeze(1).index_select(0, order)
    q, k, v = (x.transpose(1, 2).reshape(b * s, x.shape[1], d).index_select(0, order) for x in (q, k, v))
    out = fcp_attention(q, k, v, view, scale=scale, **_window(options, max(lens)))  # no group
    full = q.new_zeros((b * s, hq, d)).index_copy(0, order, out)
    return full.view(b, s, hq, d)


@functools.lru_cache(maxsize=16)
def _local_view(lens: tuple[int, ...], device: str) -> RankView:
    """The world-size-1 plan of one batch's documents. Every attention layer of a forward pass sees the
    same documents: memoised (a pure function of its arguments) so only the first layer plans."""
    return plan_batch(lens, world_size=1, block_size=max(lens)).for_rank(0).to(device)


def _document_lengths(position_ids, attention_mask, b: int, s: int) -> list[int]:
    """Lengths of the documents of the real tokens, in row-major order."""
    pos = (torch.arange(s).expand(b, s) if position_ids is None else position_ids.expand(b, s)).cpu()
    start = torch.ones((b, s), dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool).cpu()
        start[:, 1:] |= ~keep[:, :-1]  # a real token after padding starts a document
        start, pos = start[keep], pos[keep]
    starts = start.reshape(-1).nonzero().squeeze(1)
    if starts.numel() == 0:
        raise ValueError("attn_implementation='fcp': the attention_mask masks every token, expected at least one")
    return torch.diff(starts, append=torch.tensor([int(start.numel())])).tolist()


def _cached(q, k, v, attention_mask, scale, options: dict) -> Tensor:
    """KV cache (decoding / generate): the S queries are the last S of the Sk keys of their row.

    q (B, Hq, S, D); k/v (B, Hkv, Sk, D); attention_mask None or (B, Sk) bool. Inference only: no autograd.
    Padded queries get out 0.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("attn_implementation='fcp' with a KV cache is for inference only; for training pass "
                         "use_cache=False (Trainer does) or run under torch.no_grad()")
    b, hq, s, d = q.shape
    sk = k.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] < sk:
        raise ValueError(f"attn_implementation='fcp': got a {attention_mask.shape[-1]}-token mask for {sk} cached "
                         f"keys, expected one mask entry per key; static caches are not supported, use the "
                         f"default dynamic cache")
    keep_k = torch.ones((b, sk), dtype=torch.bool, device=q.device) if attention_mask is None \
        else attention_mask[:, -sk:].to(device=q.device, dtype=torch.bool)
    keep_q = keep_k[:, -s:]
    rows_q, rows_k = keep_q.reshape(-1).nonzero().squeeze(1), keep_k.reshape(-1).nonzero().squeeze(1)
    cu_q, cu_k = (torch.nn.functional.pad(m.sum(1).cumsum(0), (1, 0)) for m in (keep_q, keep_k))
    flat_q = q.transpose(1, 2).reshape(b * s, hq, d).index_select(0, rows_q)
    flat_k, flat_v = (x.transpose(1, 2).reshape(b * sk, x.shape[1], d).index_select(0, rows_k) for x in (k, v))
    scale = d ** -0.5 if scale is None else float(scale)
    out, lse = varlen_forward(flat_q, flat_k, flat_v, cu_q, cu_k, causal=True, scale=scale, window=options["window"],
                              softcap=options["softcap"])
    if options["sinks"] is not None:
        out = add_sinks(out, lse, options["sinks"])[0].to(q.dtype)
    return q.new_zeros((b * s, hq, d)).index_copy(0, rows_q, out).view(b, s, hq, d)
