"""Every causal-LM family of the installed transformers as a tiny random-init model, built from its config
class alone (no download): the families of the model-support matrix (``hf_fcp.testing.matrix``).

:func:`causal_lm_families` lists them from transformers' auto-mapping; :func:`tiny_config` shrinks a
family's default config generically (:data:`SIZES`: hidden sizes, heads, layers, experts, vocabulary;
per-layer lists cut to one layer of each kind) plus the few per-family settings in :data:`FIXES` that
its default config needs to build at all; :func:`build_model` makes the model (the same weights for the
same seed). Input ids of the matrix stay below :data:`TOKEN_LIMIT`; special ids live above it.
"""

from __future__ import annotations

import copy

import torch

VOCAB = 128
TOKEN_LIMIT = 100  # documents draw ids in [3, TOKEN_LIMIT); bos/eos/pad are 0/1/2, other special ids above
MAX_PARAMS = 3_000_000  # a tiny model bigger than this is not built (memory on a 2-core test machine)


def _sizes() -> dict[str, int]:
    table = {}
    for value, keys in (
        (32, "hidden_size d_model n_embd emb_dim embedding_dim embedding_size attention_hidden_size lru_width "
             "backbone_hidden_size word_embed_proj_dim input_embedding_size output_embedding_size d_rel "
             "hidden_size_per_layer_input ple_embed_dim"),
        (64, "intermediate_size ffn_dim decoder_ffn_dim encoder_ffn_dim dense_intermediate_size ffn_hidden_size "
             "intermediate_size_mlp feed_forward_size dff dim_ff d_inner"),
        (16, "moe_intermediate_size shared_expert_intermediate_size expert_ffn_hidden_size shared_intermediate_size "
             "moe_shared_expert_intermediate_size shared_experts_intermediate_size q_lora_rank kv_lora_rank "
             "o_lora_rank laurel_rank mamba_d_head mamba_head_dim mamba_headdim"),
        (4, "num_attention_heads n_head num_heads attention_heads decoder_attention_heads encoder_attention_heads "
            "n_heads swa_num_attention_heads num_decoder_attention_heads num_encoder_attention_heads index_n_heads "
            "linear_num_heads linear_num_key_heads linear_num_value_heads mamba_n_heads n_mamba_heads "
            "qk_rope_head_dim rotary_dim num_experts num_local_experts n_routed_experts moe_num_experts"),
        (8, "head_dim attention_head_dim d_head kv_channels swa_head_dim dim_head attention_head_size index_head_dim "
            "linear_key_head_dim linear_value_head_dim linear_head_dim qk_nope_head_dim v_head_dim mamba_d_state "
            "state_size ssm_state_size mamba_dt_rank time_step_rank index_topk"),
        (12, "qk_head_dim"),
        (2, "num_experts_per_tok moe_k moe_topk num_experts_per_token top_k_experts"),
        (1, "n_group num_expert_group topk_group first_k_dense_replace num_dense_layers moe_layer_start_index "
            "n_shared_experts num_shared_experts moe_num_shared_experts mamba_n_groups mamba_ngroups n_groups "
            "num_nextn_predict_layers"),
        (VOCAB, "vocab_size vocab_size_per_layer_input unpadded_vocab_size decoder_vocab_size "
                "pronunciation_vocab_size shape_vocab_size encoder_hash_byte_group_vocab"),
    ):
        table.update(dict.fromkeys(keys.split(), value))
    return table


SIZES = _sizes()
"""Config key → its tiny value (hidden 32, 4 heads of 8, 2 layers, 4 experts top-2, vocabulary 128)."""
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
              "num_decoder_layers", "num_encoder_layers")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "num_query_groups")
NESTED = ("text_config", "decoder_config", "attn_config", "ffn_config", "vision_config", "audio_config")

FIXES: dict[str, dict] = {
    # defaults that do not build in this transformers release, or that a generic shrink cannot infer
    "hunyuan_v1_dense": {"head_dim": 8}, "hunyuan_v1_moe": {"head_dim": 8}, "ministral": {"head_dim": 8},
    "nemotron": {"num_key_value_heads": 2},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "deepseek_v2": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1},
    "falcon_h1": {"mamba_d_ssm": 64},
    "zamba2": {"attention_head_dim": 16, "hybrid_layer_ids": [1]},
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"head_dim": 16},
    "zaya": {"num_experts_per_tok": 1},
    "bamba": {"attn_layer_indices": [1]},
    "xmod": {"languages": ["en_XX"], "default_language": "en_XX"},
}
"""Per-family settings on top of :data:`SIZES` (keys of the family's config, or of its text config)."""


FLOAT32 = {"xglm", "xlnet"}
"""Families whose code does not run in float64 (built in float32; the matrix's tolerances still hold)."""


