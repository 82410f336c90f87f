"""The model-support matrix: every causal-LM family (and the settings that change attention or positions)
trained one step with FCP on 2 and 3 gloo ranks against one process running EACH DOCUMENT ON ITS OWN.

A case is a family (:mod:`.families`) with config overrides. Modes:

* ``"fcp"``: the product. ``check_config`` before loading, ``check_model`` after, then one FCP step; the
  outcome is ``exact`` (loss within 1e-5, every gradient within 1e-4 relative of the reference),
  ``refused`` (a ``ValueError``: the guard's clear error) — or a FAILURE: ``wrong`` (ran, silently wrong)
  or ``error`` (any other exception: an unclear error).
* ``"fcp_reference"``: every layer outside attention on local tokens, attention by an all-gather reference
  (:mod:`.reference_attention`): ``exact`` means the family's modules are token-local and its positions
  right — what ``benchmarks/model_matrix.py`` lists as verified module classes.

:func:`run_matrix` spawns one group of 3 ranks for all cases; the last rank computes each reference while
ranks 0-1 run W=2. Documents: one longer than a third of the batch (it spans every rank), 1-token ones.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .families import TOKEN_LIMIT, build_model, tiny_config
from .models import labelled_documents

LENS = (64, 1, 7, 1, 11, 4)  # document 0 spans every rank of 2 and 3 (block 8); two 1-token documents
BLOCK = 8
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
MODES = ("fcp", "fcp_reference")
FAILURES = ("wrong", "error")


@dataclass(frozen=True)
class Case:
    """One family with config overrides (``variant`` names them in the table). ``unguarded`` switches
    refusals off for this case in ``"fcp"`` mode, to show the matrix catches what they prevent: engine
    features of :data:`~hf_fcp.integrations.model_support.ENGINE_SUPPORTS` turned on without an engine,
    or ``"modules"`` (the model's own classes trusted as token-local)."""

    family: str
    variant: str = "default"
    overrides: dict = field(default_factory=dict, hash=False, compare=False)
    lens: tuple[int, ...] = LENS
    unguarded: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.family if self.variant == "default" else f"{self.family}[{self.variant}]"


@dataclass
class Outcome:
    """What one mode did on one world size: ``exact`` / ``refused`` / ``wrong`` / ``error`` / ``not built``."""

    status: str
    detail: str = ""
    loss_err: float = 0.0
    grad_err: float = 0.0


def _rope(rope_type: str, **params) -> dict:
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, **params}}


def variant_cases() -> list[Case]:
    """The non-default settings that change attention or positions (documents of up to 64 tokens): every
    rope type (the length-dependent ones below and above their switch length), sliding windows shorter
    and longer than the documents (plain flag, per-model flag, layer-type mixes), chunked attention,
    attention temperature tuning, sinks, soft-capping, MLA."""
    short, long = {"original_max_position_embeddings": 32}, {"original_max_position_embeddings": 128}  # phi3:
    # the top-level original_max_position_embeddings overrides the rope parameter's
    factors = {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4}  # one per rotary frequency (head dim 8)
    cases = [Case("llama", f"rope {t}", _rope(t, **p)) for t, p in (
        ("linear", {"factor": 2.0}), ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16}),
        ("yarn", {"factor": 4.0, **short}), ("proportional", {"factor": 2.0, "partial_rotary_factor": 0.5}))]
    cases += [Case("llama", "rope dynamic, documents beyond its switch", {**_rope("dynamic", factor=2.0),
                                                                         "max_position_embeddings": 32}),
              Case("llama", "rope dynamic, documents within its switch", {**_rope("dynamic", factor=2.0),
                                                                         "max_position_embeddings": 128}),
              Case("phi3", "rope longrope, documents beyond its switch", {**_rope(
                  "longrope", **factors, **short), "max_position_embeddings": 256, **short}),
              Case("phi3", "rope longrope, documents within its switch", {**_rope(
                  "longrope", **factors, **long), "max_position_embeddings": 256, **long})]
    window = {"sliding_window": 6}  # the longest document is 10x longer
    cases += [Case("mistral", "sliding window 6", window), Case("mistral", "sliding window 1", {"sliding_window": 1}),
              Case("mistral", "sliding window 128", {"sliding_window": 128}),
              Case("qwen2", "use_sliding_window, window 6", {"use_sliding_window": True, **window,
                                                              "max_window_layers": 1, "layer_types": None}),
              Case("qwen2_moe", "use_sliding_window, window 6", {"use_sliding_window": True, **window,
                                                                  "max_window_layers": 2, "layer_types": None}),
              Case("gemma3_text", "sliding layers, window 6", window),
              Case("cohere2", "sliding layers, window 6", window),
              Case("olmo3", "sliding layers, window 6", window), Case("gpt_oss", "sliding layers, window 6", window),
              Case("gemma2", "soft-capping 0.01, window 6", {"attn_logit_softcapping": 0.01, **window})]
    cases += [Case("llama4_text", "chunked attention 8", {"attention_chunk_size": 8, "attn_temperature_tuning": False}),
              Case("llama4_text", "chunked attention 128", {"attention_chunk_size": 128,
                                                              "attn_temperature_tuning": False}),
              Case("gemma2", "soft-capping 0.01", {"attn_logit_softcapping": 0.01}),  # 50 is invisible at tiny scale
              Case("gemma2", "no soft-capping", {"attn_logit_softcapping": None})]
    return cases


