"""The model-support matrix over every causal-LM family of the installed transformers (hf_fcp.testing.matrix).

    python benchmarks/model_matrix.py                   # families + settings, printed as a table
    python benchmarks/model_matrix.py --write           # also regenerate the guard's allow-list
                                                        # (hf_fcp/integrations/verified_models.py) and
                                                        # docs/supported_models.md (the README's table)
    python benchmarks/model_matrix.py --family gemma2 --family llama   # some families only, no settings

Phase 1 runs every family with the all-gather reference attention ("fcp_reference"): a family exact there
has token-local modules and correct positions, and its module classes become the guard's allow-list.
Phase 2 runs the product ("fcp": guard, then one FCP step): every case must come out exact or refused.
Exit status 1 when a case is neither (silently wrong, or an unclear error).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_fcp.integrations.model_support import _mixes_tokens  # noqa: E402
from hf_fcp.testing import matrix  # noqa: E402

ALLOW_LIST = ROOT / "hf_fcp" / "integrations" / "verified_models.py"
TABLE = ROOT / "docs" / "supported_models.md"
ENGINE_WORDS = {"sliding-window": "sliding_window", "soft-capping": "softcap", "sinks": "attention_sinks",
                "chunked attention": "chunked_attention"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", action="append", help="model_type to run (repeatable; default: every family)")
    ap.add_argument("--write", action="store_true", help="regenerate the allow-list and docs/supported_models.md")
    args = ap.parse_args(argv)
    start = time.time()
    cases = matrix.family_cases(args.family)
    verified = matrix.run_matrix(cases, modes=("fcp_reference",))
    if args.write:
        write_allow_list(verified)
    product = matrix.run_matrix(cases + ([] if args.family else matrix.variant_cases()), modes=("fcp",))
    rows = [(case, product[case.name]) for case in cases + ([] if args.family else matrix.variant_cases())]
    failures = [(c.name, r) for c, r in rows if any(o.status in matrix.FAILURES for k, o in r.items()
                                                     if k != "reference")]
    text = render(rows, verified, time.time() - start)
    print(text)
    if args.write and not args.family:
        TABLE.write_text(text)
    for name, rec in failures:
        print(f"FAILED {name}: {rec}", file=sys.stderr)
    return 1 if failures else 0


# ----------------------------------------------------------------------------- allow-list
def outcome(record: dict, mode: str):
    """The case's outcome over W=2 and 3: the first non-exact one, else the exact one."""
    found = [o for k, o in record.items() if k != "reference" and k[1] == mode]
    return next((o for o in found if o.status != "exact"), found[0] if found else None)


def family_note(family: str, record: dict) -> str | None:
    """Why a family failed the reference run, from what it did and what it holds (None: verified)."""
    if record.get("reference") != "ok":
        return f"does not build from its config here ({record.get('reference', '')[:120]})"
    o = outcome(record, "fcp_reference")
    if o.status == "exact":
        return None
    if "needs fcp_plan" in o.detail:
        return "a decoder layer does not pass **kwargs on to its attention, so the batch's plan never reaches it"
    if "KeyError" in o.detail:
        return ("it picks its attention class itself and does not call transformers' attention interface (loading "
                "it with attn_implementation='fcp' fails with KeyError: 'fcp')")
    if "NoneType' object is not subscriptable" in o.detail:
        return "its sparse-attention indexer needs the dense 4D mask FCP never builds"
    mixer = next(((p, m) for p, m in _meta_model(family).named_modules() if _mixes_tokens(m)), None)
    if mixer:
        return (f"token mixing outside attention: {mixer[0]} ({type(mixer[1]).__name__}) carries information along "
                f"the sequence (state-space / recurrent / convolution / linear attention)")
    if "never called the attention interface" in o.detail:
        return ("it does not call transformers' attention interface (attention it computes itself), so "
                "attn_implementation='fcp' would be ignored")
    if o.status == "wrong":
        return ("not exact even with an exact attention: a layer outside attention mixes tokens along the "
                f"sequence, or positions are computed from the forward's length (worst gradient: "
                f"{o.detail.split('worst gradient ')[-1].split()[0]})")
    return f"fails with an attention that builds no mask ({o.detail[:160]})"