def causal_lm_families() -> list[str]:
    """Every ``model_type`` with a causal-LM class in transformers' auto-mapping, in mapping order."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, **overrides):
    """The family's default config, shrunk (:data:`SIZES`, :data:`FIXES`), then ``overrides`` (applied to
    the text config when the family has one)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    kwargs = _shrink(cls().to_dict(), FIXES.get(model_type, {}), overrides)
    return cls(**kwargs)


def _shrink(d: dict, fixes: dict, overrides: dict, nested: bool = False) -> dict:
    """The changed keys only (a nested config: all of it), so that derived fields are derived again."""
    out = dict(d) if nested else {}
    for key, value in d.items():
        if isinstance(value, bool) or value is None:
            continue
        if key in SIZES and isinstance(value, int):
            out[key] = min(value, SIZES[key]) if key in ("n_shared_experts", "num_shared_experts") else SIZES[key]
        elif key in KV_HEAD_KEYS and isinstance(value, int):  # MQA, GQA and MHA stay what they are
            out[key] = 1 if value == 1 else SIZES["num_attention_heads"] if value == _heads(d) else 2
        elif isinstance(value, float) and any(w in key for w in ("dropout", "pdrop", "layerdrop", "jitter")):
            out[key] = 0.0
        elif key.endswith("_token_id") and isinstance(value, int) and value >= TOKEN_LIMIT:
            out[key] = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}.get(key, TOKEN_LIMIT + len(key) % 20)
        elif key.endswith("_token_id") and isinstance(value, list):
            out[key] = [1]
        elif key in NESTED and isinstance(value, dict):
            out[key] = _shrink(value, {}, overrides if key == "text_config" else {}, nested=True)
    if "qk_rope_head_dim" in d and "head_dim" in d:
        out["head_dim"] = SIZES["qk_rope_head_dim"]  # MLA: the rotary part
    if "is_decoder" in d:
        out["is_decoder"] = True
    _cut_layers(d, out)
    out.update(fixes)
    has_text = isinstance(out.get("text_config"), dict)
    if has_text:
        out["text_config"].update(fixes)
    (out["text_config"] if has_text and not nested else out).update(overrides)
    return out


def _heads(d: dict):
    return next((d[k] for k in ("num_attention_heads", "n_head", "num_heads", "n_heads") if k in d), None)


def _cut_layers(d: dict, out: dict) -> None:
    """Per-layer lists keep one layer of each kind (at least 2 layers, in order); index lists follow."""
    key = next((k for k in LAYER_KEYS if isinstance(d.get(k), int)), None)
    if key is None:
        return
    n = d[key]
    per_layer = {k: v for k, v in d.items() if isinstance(v, list) and len(v) == n and n > 2}
    kinds = next((v for k, v in per_layer.items() if len({str(x) for x in v}) > 1 and not _is_index_list(v, n)),
                 None)
    keep = sorted({kinds.index(x) for x in kinds}) if kinds else []
    keep = sorted(set(keep) | {i for i in range(n) if len(keep) + i < 2}) if len(keep) < 2 else keep[:4]
    out[key] = len(keep)
    for k, v in per_layer.items():
        if _is_index_list(v, n):
            out[k] = [keep.index(i) for i in v if i in keep] or [0]
        else:
            out[k] = [v[i] for i in keep]
    for k, v in d.items():
        if k not in per_layer and isinstance(v, list) and v and _is_index_list(v, n):
            out[k] = [keep.index(i) for i in v if i in keep]
        elif k == "per_layer_config" and isinstance(v, dict):
            out[k] = {f"{keep.index(int(i)):02d}": c for i, c in v.items() if int(i) in keep}


def _is_index_list(v: list, n: int) -> bool:
    return (all(isinstance(x, int) and not isinstance(x, bool) for x in v) and v == sorted(set(v))
            and max(v) < n and not set(v) <= {0, 1})


def build_model(model_type: str, impl: str, seed: int = 0, config=None, dtype=None, **overrides):
    """The family's tiny causal LM with ``attn_implementation=impl`` in ``dtype`` (default float64, but
    float32 for :data:`FLOAT32`: an exact
    model then agrees to ~1e-7, far inside the matrix's tolerances, and a wrong one stands out). Raises
    RuntimeError when it would exceed :data:`MAX_PARAMS`."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config if config is not None else tiny_config(model_type, **overrides))
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).parameters())
    if size > MAX_PARAMS:
        raise RuntimeError(f"{model_type}: the shrunk config still has {size} parameters (> {MAX_PARAMS})")
    dtype = dtype or (torch.float32 if model_type in FLOAT32 else torch.float64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=dtype, experts_implementation="eager")
    if hasattr(model, "set_default_language") and getattr(cfg, "default_language", None):
        model.set_default_language(cfg.default_language)
    return model
