"""A download-free chat setup for fine-tuning recipes, tests and benchmarks.

* :func:`chat_tokenizer`: the byte-level tokenizer (:func:`.embedded.byte_tokenizer`) with a chat template
  whose assistant turns sit inside ``{% generation %}`` markers (TRL's ``assistant_only_loss``), the
  end-of-turn token included;
* :func:`arithmetic_chats`: small seeded conversations ("What is 12 + 7?" → "12 + 7 = 19.") in TRL's dataset
  formats: conversational ``messages``, ``prompt``/``completion`` or plain ``text``. Learnable by a tiny
  model, so a short run shows the loss falling.
"""

from __future__ import annotations

import random

from .embedded import EOS, byte_tokenizer

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}" + EOS + "{% endgeneration %}\n"
    "{%- else -%}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>\n{%- endif -%}")
"""Turns as ``<|role|>\\n content \\n``; an assistant turn ends with EOS, inside the generation markers."""

FORMATS = ("messages", "prompt_completion", "text")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def chat_tokenizer():
    """:func:`.embedded.byte_tokenizer` with :data:`CHAT_TEMPLATE` (a new tokenizer each call)."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def arithmetic_chats(n: int, seed: int = 0, dataset_format: str = "messages", max_operand: int = 99):
    """A ``datasets.Dataset`` of ``n`` seeded arithmetic exchanges in one of :data:`FORMATS`:

    * ``messages``: ``[{"role": "system", ...}?, {"role": "user", ...}, {"role": "assistant", ...}, ...]``
      (one to three question/answer turns, a system message in every third conversation);
    * ``prompt_completion``: ``prompt`` (the question) and ``completion`` (the answer);
    * ``text``: question and answer in one string.
    """
    from datasets import Dataset

    if dataset_format not in FORMATS:
        raise ValueError(f"dataset_format: got {dataset_format!r}, expected one of {list(FORMATS)}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        extra_turns = rng.randrange(3 if dataset_format == "messages" else 1)
        turns = [_exchange(rng, max_operand) for _ in range(1 + extra_turns)]
        if dataset_format == "prompt_completion":
            rows.append({"prompt": turns[0][0], "completion": " " + turns[0][1]})
        elif dataset_format == "text":
            rows.append({"text": f"{turns[0][0]} {turns[0][1]}"})
        else:
            system = [{"role": "system", "content": "You are a calculator."}] if i % 3 == 0 else []
            rows.append({"messages": system + [m for q, a in turns for m in (
                {"role": "user", "content": q}, {"role": "assistant", "content": a})]})
    return Dataset.from_list(rows)


def _exchange(rng: random.Random, max_operand: int) -> tuple[str, str]:
    a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(list(OPS))
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {OPS[op](a, b)}."
