"""What the model-support matrix verified, per transformers release: package data and its loader.

``verified/transformers-<major>.<minor>.json`` (written by ``python benchmarks/model_matrix.py --write``) holds,
for one transformers release, the families that trained exactly under FCP with an all-gather reference
attention on 2 and 3 gloo ranks, why the others did not, and the module classes of the exact families
(the guard's allow-list: every layer outside attention token-local).

Policy (:func:`for_version`):

* **inside the verified range** (a release whose minor version has a file): that release's own matrix — a
  family and every module class are verified for exactly this minor release;
* **outside it** (a user forcing another transformers): the newest verified release before it (or the oldest
  verified one, for an older transformers), and
  :attr:`Matrix.in_range` False. The guard then says so once, with the versions and the command that
  verifies the installed release, and accepts a module class the matrix does not list only when it is
  defined in a modeling module the matrix verified (a class new in that family's file, e.g. a new norm)
  and does not look like a token mixer; families the matrix did not verify stay refused.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

PACKAGE_DIR = "verified"
REGENERATE = "python benchmarks/model_matrix.py --write"
"""The command that verifies the installed transformers and writes its matrix (and setup.cfg's bound)."""


@dataclass(frozen=True)
class Matrix:
    """One transformers release's verified families and classes.

    ``transformers`` is the release the matrix was generated on; ``installed`` the release it is applied to;
    ``verified`` every release with a matrix (ascending)."""

    transformers: str
    families: frozenset[str]
    notes: dict[str, str]
    classes: frozenset[str]
    installed: str
    verified: tuple[str, ...]

    @property
    def in_range(self) -> bool:
        """Whether the installed release has a matrix of its own (same major.minor)."""
        return minor(self.installed) == minor(self.transformers)

    @functools.cached_property
    def modules(self) -> frozenset[str]:
        """The Python modules of the verified classes (a family's modeling file among them)."""
        return frozenset(name.rpartition(".")[0] for name in self.classes)

    def describe_range(self) -> str:
        """``"5.24–5.25"``: the minor releases verified."""
        lo, hi = minor(self.verified[0]), minor(self.verified[-1])
        return ".".join(map(str, lo)) + ("" if lo == hi else "–" + ".".join(map(str, hi)))


def minor(version: str) -> tuple[int, int]:
    """``"5.25.0"`` / ``"5.25.0.dev0"`` → ``(5, 25)``."""
    parts = version.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def verified_versions() -> tuple[str, ...]:
    """Every transformers release with a matrix in the package, ascending."""
    names = [p.name for p in resources.files(__package__).joinpath(PACKAGE_DIR).iterdir()
             if p.name.startswith("transformers-") and p.name.endswith(".json")]
    found = [_load(n)["transformers"] for n in names]
    if not found:
        raise RuntimeError(f"hf_fcp's package data {PACKAGE_DIR}/transformers-*.json is missing (a broken install?)")
    return tuple(sorted(found, key=minor))


@functools.cache
def for_version(installed: str) -> Matrix:
    """The matrix that applies to transformers ``installed``: its own minor release's, else the newest older
    release's (a newer transformers keeps what its predecessor verified), else the oldest one's."""
    versions = verified_versions()
    key = minor(installed)
    older = [v for v in versions if minor(v) <= key]
    chosen = older[-1] if older else versions[0]  # its own, else the newest older one, else the oldest
    data = _load(f"transformers-{'.'.join(map(str, minor(chosen)))}.json")
    classes = frozenset(f"{module}.{name}" for module, names in data["classes"].items() for name in names)
    return Matrix(data["transformers"], frozenset(data["families"]), dict(data["notes"]), classes, installed,
                  versions)


def current() -> Matrix:
    """The matrix for the installed transformers (``transformers.__version__``, read at every call)."""
    import transformers

    return for_version(transformers.__version__)


@functools.cache
def _load(name: str) -> dict:
    return json.loads(resources.files(__package__).joinpath(PACKAGE_DIR, name).read_text())


def dumps(transformers_version: str, families, notes: dict[str, str], classes: dict[str, set[str]]) -> str:
    """The JSON text of one matrix (one line per family note and per module's classes: readable diffs)."""
    lines = ["{", f' "transformers": {json.dumps(transformers_version)},',
             f' "families": {json.dumps(sorted(families))},', ' "notes": {']
    lines += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in sorted(notes.items())]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" },", ' "classes": {']
    lines += [f"  {json.dumps(m)}: {json.dumps(sorted(c))}," for m, c in sorted(classes.items())]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"
