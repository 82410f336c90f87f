"""Which Hugging Face models FCP trains exactly; one clear ``ValueError`` for every other one.

FCP runs every layer but attention on a rank's local tokens, and attention with the documents' full K/V.
That is exact only when (1) every module outside attention is token-local, (2) positions and scales do
not depend on how many tokens the forward holds, and (3) every attention layer computes a mask FCP
implements. The guard decides from allow-lists, so a new transformers release cannot slip a new kind of
layer through:

* modules: every module class must be one the model-support matrix verified token-local for the installed
  transformers release (:mod:`.verified_models`: package data written by ``benchmarks/model_matrix.py``,
  one file per verified release), or a transparent wrapper. With a transformers outside the verified range
  the guard says so once and applies the newest verified release before it (see :mod:`.verified_models`);
* config: ``layer_types`` kinds in :data:`ATTENTION_LAYER_KINDS`, rope types in :data:`ROPE_TYPES`, causal
  attention only; features the engine lacks (:data:`ENGINE_SUPPORTS`) are limited to batches where they
  change nothing (chunked attention with chunks longer than every document is plain causal attention);
* before loading, :func:`check_config` also requires a verified family (``model_type``).

The matrix (``matrix=``), the engine's features (``engine=``) and classes trusted for one check
(``extra_classes=``) are arguments of the checks, so a test or the model matrix varies them without touching
module state.

:func:`check_model` runs in ``FCPPlugin.prepare_model`` / ``FCPTrainer``; :func:`on_attention_call` runs
it at the first planned call of the ``"fcp"`` attention function (for users who skip ``prepare_model``),
and :meth:`ModelSupport.check_batch` applies the per-batch limits once per planned forward.
"""

from __future__ import annotations

import inspect
import logging
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..engine import comm
from . import adapters, layer_kinds, verified_models

ENGINE_SUPPORTS: Mapping[str, bool] = {
    "chunked_attention": False,  # Llama 4 ``attention_chunk_size`` shorter than a document
}
"""Attention features the guard limits while the engine lacks them (False). Sliding windows, attention sinks
and logit soft-capping are computed exactly by the engine and need no entry. Set a feature to True once the
engine and ``fcp_attention_forward`` implement it; the model matrix then checks those families for
exactness (it passes ``engine={feature: True}`` to show what the limit prevents)."""

ATTENTION_LAYER_KINDS = {"full_attention": None, "sliding_attention": "sliding_window",
                         "chunked_attention": "chunked_attention"}
"""``config.layer_types`` kinds FCP can run (→ the engine feature each needs; None: plain causal)."""
LAYER_KIND_KEYS = ("layer_types", "layers_block_type", "block_types")
ROPE_TYPES = {"default": None, "linear": None, "llama3": None, "yarn": None, "proportional": None,
              "dynamic": "max_position_embeddings", "longrope": "original_max_position_embeddings"}
"""Rope types whose frequencies never depend on the forward's length (None), and the two that switch on
the longest position seen (→ the config key of the length up to which they equal the unscaled rope)."""
TRANSPARENT_PREFIXES = ("torch.distributed.", "torch.nn.parallel.", "torch._dynamo.", "accelerate.")
"""Wrappers (DDP, FSDP, activation checkpointing, torch.compile) whose children are checked instead."""
MIXER_HINTS = ("mamba", "ssm", "mixer", "rglru", "recurrent", "rwkv", "lstm", "shortconv", "deltanet",
               "linearattention", "lightning", "hyena", "retention", "kda")
"""Class-name parts of known token mixers; only for the wording of a refusal (the decision is the allow-list)."""
_EXTRA_CLASSES: set[str] = set()
_WARNED: set[str] = set()  # installed transformers releases the out-of-range warning was given for (once each)
logger = logging.getLogger(__name__)
_SUPPORT: "weakref.WeakKeyDictionary[torch.nn.Module, ModelSupport]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Limit:
    """A feature that equals plain causal attention only while every document has at most ``tokens`` tokens
    (a property of the global batch: every rank decides alike)."""

    tokens: int
    feature: str
    way_out: str


