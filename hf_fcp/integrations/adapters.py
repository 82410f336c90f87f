"""PEFT adapters under FCP: the token-local ones are trained exactly, the virtual-token ones are refused.

FCP runs every layer but attention on a rank's local tokens. An adapter that acts on each token by itself
(a low-rank update of a linear layer, a per-channel scale, a tuned layer norm) is token-local and keeps FCP
exact. An adapter that adds *virtual tokens* in front of each sequence (prompt tuning, prefix tuning,
p-tuning and their kin) is not: a rank holds pieces of several documents in one row, so the virtual tokens
would be prepended once per rank instead of once per document.

The guard (:mod:`.model_support`) trusts the classes of :data:`VERIFIED_ADAPTERS` like transformers'
verified classes, and calls :func:`check_adapters` to refuse the virtual-token kinds with one clear
``ValueError``. Each entry of :data:`VERIFIED_ADAPTERS` is checked by ``tests/test_peft.py`` (exact forward
and backward on 2 and 3 gloo ranks against one process); an entry without such a check fails that test.
Nothing here imports ``peft``: models without adapters never pay for it.
"""

from __future__ import annotations

import torch

VERIFIED_ADAPTERS: dict[str, tuple[str, ...]] = {
    "LORA": ("peft.tuners.lora.model.LoraModel", "peft.tuners.lora.layer.Linear",
             "peft.tuners.lora.dora.DoraLinearLayer"),  # LoRA, rsLoRA (a scale), DoRA (a magnitude vector)
    "IA3": ("peft.tuners.ia3.model.IA3Model", "peft.tuners.ia3.layer.Linear"),
    "LOHA": ("peft.tuners.loha.model.LoHaModel", "peft.tuners.loha.layer.Linear"),
    "LOKR": ("peft.tuners.lokr.model.LoKrModel", "peft.tuners.lokr.layer.Linear"),
    "VERA": ("peft.tuners.vera.model.VeraModel", "peft.tuners.vera.layer.Linear"),
    "LN_TUNING": ("peft.tuners.ln_tuning.model.LNTuningModel", "peft.tuners.ln_tuning.layer.LNTuningLayer"),
}
"""PEFT type → the adapter classes it adds, every one token-local (verified by ``tests/test_peft.py``)."""

WRAPPERS = ("peft.peft_model.PeftModel", "peft.peft_model.PeftModelForCausalLM",
            "torch.nn.modules.container.ParameterDict", "peft.tuners._buffer_dict.BufferDict")
"""PEFT's model wrapper and the containers adapters keep their weights in (hold no computation)."""

VIRTUAL_TOKEN_ADAPTERS = {
    "PROMPT_TUNING": "prompt tuning", "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "P_TUNING": "p-tuning", "PREFIX_TUNING": "prefix tuning", "CPT": "context-aware prompt tuning",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter)", "CARTRIDGE": "cartridge (a trained KV prefix)"}
"""PEFT types that add virtual tokens (or a learned key/value prefix) to every sequence: refused."""


def verified_classes() -> set[str]:
    """Qualified names of every PEFT class FCP trusts as token-local."""
    return {name for names in VERIFIED_ADAPTERS.values() for name in names} | set(WRAPPERS)


def check_adapters(model: torch.nn.Module, name: str) -> None:
    """Raise ``ValueError`` when ``model`` carries a PEFT adapter that adds virtual tokens, or one of a type
    not in :data:`VERIFIED_ADAPTERS`, naming the adapter and the way out. A model without adapters passes."""
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if not isinstance(configs, dict):
            continue
        for adapter, config in configs.items():
            kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
            if kind in VIRTUAL_TOKEN_ADAPTERS or getattr(config, "is_prompt_learning", False):
                raise ValueError(_virtual_token_message(name, adapter, kind, config))
            if kind not in VERIFIED_ADAPTERS:
                raise ValueError(f"{name}: PEFT adapter {adapter!r} is {kind or type(config).__name__} "
                                 f"({type(config).__name__}), which FCP has not verified exact; use a verified "
                                 f"token-local adapter ({_verified_names()}), or train it with plain data parallelism "
                                 f"(attn_implementation='sdpa' and DDP/FSDP)")


def _verified_names() -> str:
    return ", ".join(k.lower() for k in VERIFIED_ADAPTERS)


def _virtual_token_message(name: str, adapter: str, kind: str, config) -> str:
    what = VIRTUAL_TOKEN_ADAPTERS.get(kind, kind.lower() or type(config).__name__)
    verified = _verified_names()
    return (f"{name}: PEFT adapter {adapter!r} is {what} ({type(config).__name__}), which adds virtual tokens to "
            f"every sequence; under FCP a rank holds pieces of several documents in one row, so the virtual tokens "
            f"cannot be placed once per document and the result would be silently wrong. FCP refuses it: use a "
            f"token-local adapter ({verified}; DoRA and rsLoRA are LoraConfig(use_dora=True / use_rslora=True)), "
            f"or train {what} with plain data parallelism (attn_implementation='sdpa' and DDP/FSDP)")
