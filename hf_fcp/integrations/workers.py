"""DataLoader worker processes plan FCP batches off the training step; what crosses back costs little.

With ``num_workers`` ≥ 1 a DataLoader runs its ``collate_fn`` (the :class:`FCPCollator`, which plans the
batch) in worker processes while the training process runs the step, and sends each batch back by pickle.
:class:`WorkerCollate` makes that transfer cheap: a plan view holds hundreds to thousands of small tensors at
hundreds of ranks, and torch sends each tensor as its own shared-memory segment, whose receipt costs the
training process a file-descriptor round trip per tensor. The view travels as numpy arrays instead, by value.
A worker plans and cuts batches only: it never calls ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import numpy as np
import torch

from ..plan.spans import ranges
from .collator import FCPCollator


@dataclass
class WorkerCollate:
    """``collate_fn`` of FCP dataloaders: ``collator`` (which plans the batch), and in a DataLoader worker
    process the plan view sent to the training process by value (:class:`_ByValue`)."""

    collator: FCPCollator

    def __call__(self, examples) -> dict[str, Any]:
        batch = self.collator(examples)
        if torch.utils.data.get_worker_info() is not None:
            batch["fcp_plan"] = _ByValue(batch["fcp_plan"])
        return batch


class _ByValue:
    """A plan view on its way from a DataLoader worker: its CPU tensors (hundreds to thousands at hundreds of
    ranks) are pickled as numpy arrays, by value, instead of one shared-memory segment each, whose receipt
    costs the training process a file-descriptor round trip per tensor (several times the by-value time at
    hundreds of ranks). It unpickles as the view itself."""

    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj

    def __reduce__(self):
        return _rebuild, (_flatten(self.obj),)


def _flatten(obj):
    """``obj`` as a tree that pickles by value: dataclasses → (class, fields), tuples, CPU tensors → numpy."""
    if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.dtype in _NUMPY_DTYPES:
        return _runs(obj.numpy()) or ("tensor", obj.numpy())
    if is_dataclass(obj) and not isinstance(obj, type):
        return ("dataclass", type(obj), tuple((f.name, _flatten(getattr(obj, f.name))) for f in fields(obj)))
    if type(obj) is tuple:
        return ("tuple", tuple(_flatten(x) for x in obj))
    return ("value", obj)


def _rebuild(tree):
    """Inverse of :func:`_flatten` (fields set as unpickling a dataclass does, without ``__init__``)."""
    kind, *rest = tree
    if kind == "tensor":
        return torch.from_numpy(rest[0])
    if kind == "runs":
        return torch.from_numpy(ranges(*rest))
    if kind == "tuple":
        return tuple(_rebuild(x) for x in rest[0])
    if kind == "dataclass":
        cls, values = rest
        obj = object.__new__(cls)
        for name, value in values:
            object.__setattr__(obj, name, _rebuild(value))
        return obj
    return rest[0]


RUNS_PER_VALUE = 16
"""An int64 vector travels as its runs of consecutive values when it has at least this many values per
run: the rows a plan view gathers (K/V sent, keys of a task) are mostly long runs of consecutive rows."""


def _runs(values: np.ndarray):
    """``("runs", first values, lengths)`` of a 1-D int64 array made of few runs ``v, v+1, v+2, ...``
    (:data:`RUNS_PER_VALUE`; :func:`hf_fcp.plan.spans.ranges` expands them); None otherwise."""
    if values.dtype != np.int64 or values.ndim != 1 or len(values) < 2 * RUNS_PER_VALUE:
        return None
    starts = np.flatnonzero(np.diff(values) != 1) + 1
    if (len(starts) + 1) * RUNS_PER_VALUE > len(values):
        return None
    starts = np.concatenate([[0], starts])
    return ("runs", values[starts], np.diff(np.append(starts, len(values))))


_NUMPY_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float64,
                 torch.float32, torch.float16)