@dataclass(frozen=True)
class ModelSupport:
    """The outcome of a passed check: the model's name and its per-batch limits."""

    model: str
    limits: tuple[Limit, ...] = ()

    def check_batch(self, longest_document: int) -> None:
        """Raise ``ValueError`` when a document of the batch is longer than a limit allows."""
        for lim in self.limits:
            if longest_document > lim.tokens:
                raise ValueError(f"{self.model}: {lim.feature} is exact under FCP only for documents of at most "
                                 f"{lim.tokens} tokens; got a document of {longest_document} tokens; {lim.way_out}")


def allow_classes(*qualnames: str) -> None:
    """Trust module classes (``"package.module.ClassName"``) as token-local, e.g. after verifying a model
    with ``benchmarks/model_matrix.py``. Fixed state: call once at setup."""
    _EXTRA_CLASSES.update(qualnames)


# ----------------------------------------------------------------------------- entry points
def check_model(model: torch.nn.Module, *, matrix: verified_models.Matrix | None = None,
                engine: Mapping[str, bool] | None = None, extra_classes: Iterable[str] = ()) -> ModelSupport:
    """Every static check on a built model; remembers the result for :func:`on_attention_call`.
    Raises ``ValueError`` naming the model, the feature and the way out.

    ``matrix``: what is verified (default: the installed transformers'); ``engine``: overrides of
    :data:`ENGINE_SUPPORTS`; ``extra_classes``: qualified class names trusted for this check only."""
    matrix = _matrix(matrix)
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module  # DDP and similar wrappers
    name = _checked_classes(type(model))[0].__name__  # FSDP2's FSDPLlamaForCausalLM: LlamaForCausalLM
    support = _config_support(model.config, name, {**ENGINE_SUPPORTS, **(engine or {})})
    _check_modules(model, name, matrix, set(extra_classes))
    for module in model.modules():
        _SUPPORT[module] = support
    return support


def check_config(config, *, matrix: verified_models.Matrix | None = None,
                 engine: Mapping[str, bool] | None = None) -> ModelSupport:
    """The checks that need only a config, to run BEFORE loading (``check_config(AutoConfig.from_pretrained(
    name))``): a family the model matrix did not verify exact (e.g. Falcon or GPT-Neo, which fail inside
    transformers with a bare ``KeyError: 'fcp'`` when loaded with ``attn_implementation="fcp"``) and every
    config feature :func:`check_model` refuses raise ``ValueError``. Returns the per-batch limits."""
    matrix = _matrix(matrix)
    family = getattr(config, "model_type", None)
    name = f"model_type {family!r}"
    if family not in matrix.families:
        note = matrix.notes.get(family, "it is not in the matrix (a newer transformers family?)")
        raise ValueError(f"{name}: not among the families FCP has verified exact ({_matrix_name(matrix)}): {note}; "
                         f"FCP cannot train it — use plain data parallelism (attn_implementation='sdpa' and "
                         f"DDP/FSDP), or verify it with `python benchmarks/model_matrix.py --family {family}`")
    return _config_support(config, name, {**ENGINE_SUPPORTS, **(engine or {})})


def _config_support(config, name: str, engine: Mapping[str, bool]) -> ModelSupport:
    limits = []
    for cfg in _configs(config):
        _check_causal(cfg, name)
        limits += _layer_limits(cfg, name, engine) + _rope_limits(cfg, name)
        _check_scaling(cfg, name)
    return ModelSupport(name, tuple(dict.fromkeys(limits)))


def _matrix(matrix: verified_models.Matrix | None) -> verified_models.Matrix:
    """The matrix to apply; says once (a warning and the log) when it is not the installed release's own."""
    matrix = matrix or verified_models.current()
    if not matrix.in_range and matrix.installed not in _WARNED:
        _WARNED.add(matrix.installed)
        text = out_of_range_message(matrix)
        logger.warning(text)
        warnings.warn(text, UserWarning, stacklevel=3)
    return matrix


