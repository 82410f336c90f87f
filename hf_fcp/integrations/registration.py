"""Register ``attn_implementation="fcp"`` with transformers when transformers loads, not before.

``import hf_fcp`` must register ``"fcp"``, but importing transformers' modelling code takes seconds, which
planning and the ``hf-fcp`` command line never need. :func:`register_on_import` therefore registers each
half at the moment its transformers module has finished loading — the attention function when
``transformers.modeling_utils`` has (it defines ``AttentionInterface``), the mask function when
``transformers.masking_utils`` has — or at once for a module that is already loaded. A model can only be
built after ``modeling_utils`` has loaded, so ``"fcp"`` is always there when transformers looks it up.
The mechanism is a standard post-import hook: a finder on ``sys.meta_path`` that wraps the loader of
exactly these two modules; it removes itself once both are registered.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Callable

_WATCHED = ("transformers.modeling_utils", "transformers.masking_utils")


def _register_attention(modeling_utils) -> None:
    from .transformers import ATTN_IMPLEMENTATION, fcp_attention_forward

    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, fcp_attention_forward)


def _register_mask(masking_utils) -> None:
    from .transformers import ATTN_IMPLEMENTATION

    # transformers' own flash mask: a padding mask stays a cheap 2D mask, no (T×T) or 4D mask is built
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, masking_utils.flash_attention_mask)


_REGISTER = dict(zip(_WATCHED, (_register_attention, _register_mask)))


class _Loader(importlib.abc.Loader):
    """A module's own loader, plus a call once the module has executed; everything else is delegated."""

    def __init__(self, loader, then: Callable) -> None:
        self._loader, self._then = loader, then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... (inspect and linecache use them)
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for a watched module and wraps the loader found."""

    def __init__(self) -> None:
        self.pending = {name: _REGISTER[name] for name in _WATCHED if name not in sys.modules}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, self._loaded)
                return spec
        return None

    def _loaded(self, module) -> None:
        self.pending.pop(module.__name__)(module)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


def register_on_import() -> None:
    """Register ``"fcp"`` now for the transformers modules already loaded, and for the others as soon as
    they load. Idempotent; never imports transformers itself."""
    for name in _WATCHED:
        if name in sys.modules:
            _REGISTER[name](sys.modules[name])
    if any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    finder = _AfterImport()
    if finder.pending:
        sys.meta_path.insert(0, finder)