def _meta_model(family: str):
    from transformers import AutoModelForCausalLM

    from hf_fcp.testing.families import tiny_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")


def write_allow_list(verified: dict) -> None:
    import transformers

    classes: dict[str, set[str]] = {}
    exact, notes = [], {}
    for family, record in verified.items():
        note = family_note(family, record)
        if note:
            notes[family] = note
            continue
        exact.append(family)
        for name in matrix.module_classes(_meta_model(family)):
            module, _, cls = name.rpartition(".")
            classes.setdefault(module, set()).add(cls)
    head = ALLOW_LIST.read_text().split("TRANSFORMERS_VERSION =")[0]
    body = [f"TRANSFORMERS_VERSION = {transformers.__version__!r}",
            f"EXACT_FAMILIES: tuple[str, ...] = (\n{_wrap(exact)})",
            "FAMILY_NOTES: dict[str, str] = {  # why the other families are not verified",
            *[f"    {k!r}: {v!r}," for k, v in sorted(notes.items())], "}",
            "_CLASSES: dict[str, str] = {",
            *[f"    {m!r}: {' '.join(sorted(c))!r}," for m, c in sorted(classes.items())], "}"]
    tail = ALLOW_LIST.read_text().split("\n\n\n@functools.cache")[1]
    ALLOW_LIST.write_text(head + "\n".join(body) + "\n\n\n@functools.cache" + tail)


def _wrap(names: list[str], width: int = 112) -> str:
    lines, line = [], "   "
    for n in names:
        item = f" {n!r},"
        if len(line) + len(item) > width:
            lines.append(line)
            line = "   "
        line += item
    return "\n".join(lines + [line])


# ----------------------------------------------------------------------------- table
def why(o) -> str:
    text = o.detail.split(": ", 1)[-1] if o.status == "refused" else o.detail
    text = text.split("; ")[0].replace("|", "/")
    return text[:220] + ("…" if len(text) > 220 else "")


def engine_feature(o) -> str:
    return next((f" (engine feature `{f}`)" for w, f in ENGINE_WORDS.items() if w in o.detail), "")


def render(rows, verified: dict, seconds: float) -> str:
    import transformers

    fams = [(c, r) for c, r in rows if c.variant == "default"]
    variants = [(c, r) for c, r in rows if c.variant != "default"]
    counts: dict[str, int] = {}
    for _, r in fams:
        status = outcome(r, "fcp").status
        counts[status] = counts.get(status, 0) + 1
    out = ["# Supported models", "",
           f"Generated by `python benchmarks/model_matrix.py --write` (transformers {transformers.__version__}, "
           f"torch {torch.__version__}, {seconds:.0f} s on 2 CPU cores) — do not edit by hand.", "",
           "Every causal-LM family in transformers' auto-mapping, built from its config class with tiny sizes "
           "(hidden 32, 2+ layers, 4 experts, vocabulary 128; float64), one training step with FCP on 2 and 3 "
           "gloo ranks (documents of 64, 1, 7, 1, 11 and 4 tokens: the first spans every rank) against one "
           "process running each document on its own: **exact** = loss within 1e-5 and every gradient within "
           "1e-4 relative on both; **refused** = `FCPPlugin.prepare_model` / `FCPTrainer` / "
           "`check_config` raise a `ValueError` naming the model, the feature and the way out; **not built** = "
           "the family does not build from its config here (FCP refuses it as unverified). A case that is "
           "neither exact nor refused fails `tests/test_model_matrix.py`.", "",
           f"Families: {len(fams)} — " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".", "",
           "| family | FCP | why (the guard's message, shortened) |", "|---|---|---|"]
    for case, record in fams:
        o = outcome(record, "fcp")
        status = o.status if record.get("reference") == "ok" else "not built"
        note = "" if status == "exact" else why(o) + engine_feature(o)
        out.append(f"| {case.family} | {status} | {note} |")
    out += ["", "## Settings that change attention or positions", "",
            "| family | setting | FCP | why |", "|---|---|---|---|"]
    for case, record in variants:
        o = outcome(record, "fcp")
        note = "" if o.status == "exact" else why(o) + engine_feature(o)
        out.append(f"| {case.family} | {case.variant} | {o.status} | {note} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