def family_cases(families=None) -> list[Case]:
    """One default case per family (every causal-LM family of the installed transformers by default)."""
    from .families import causal_lm_families

    return [Case(f) for f in (families or causal_lm_families())]


def documents(lens=LENS, seed: int = 0) -> list[dict]:
    """The global batch: ids in [3, TOKEN_LIMIT); the first document's first tokens carry no loss."""
    return labelled_documents(lens, TOKEN_LIMIT, 4, seed)


def _label_count(examples) -> int:
    return sum(sum(x != -100 for x in e["labels"][1:]) for e in examples)


def _token_loss(logits, shift_labels, count):
    """Summed next-token cross entropy over the labelled tokens / the global label count (fp32)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(flat, shift_labels.reshape(-1), ignore_index=-100,
                                             reduction="sum") / count


def flat_grads(model) -> torch.Tensor:
    """Every parameter's gradient (zeros where none) in ``named_parameters`` order, as one vector."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for _, p in model.named_parameters()])


def per_document_reference(model, examples) -> torch.Tensor:
    """One process, each document alone (positions 0..n-1): [loss, *gradients] of ``model`` (eager)."""
    count = _label_count(examples)
    total = 0.0
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        shift = torch.tensor([e["labels"][1:] + [-100]])
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits
        loss = _token_loss(logits, shift, count)
        loss.backward()
        total += float(loss.detach())
    return torch.cat([torch.tensor([total]), flat_grads(model)])


def sharded_step(model, rank: int, size: int, examples, block: int = BLOCK) -> torch.Tensor:
    """One FCP step on this rank's shard: [loss, *gradients], NOT yet summed over ranks."""
    from ..integrations.collator import FCPCollator
    from ..integrations.layer_kinds import attention_layers
    from ..plan import PlanSettings

    settings = PlanSettings(block_size=block, attention_layers=attention_layers(model.config))
    batch = FCPCollator(world_size=size, rank=rank, settings=settings)(examples)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], fcp_plan=batch["fcp_plan"],
                   use_cache=False).logits
    loss = _token_loss(logits, batch["shift_labels"], _label_count(examples))
    loss.backward()
    return torch.cat([loss.detach().reshape(1), flat_grads(model)])


def compare(got: torch.Tensor, ref: torch.Tensor, names: list[str], sizes: list[int]) -> Outcome:
    """``exact`` when the loss is within LOSS_TOL and every parameter's gradient within GRAD_TOL (relative,
    2-norm); a gradient that is zero in exact arithmetic (e.g. a key bias: softmax ignores it) is measured
    against 1e-6 of the whole gradient's norm instead of its own rounding noise. Else ``wrong``."""
    loss_err = abs(float(got[0] - ref[0])) / max(abs(float(ref[0])), 1e-30)
    floor = 1e-6 * float(ref[1:].norm())
    worst, worst_name, start = 0.0, "", 1
    for name, n in zip(names, sizes):
        g, r = got[start:start + n], ref[start:start + n]
        start += n
        err = float((g - r).norm()) / max(float(r.norm()), floor, 1e-30)
        if err > worst:
            worst, worst_name = err, name
    if loss_err <= LOSS_TOL and worst <= GRAD_TOL:
        return Outcome("exact", "", loss_err, worst)
    return Outcome("wrong", f"loss error {loss_err:.1e}, worst gradient {worst_name} {worst:.1e}", loss_err, worst)