def out_of_range_message(matrix: verified_models.Matrix) -> str:
    """What the guard says once when the installed transformers has no matrix of its own."""
    return (f"hf_fcp: transformers {matrix.installed} is installed, outside the releases hf_fcp has verified "
            f"exact ({matrix.describe_range()}; setup.cfg declares that range). FCP applies the transformers "
            f"{matrix.transformers} model matrix: families verified there are accepted, and module classes new in "
            f"their modeling files are trusted unless they look like token mixers. To verify this release, run "
            f"`{verified_models.REGENERATE}` (it writes the matrix for the installed transformers), or install a "
            f"verified release (pip install 'transformers>={matrix.verified[0]},<"
            f"{verified_models.minor(matrix.verified[-1])[0]}.{verified_models.minor(matrix.verified[-1])[1] + 1}')")


def _matrix_name(matrix: verified_models.Matrix) -> str:
    own = "" if matrix.in_range else f", applied to the installed {matrix.installed}"
    return f"the model matrix, transformers {matrix.transformers}{own}"


def on_attention_call(module: torch.nn.Module) -> ModelSupport:
    """At a planned call of the ``"fcp"`` attention function: the model's checked support, checking the
    model on its first call (the model whose forward is running, found from the calling frames; when it
    cannot be found, the attention module and the config)."""
    support = _SUPPORT.get(module)
    if support is not None:
        return support
    root = _calling_model(module)
    if root is not None:
        return check_model(root)
    name = type(module).__name__
    support = (_config_support(module.config, name, ENGINE_SUPPORTS) if hasattr(module, "config")
               else ModelSupport(name))
    _check_modules(module, name, _matrix(None), set())
    _SUPPORT[module] = support
    return support


def require_plan(module: torch.nn.Module) -> None:
    """A call without ``fcp_plan`` inside a distributed FCP run (an FCP group of more than one rank bound by
    ``FCPPlugin.setup`` / ``hf_fcp.comm.set_default_group``) would treat this rank's pieces as whole
    documents: refuse it."""
    group = comm.bound_group()  # fixed state bound at setup (not WORLD by default)
    if group is None or torch.distributed.get_world_size(group) < 2:
        return
    layer = getattr(module, "layer_idx", None)
    raise ValueError(
        f"{type(module).__name__}{'' if layer is None else f' (layer {layer})'}: got no fcp_plan inside a "
        f"distributed FCP run ({torch.distributed.get_world_size(group)} ranks), expected the batch's plan in every "
        f"attention layer; either a decoder layer of this model does not pass **kwargs on to its attention (the "
        f"model cannot run FCP), or the model was called outside the FCP dataloader (e.g. generate() during "
        f"training: call it after FCPPlugin.teardown(), or on a copy with model.set_attn_implementation('sdpa'))")


# ----------------------------------------------------------------------------- per-layer facts
def layer_window(module: torch.nn.Module, sliding_window: int | None = None) -> int | None:
    """The sliding window a layer applies (queries see the ``w`` latest keys, themselves included): the
    ``sliding_window`` keyword transformers passed, else what the config says for this layer (some models,
    e.g. Qwen2-MoE, slide through the mask only; :func:`.layer_kinds.layer_window`)."""
    if sliding_window:
        return int(sliding_window)
    config = getattr(module, "config", None)
    return None if config is None else layer_kinds.layer_window(config, getattr(module, "layer_idx", None))


def layer_chunk(module: torch.nn.Module) -> int | None:
    """The attention chunk of a layer (Llama 4: keys in the query's ``chunk``-aligned chunk only)."""
    config = getattr(module, "config", None)
    chunk = getattr(config, "attention_chunk_size", None)
    kind = _layer_kind(config, getattr(module, "layer_idx", None)) if config is not None else None
    return int(chunk) if chunk and kind in ("chunked_attention", None) else None


def _layer_kind(config, layer_idx) -> str | None:
    kinds = getattr(config, "layer_types", None)
    if kinds is None or layer_idx is None or layer_idx >= len(kinds):
        return None
    return kinds[layer_idx]


