"""Deprecated alias of :mod:`hf_fcp.engine.comm`, where this module moved; earlier docs named ``hf_fcp.comm``, so
the name stays importable (with a DeprecationWarning) and is the same module object."""

import sys
import warnings
from importlib import import_module

warnings.warn("hf_fcp.comm is deprecated: it moved to hf_fcp.engine.comm; import that instead", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = import_module("hf_fcp.engine.comm")
