"""Sequence-length workloads (DESIGN.md §4), global batches filled to a token budget, and the files of this
machine's Python standard library (the embedded corpus and the ``stdlib`` workload). Used by the simulator,
the benchmarks, the tests and the embedded training defaults; numpy only.

Distributions (``parse_distribution(spec)``):

* ``lognormal[:mu,sigma,max]`` — lognormal on tokens, truncated (resampled) above ``max``; default
  μ=6.35, σ=2.34, max 2M, which reproduces ByteScale's production statistics (80% ≤ 4K tokens, 1% ≥ 128K
  holding ~half of the tokens).
* ``paper`` — the same lognormal truncated at 512K (the FCP paper's trace).
* ``light`` — a lighter tail: σ = 1.5, max 2M.
* ``bimodal[:p_long]`` — short documents uniform in 0.5–2K plus, with probability ``p_long`` (default
  0.006, about half the tokens), long ones log-uniform in 64K–512K.
* ``stdlib`` — real lengths measured on this machine: the Python standard library's ``.py`` files as
  documents, tokens ≈ bytes / 4 (BPE tokenizers average ~4 bytes per token on English and code).
* ``file:PATH`` — empirical lengths from a file (JSON list or one integer per line, :func:`read_lengths`).

A batch is filled to exactly ``world_size × tokens_per_rank`` tokens by drawing lengths until the budget
is reached; the last sequence is cut to fit (never padded). Batches are seeded.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .plan.checks import check_seq_lens

K = 1024
M = 1024 * 1024
STDLIB_BYTES_PER_TOKEN = 4


@dataclass(kw_only=True, frozen=True)
class Distribution:
    """A sampler of sequence lengths; ``kind`` is ``lognormal``, ``bimodal`` or ``empirical``."""

    name: str
    """Spec it came from, for reports."""
    kind: str
    """``lognormal``, ``bimodal`` or ``empirical``."""
    mu: float = 6.35
    """lognormal: mean of log(tokens)."""
    sigma: float = 2.34
    """lognormal: standard deviation of log(tokens)."""
    max_len: int = 2 * M
    """lognormal: truncation point in tokens (draws above it are redrawn)."""
    p_long: float = 0.006
    """bimodal: probability that a document is long."""
    lengths: tuple[int, ...] = ()
    """empirical: the observed lengths, sampled with replacement."""

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` lengths (int64, ≥ 1)."""
        if self.kind == "lognormal":
            out = np.empty(0, np.int64)
            while out.size < n:
                x = np.rint(rng.lognormal(self.mu, self.sigma, size=2 * n))
                out = np.concatenate([out, x[x <= self.max_len].astype(np.int64)])
            return np.maximum(out[:n], 1)
        if self.kind == "bimodal":
            short = rng.integers(512, 2 * K + 1, size=n)
            long = np.rint(np.exp(rng.uniform(np.log(64 * K), np.log(512 * K), size=n))).astype(np.int64)
            return np.where(rng.random(n) < self.p_long, long, short)
        return np.asarray(self.lengths, np.int64)[rng.integers(0, len(self.lengths), size=n)]


def make_batch(dist: Distribution, total_tokens: int, rng: np.random.Generator) -> list[int]:
    """Lengths drawn from ``dist`` until they sum to exactly ``total_tokens`` (the last one is cut)."""
    out: list[int] = []
    have = 0
    while have < total_tokens:
        draw = dist.sample(rng, 256)
        cum = have + np.cumsum(draw)
        stop = int(np.searchsorted(cum, total_tokens))  # first index reaching the budget
        take = draw[: stop + 1].tolist()
        out.extend(take)
        have = int(cum[min(stop, len(cum) - 1)])
    out[-1] -= have - total_tokens
    return out


def make_batches(dist: Distribution, *, world_size: int, tokens_per_rank: int, steps: int,
                 seed: int = 0) -> list[list[int]]:
    """``steps`` seeded batches of ``world_size × tokens_per_rank`` tokens each."""
    return [make_batch(dist, world_size * tokens_per_rank, np.random.default_rng([seed, world_size, step]))
            for step in range(steps)]


def stdlib_files(max_documents: int | None = None, seed: int = 0) -> list[Path]:
    """The standard library's non-empty ``.py`` files (no site-packages), sorted; a seeded sample of
    ``max_documents`` of them when given."""
    files = _stdlib_files()
    if max_documents is not None and max_documents < len(files):
        pick = np.random.default_rng(seed).choice(len(files), size=max_documents, replace=False)
        files = tuple(files[i] for i in sorted(pick.tolist()))
    return list(files)


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = tuple(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()
                         and p.stat().st_size > 0))
    if not files:
        raise ValueError(f"no .py files found under the standard library at {root}")
    return files


@lru_cache(maxsize=1)
def stdlib_lengths() -> tuple[int, ...]:
    """Token counts (bytes / 4, at least 1) of every ``.py`` file of this interpreter's standard library."""
    return tuple(max(1, p.stat().st_size // STDLIB_BYTES_PER_TOKEN) for p in _stdlib_files())


def read_lengths(path: str) -> tuple[int, ...]:
    """Sequence lengths from ``path``: a JSON list of integers, or text with one integer per line (blank
    lines and ``#`` comments ignored). Raises ValueError naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"lengths file {path!r} does not exist (expected a JSON list or one length per line)")
    text = p.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        raise ValueError(f"lengths file {path!r} is empty: expected at least one sequence length")
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"lengths file {path!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(values, list):
            raise ValueError(f"lengths file {path!r} must hold a JSON list of integers")
        return check_seq_lens(values)
    values = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            values.append(int(line))
        except ValueError:
            raise ValueError(f"lengths file {path!r} line {n}: {line!r} is not an integer length") from None
    return check_seq_lens(values)


def parse_distribution(spec: str) -> Distribution:
    """A :class:`Distribution` from a spec string (see the module docstring)."""
    name, _, args = spec.partition(":")
    if name == "file":
        return Distribution(name=spec, kind="empirical", lengths=read_lengths(args))
    if name == "stdlib" and not args:
        return Distribution(name=spec, kind="empirical", lengths=stdlib_lengths())
    if name == "paper" and not args:
        return Distribution(name=spec, kind="lognormal", max_len=512 * K)
    if name == "light" and not args:
        return Distribution(name=spec, kind="lognormal", sigma=1.5)
    nums = _numbers(spec, args)
    if name == "lognormal" and len(nums) in (0, 3):
        mu, sigma, max_len = nums or (6.35, 2.34, 2 * M)
        if sigma <= 0 or max_len < 1:
            raise ValueError(f"distribution {spec!r}: expected sigma > 0 and max >= 1, got sigma={sigma}, "
                             f"max={max_len}")
        return Distribution(name=spec, kind="lognormal", mu=mu, sigma=sigma, max_len=int(max_len))
    if name == "bimodal" and len(nums) in (0, 1):
        p_long = nums[0] if nums else 0.006
        if not 0 <= p_long <= 1:
            raise ValueError(f"distribution {spec!r}: p_long must be in [0, 1], got {p_long}")
        return Distribution(name=spec, kind="bimodal", p_long=p_long)
    raise ValueError(f"distribution must be one of lognormal[:mu,sigma,max], paper, light, bimodal[:p_long], "
                     f"stdlib, file:PATH; got {spec!r}")


def _numbers(spec: str, args: str) -> list[float]:
    if not args:
        return []
    try:
        return [float(a) for a in args.split(",")]
    except ValueError:
        raise ValueError(f"distribution {spec!r}: parameters must be numbers separated by commas, "
                         f"got {args!r}") from None