# ----------------------------------------------------------------------------- checks
def _check_modules(model: torch.nn.Module, name: str, matrix: verified_models.Matrix, extra: set[str]) -> None:
    adapters.check_adapters(model, name)  # PEFT: virtual-token adapters refused, token-local ones verified
    allowed = matrix.classes | _EXTRA_CLASSES | extra | adapters.verified_classes()
    unverified = []
    for path, module in model.named_modules():
        unverified += [(path or "(the model)", module, f"{c.__module__}.{c.__qualname__}")
                       for c in _checked_classes(type(module)) if f"{c.__module__}.{c.__qualname__}" not in allowed
                       and not _new_in_verified_module(c, module, matrix)]
    if unverified:  # a token mixer names the real reason; else the first unverified module (the model's class)
        path, module, qualname = next((u for u in unverified if _mixes_tokens(u[1])), unverified[0])
        raise ValueError(_unverified_message(name, path, module, qualname, model, matrix))


def _new_in_verified_module(cls: type, module: torch.nn.Module, matrix: verified_models.Matrix) -> bool:
    """Outside the verified range only: a class the matrix does not list, defined in a modeling file whose
    other classes it verified (new in a minor release of a verified family), that does not look like a
    token mixer."""
    return (not matrix.in_range and cls.__module__ in matrix.modules and cls.__module__.startswith("transformers.")
            and not _mixes_tokens(module))


def _checked_classes(cls) -> list[type]:
    """The class, or for a wrapper created around it (FSDP2's ``FSDP<Name>``) the wrapped classes."""
    if cls.__module__.startswith(TRANSPARENT_PREFIXES):
        return [b for b in cls.__bases__ if b is not object and not b.__module__.startswith(TRANSPARENT_PREFIXES)
                and b is not torch.nn.Module]
    return [cls]


def _unverified_message(name: str, path: str, module, qualname: str, model, matrix: verified_models.Matrix) -> str:
    family = getattr(getattr(model, "config", None), "model_type", None)
    note = matrix.notes.get(family)
    found = f" The model matrix found for {family!r}: {note}." if note else ""
    if _mixes_tokens(module):
        return (f"{name}: token mixing outside attention: {path} ({type(module).__name__}) carries information along "
                f"the sequence (state-space / recurrent / convolution / linear-attention layer), so a rank holding a "
                f"middle piece of a document would compute it without the document's earlier tokens — silently "
                f"wrong. FCP trains only models whose layers outside attention are token-local; train this model "
                f"with plain data parallelism (attn_implementation='sdpa' and DDP/FSDP)")
    what = (f"model_type {family!r} is not among the families" if path == "(the model)" else
            f"module {path} ({qualname}) is not among the modules")
    return (f"{name}: {what} FCP has verified exact ({_matrix_name(matrix)}).{found} Unverified models are "
            f"refused: a layer that mixes tokens along the sequence outside attention, or positions computed from the "
            f"forward's length, make FCP silently wrong; verify it with `python benchmarks/model_matrix.py --family "
            f"{family or '<model_type>'}` and trust its classes with "
            f"hf_fcp.integrations.model_support.allow_classes(...)")


def _mixes_tokens(module) -> bool:
    """A layer that looks like a token mixer: a known mixer name or a 1D convolution inside (a whole model —
    its name may say "Mamba" — is not a layer)."""
    if hasattr(module, "config") and hasattr(module, "base_model_prefix"):
        return False
    name = type(module).__name__.lower().replace("_", "")
    return any(h in name for h in MIXER_HINTS) or any(isinstance(c, torch.nn.Conv1d) for c in module.children())