# ----------------------------------------------------------------------------- workers
def _build(case: Case, impl: str):
    return build_model(case.family, impl, config=tiny_config(case.family, **case.overrides))


def _run_mode(case: Case, mode: str, rank: int, size: int, group, examples):
    """(Outcome or None, vector or None): the outcome when decided here, else this rank's [loss, grads]."""
    from ..integrations import model_support
    from .reference_attention import CALLS

    engine = {f: True for f in case.unguarded if f in model_support.ENGINE_SUPPORTS}
    try:
        if mode == "fcp" and "modules" not in case.unguarded:
            model_support.check_config(tiny_config(case.family, **case.overrides), engine=engine)
        model = _build(case, mode)
        if mode == "fcp":
            trusted = module_classes(model) if "modules" in case.unguarded else ()
            model_support.check_model(model, engine=engine, extra_classes=trusted)
        CALLS[0] = 0
        vec = sharded_step(model, rank, size, examples)
        if mode == "fcp_reference" and CALLS[0] == 0:
            return Outcome("wrong", "never called the attention interface"), None
        return None, vec
    except ValueError as err:
        return Outcome("refused", str(err)), None
    except Exception as err:  # noqa: BLE001 — an unclear error is a matrix failure, reported with its origin
        return Outcome("error", f"{type(err).__name__}: {err} | {_origin()}"), None


def module_classes(model) -> set[str]:
    """Qualified names of every module class in ``model``."""
    return {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}


def _origin() -> str:
    frames = traceback.extract_tb(__import__("sys").exc_info()[2])
    return " < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[-3:])


def _agree(local: Outcome | None, vec, group):
    """Every rank's outcome (refusals and errors are deterministic, but never trust that: all-gather)."""
    outcomes = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, local, group=group)
    decided = next((o for o in outcomes if o is not None), None)
    if decided is not None:
        return decided, None
    dist.all_reduce(vec, group=group)
    return None, vec


def matrix_worker(rank: int, world: int, cases: list[Case], modes=MODES, timeout_s: float = 60.0) -> dict:
    """Inside a spawned gloo rank: every case, every mode, W = 2..world. Returns (rank 0)
    ``{case name: {"reference": str, (W, mode): Outcome}}``."""
    import transformers

    from ..engine import comm
    from ..integrations.transformers import register
    from .reference_attention import register_reference

    transformers.logging.set_verbosity_error()
    register()
    register_reference()
    comm.set_timeout(timeout_s)
    groups = {size: dist.new_group(list(range(size))) for size in range(2, world + 1)}
    results = {}
    for case in cases:
        results[case.name] = _case(case, rank, world, groups, modes)
    return results if rank == 0 else {}


def _case(case: Case, rank: int, world: int, groups, modes) -> dict:
    examples = documents(case.lens)
    ref = _reference(case, examples) if rank == world - 1 else None
    vectors, record = {}, {}
    for size, group in groups.items():
        if rank >= size:
            continue
        comm_bind(group)
        try:
            for mode in modes:
                outcome, vec = _agree(*_run_mode(case, mode, rank, size, group, examples), group)
                record[size, mode] = outcome
                vectors[size, mode] = vec
        finally:
            comm_bind(None)
    box = [ref]
    dist.broadcast_object_list(box, src=world - 1)
    ref = box[0]
    if rank != 0:
        return {}
    if isinstance(ref, str):  # the reference did not build or run: the family is out of the matrix
        return {"reference": ref, **{key: Outcome("not built", ref) for key in record}}
    names, sizes = ref[1], ref[2]
    for key, vec in vectors.items():
        if vec is not None:
            record[key] = compare(vec, ref[0], names, sizes)
    return {"reference": "ok", **record}


def comm_bind(group) -> None:
    from ..engine import comm

    comm.set_default_group(group)


def _reference(case: Case, examples):
    """(vector, parameter names, sizes) of the per-document reference, or the error text."""
    try:
        model = _build(case, "eager")
        vec = per_document_reference(model, examples)
        params = list(model.named_parameters())
        return vec, [n for n, _ in params], [p.numel() for _, p in params]
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err)[:300]}"


def run_matrix(cases: list[Case], world: int = 3, modes=MODES, timeout: float = 1800.0) -> dict:
    """All cases on one spawn of ``world`` gloo ranks; ``{case name: record}`` (see :func:`matrix_worker`)."""
    from .spawn import run_workers

    return run_workers(matrix_worker, world, cases, modes, timeout=timeout)[0]
