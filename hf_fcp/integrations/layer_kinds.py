"""The kinds of attention layer a transformers model runs, read from its config, for the planner.

``PlanSettings.attention_layers`` is ``((window or None, layers), ...)``: how many layers attend fully
(causal) and how many through each sliding window. The planner balances their summed kernel work and
gives every window its own smaller exchange; the attention function picks the layer's exchange from the
``sliding_window`` transformers passes it. This module reads those kinds the way transformers builds the
layers: ``config.layer_types`` (``"full_attention"`` / ``"sliding_attention"``) where the config has it,
else every layer slides when ``config.sliding_window`` is set (Mistral, Mixtral, Phi-3, Starcoder2).
"""

from __future__ import annotations

from collections import Counter

FULL, SLIDING = "full_attention", "sliding_attention"


def attention_layers(config) -> tuple[tuple[int | None, int], ...]:
    """``((window or None, layers), ...)`` of a transformers config (multimodal: its text config), in
    order of first use; ``((None, 1),)`` for a config without layer counts. Layer kinds other than full
    and sliding attention count as full here (the model-support guard refuses the ones FCP cannot run)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    windows = [layer_window(text, i) for i in range(_num_layers(text))]
    if not windows:
        return ((None, 1),)
    counts = Counter(windows)
    return tuple((w, counts[w]) for w in dict.fromkeys(windows))


def layer_window(config, layer_idx: int | None) -> int | None:
    """The sliding window (keys, the query's own included) of layer ``layer_idx``, or None (full)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None  # None, 0 (Qwen2-MoE without use_sliding_window) or no window at all
    kinds = getattr(config, "layer_types", None)
    if not kinds or layer_idx is None or layer_idx >= len(kinds):
        return window
    return window if kinds[layer_idx] == SLIDING else None


def _num_layers(config) -> int:
    kinds = getattr(config, "layer_types", None)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    return len(kinds) if kinds else 0
