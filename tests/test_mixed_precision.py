"""Mixed precision: attn_implementation="fcp" follows the autocast policy as sdpa does, and bf16/fp16 weights work.

* W = 2 and 3 spawned gloo ranks (one spawn): one training step of tiny Llama / Qwen2 models under
  ``torch.autocast("cpu", bfloat16)`` (what ``--bf16 true`` does) and with plain bf16 / fp16 weights equals
  the single-process sdpa step on the whole batch at the same precision;
* the attention function alone: under autocast q/k arrive in fp32 (RoPE upcasts) and v in bf16; the output
  is bf16 like sdpa's, and equals it.

Tolerances, and why: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3). Two exact algorithms that
round in different places — sdpa's one fused kernel on the whole batch vs FCP's block kernels merged by
log-sum-exp — differ by a few roundoffs per value, and those differences pass through 2 layers of
bf16 matmuls and the backward. Measured: gradients 0.6–1.0e-2 apart (relative 2-norm), the same size as sdpa's
own bf16-vs-fp32 distance (0.7–1.0e-2). So gradients must agree to 3e-2 and the loss to 1e-3, and — the
sharper check — FCP's distance to the fp32 result may be at most 1.5x sdpa's own (+1e-3): FCP adds no
error beyond the precision. A wrong attention pattern (a lost document boundary, a missing KV block) moves
gradients by O(1e-1..1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_fcp.integrations.transformers import fcp_attention_forward, register
from hf_fcp.testing import fcp_subgroups, run_workers
from hf_fcp.testing.helpers import BLOCK, LENS, VOCAB, rel
from hf_fcp.testing.models import fcp_step, reference_step, tiny_model

register()
GRAD_TOL, LOSS_TOL = 3e-2, 1e-3
# name: (model type, autocast dtype, weights dtype)
CASES = {"llama autocast bf16": ("llama", torch.bfloat16, None),
         "qwen2 autocast bf16": ("qwen2", torch.bfloat16, None),
         "llama autocast fp16": ("llama", torch.float16, None),
         "llama bf16 weights": ("llama", None, torch.bfloat16),
         "llama fp16 weights": ("llama", None, torch.float16)}


def unlabelled_documents(lens=LENS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (n,), generator=gen).tolist()} for n in lens]


def model(model_type: str, impl: str, weights: torch.dtype | None):
    m = tiny_model(model_type, impl, vocab_size=VOCAB)
    return m if weights is None else m.to(weights)


def worker(rank: int, world: int):
    out = {}
    for size, group in fcp_subgroups(rank, world):
        for name, (model_type, amp, weights) in CASES.items():
            out[size, name] = fcp_step(model(model_type, "fcp", weights), rank, size, group, unlabelled_documents(),
                                       BLOCK, amp=amp)
    return out


@pytest.fixture(scope="module")
def fcp_results():
    return run_workers(worker, 3, timeout=180)



@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", [2, 3])
def test_low_precision_step_matches_sdpa(world, name, fcp_results):
    model_type, amp, weights = CASES[name]
    ref_loss, ref_grads = reference_step(model(model_type, "sdpa", weights), unlabelled_documents(), amp=amp)
    fp32_loss, fp32_grads = reference_step(model(model_type, "sdpa", None), unlabelled_documents())
    loss, grads, _ = fcp_results[0][world, name]
    assert rel(loss, ref_loss) <= LOSS_TOL, (name, world, rel(loss, ref_loss))
    assert set(grads) == set(ref_grads)
    for key, ref in ref_grads.items():
        err = rel(grads[key], ref)
        assert err <= GRAD_TOL, f"{name} W={world} grad {key}: {err:.2e} > {GRAD_TOL}"
        ours, theirs = rel(grads[key], fp32_grads[key]), rel(ref, fp32_grads[key])
        assert ours <= 1.5 * theirs + 1e-3, f"{name} W={world} grad {key}: {ours:.2e} from fp32, sdpa {theirs:.2e}"


def test_attention_follows_autocast_like_sdpa():
    """fp32 q/k and bf16 v under autocast (as transformers hands them over): bf16 out, equal to sdpa's."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 24, 16, generator=gen), torch.randn(2, 2, 24, 16, generator=gen)
    v = torch.randn(2, 2, 24, 16, generator=gen).bfloat16()
    module = torch.nn.Module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fcp_attention_forward(module, q, k, v, None)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert out.dtype == want.dtype == torch.bfloat16
    assert rel(out, want) < 1e-2
    with pytest.raises(ValueError, match="expected torch.float32"):  # no autocast: mixed dtypes stay an error
        fcp_attention_forward(module, q, k, v, None)
    exact, _ = fcp_attention_forward(module, q, k, v.float(), None)
    assert exact.dtype == torch.float32
    assert rel(exact, F.scaled_dot_product_attention(q, k, v.float(), is_causal=True, enable_gqa=True)
               .transpose(1, 2)) < 1e-5
