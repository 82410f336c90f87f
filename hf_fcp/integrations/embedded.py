"""A download-free setup for recipes, tests, benchmarks and notebooks.

* :func:`byte_tokenizer`: a byte-level ``PreTrainedTokenizerFast`` built in code (256 byte tokens plus
  ``<|endoftext|>`` and ``<|pad|>``), no vocabulary file;
* :func:`stdlib_corpus`: the Python standard library's ``.py`` files as documents (present on every
  machine that runs this package; real, long-tailed lengths; :func:`hf_fcp.workloads.stdlib_files`);
* :func:`tiny_config`: a tiny Llama/Qwen2/Mistral-style config for training from scratch on a CPU.
"""

from __future__ import annotations

from ..workloads import stdlib_files

EOS, PAD = "<|endoftext|>", "<|pad|>"


def byte_tokenizer():
    """Byte-level tokenizer: every UTF-8 byte is one token (ids 0..255), then EOS (256) and PAD (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map (the alphabet of ``tokenizers``' ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def stdlib_corpus(max_documents: int | None = None, seed: int = 0, max_bytes: int | None = None):
    """A ``datasets.Dataset`` with columns ``text`` and ``path``, one standard-library file per row."""
    from datasets import Dataset

    def rows():
        for path in stdlib_files(max_documents, seed):
            text = path.read_text(encoding="utf-8", errors="replace")
            yield {"text": text[:max_bytes] if max_bytes else text, "path": str(path)}

    return Dataset.from_list(list(rows()))


def tiny_config(model_type: str = "llama", *, vocab_size: int = 258, hidden_size: int = 32, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, max_positions: int = 65536, **overrides):
    """A tiny random-init decoder config (``llama``, ``qwen2`` or ``mistral``); GQA by default."""
    from transformers import AutoConfig

    if model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"model_type: got {model_type!r}, expected one of ['llama', 'qwen2', 'mistral']")
    settings = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=256,
                    eos_token_id=256, pad_token_id=257)
    if model_type == "mistral":
        settings["sliding_window"] = None
    return AutoConfig.for_model(model_type, **{**settings, **overrides})