def _configs(config) -> list:
    """The config and its text config (composite models keep the decoder's settings there)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _check_causal(cfg, name: str) -> None:
    bidirectional = getattr(cfg, "use_bidirectional_attention", False)  # "vision": among image tokens only,
    if bidirectional not in (False, None, "vision") or getattr(cfg, "is_causal", True) is False:  # not in text
        raise ValueError(f"{name}: got bidirectional attention (use_bidirectional_attention={bidirectional!r}, "
                         f"is_causal={getattr(cfg, 'is_causal', None)!r}), expected causal attention; FCP computes "
                         f"causal attention within documents only (prefix-LM and bidirectional masks are not "
                         f"supported)")


def _layer_limits(cfg, name: str, engine: Mapping[str, bool]) -> list[Limit]:
    kinds = _declared_kinds(cfg, name)
    limits = []
    chunk = getattr(cfg, "attention_chunk_size", None)
    if chunk and ("chunked_attention" in kinds or not kinds) and not engine["chunked_attention"]:
        limits.append(Limit(int(chunk), f"chunked attention (attention_chunk_size={chunk})",
                            f"the FCP engine does not compute chunked attention: cut documents to at most {chunk} "
                            f"tokens"))
    return limits


def _declared_kinds(cfg, name: str) -> set[str]:
    kinds: set[str] = set()
    for key in LAYER_KIND_KEYS:
        values = getattr(cfg, key, None)
        if not isinstance(values, (list, tuple)):
            continue
        bad = sorted({str(v) for v in values} - set(ATTENTION_LAYER_KINDS))
        if bad:
            layers = [i for i, v in enumerate(values) if str(v) in bad]
            raise ValueError(f"{name}: got layer kinds {bad} in config.{key} (layers {layers[:8]}), expected only "
                             f"{sorted(ATTENTION_LAYER_KINDS)}; {_kind_reason(bad)}")
        kinds |= {str(v) for v in values}
    return kinds


def _kind_reason(bad: list[str]) -> str:
    if any("index" in k or "sparse" in k or "compress" in k for k in bad):
        return ("sparse / compressed attention selects keys with an indexer that needs the dense 4D mask FCP never "
                "builds; FCP cannot train this model")
    return ("token mixing outside attention: these layers carry information along the sequence (state-space, "
            "recurrent, convolution or linear attention), so a rank holding a middle piece of a document would "
            "compute them without the document's earlier tokens — silently wrong; train this model with plain data "
            "parallelism (attn_implementation='sdpa' and DDP/FSDP)")


def _rope_limits(cfg, name: str) -> list[Limit]:
    params = getattr(cfg, "rope_parameters", None) or {}
    sets = [p for p in params.values() if isinstance(p, dict)] or [params]
    limits = []
    for p in sets:
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{name}: got rope_type={rope_type!r}, expected one of {sorted(ROPE_TYPES)} (rope types "
                             f"verified for FCP); an unverified rope may depend on the forward's length")
        key = ROPE_TYPES[rope_type]
        if key:
            length = p.get(key) or getattr(cfg, key, None) or getattr(cfg, "max_position_embeddings")
            limits.append(Limit(int(length), f"rope_type={rope_type!r} (its frequencies switch on the "
                                f"longest position a forward sees)",
                                f"a rank sees only part of a long document and would pick other frequencies than "
                                f"one process running the document: cut documents to at most {length} tokens, or "
                                f"use a length-independent rope (e.g. 'yarn', 'linear' with the same factor)"))
    return limits


def _check_scaling(cfg, name: str) -> None:
    """Llama 4 scales queries of its no-rope layers by the token's index in the forward, not its position."""
    no_rope = getattr(cfg, "no_rope_layers", None)
    if getattr(cfg, "attn_temperature_tuning", False) and not (no_rope is not None and all(no_rope)):
        floor = getattr(cfg, "floor_scale", None)
        raise ValueError(f"{name}: got attention temperature tuning (attn_temperature_tuning=True), which scales "
                         f"queries by the token's index in the forward rather than its document position, so a rank "
                         f"would scale its pieces differently from one process; expected attn_temperature_tuning="
                         f"False (a no-op while documents and each rank's tokens stay below floor_scale={floor})")


def _calling_model(module):
    """The outermost transformers model whose forward is running and that holds ``module``."""
    from transformers import PreTrainedModel

    found, frame = None, inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, PreTrainedModel) and obj is not found and any(m is module for m in obj.modules()):
            found = obj
        frame = frame.f_back
    return found
