"""The NCCL path on one GPU (marked ``gpu``; skipped without CUDA). Run with
``python -m pytest -m gpu tests/test_gpu_nccl.py`` on a machine with one or more GPUs.

* NCCL groups of world size 1 created as ``"nccl"`` and as ``"cpu:gloo,cuda:nccl"`` (in a spawned process
  whose default group is gloo): the exchange backend for CUDA tensors is NCCL although ``dist.get_backend``
  says otherwise for the mixed group; the plan check gathers on the GPU; every wait is ``Work.wait()``
  without a timeout (a stream wait, no host polling); a K/V and a dK/dV exchange of this rank with itself
  deliver the right rows with no host sync (``torch.cuda.set_sync_debug_mode("error")``).
* A forward+backward of ``fcp_attention`` and of a tiny Llama with ``attn_implementation="fcp"`` under
  ``torch.cuda.set_sync_debug_mode("error")``, after one warm-up step (lazy one-time initialisation is
  not the per-layer path).
"""

from __future__ import annotations

import pytest
import torch

from hf_fcp import plan_batch
from hf_fcp.testing import random_qkv, run_workers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GROUP_BACKENDS = ["nccl", "cpu:gloo,cuda:nccl"]
LENS = [1, 7, 333, 2, 640, 1, 190]
TIMEOUT_S = 300.0


class RecordingWork:
    """Wraps a Work and records the arguments of every ``wait`` (a timeout argument means host polling)."""

    def __init__(self, work, waits: list):
        self._work, self._waits = work, waits

    def wait(self, *args):
        self._waits.append(args)
        return self._work.wait(*args)

    def is_completed(self):
        return self._work.is_completed()


def _recording(dist, waits: list, gathered: list):
    """Patch all_gather and batch_isend_irecv to record waits and the device of gathered tensors; returns
    a function that restores them."""
    real_gather, real_batch = dist.all_gather, dist.batch_isend_irecv

    def all_gather(parts, tensor, group=None, async_op=False):
        gathered.append(str(tensor.device))
        work = real_gather(parts, tensor, group=group, async_op=async_op)
        return RecordingWork(work, waits) if async_op else work

    dist.all_gather = all_gather
    dist.batch_isend_irecv = lambda ops: [RecordingWork(w, waits) for w in real_batch(ops)]

    def restore():
        dist.all_gather, dist.batch_isend_irecv = real_gather, real_batch
    return restore


def _plan_check_worker(rank: int, world: int, spec: str) -> dict:
    import torch.distributed as dist

    from hf_fcp.engine import comm, plan_check

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    group = dist.new_group(backend=spec)
    waits, gathered = [], []
    restore = _recording(dist, waits, gathered)
    try:
        view = plan_batch(LENS, world_size=1, block_size=16).for_rank(0).to(dev)
        k = torch.randn(view.num_local, 2, 64, device=dev, dtype=torch.bfloat16)
        plan_check.agree_on_plan(view, group, None, k)  # the group's first call: on the GPU, over NCCL
        checked = not plan_check.needs_plan_check(view, group, k)
    finally:
        restore()
    return {"get_backend": str(dist.get_backend(group)), "exchange": comm.exchange_backend(group, dev),
            "problem": comm.check_exchange_device(group, dev), "plan_device": str(comm.plan_check_device(group, dev)),
            "gathered": gathered, "waits": waits, "checked": checked}


@pytest.mark.parametrize("spec", GROUP_BACKENDS)
def test_plan_check_runs_on_cuda_over_nccl_without_polling(spec):
    (res,) = run_workers(_plan_check_worker, 1, spec, timeout=TIMEOUT_S)
    assert res["get_backend"] == spec  # what the old exact-string test compared against "nccl"
    assert res["exchange"] == "nccl" and res["problem"] is None
    assert res["plan_device"] == "cuda:0" and res["gathered"] == ["cuda:0"]
    assert res["waits"] == [()], f"expected one Work.wait() without a timeout: {res['waits']}"
    assert res["checked"]


def _self_exchange_worker(rank: int, world: int, spec: str) -> dict:
    import types

    import torch.distributed as dist

    from hf_fcp.engine import comm
    from hf_fcp.plan.views import RoundView

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    group = dist.new_group(backend=spec)
    rows = torch.tensor([3, 0, 7], device=dev)
    rounds = [RoundView(send_peer=0, send_rows=rows, recv_peer=0, recv_start=0, recv_len=3)]  # to itself
    k, v = (torch.randn(10, 2, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
    recv = torch.zeros(3, 4, 64, device=dev, dtype=torch.bfloat16)
    dkv = torch.randn(3, 4, 64, device=dev, dtype=torch.float32)
    kv = comm.pack_kv(k, v, [types.SimpleNamespace(rounds=rounds)])
    incoming = []

    def exchange():
        comm.post_kv(rounds, kv, recv, group, "self K/V exchange").wait()
        pending, got = comm.post_grads(rounds, dkv, group, torch.bfloat16, "self dK/dV exchange")
        pending.wait()
        incoming[:] = got

    waits, gathered = [], []
    restore = _recording(dist, waits, gathered)
    try:
        _sync_free(exchange)  # the second exchange runs with every host sync an error
    finally:
        restore()
    return {"kv_ok": bool(torch.equal(recv, torch.cat([k, v], dim=1)[rows])),
            "grad_ok": bool(torch.equal(incoming[0][1], dkv.to(torch.bfloat16))),
            "incoming_rows": incoming[0][0].tolist(), "waits": waits}


@pytest.mark.parametrize("spec", GROUP_BACKENDS)
def test_exchange_runs_on_nccl_without_host_syncs(spec):
    (res,) = run_workers(_self_exchange_worker, 1, spec, timeout=TIMEOUT_S)
    assert res["kv_ok"] and res["grad_ok"] and res["incoming_rows"] == [3, 0, 7]
    assert res["waits"] and all(args == () for args in res["waits"]), res["waits"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_set_device_mismatch_is_named():
    from unittest import mock

    from hf_fcp.engine import comm

    with mock.patch.object(comm, "device_backends", return_value={"cpu": "gloo", "cuda": "nccl"}):
        torch.cuda.set_device(0)
        problem = comm.check_exchange_device(None, torch.device("cuda", 1))
    assert problem.startswith("torch.cuda.current_device(): got 0, expected 1"), problem


def _sync_free(step) -> None:
    """Run ``step`` once to warm up, then again with every host sync an error."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_fcp_attention_forward_backward_without_host_syncs():
    from hf_fcp.engine.attention import fcp_attention

    q, k, v, dout = (t.to("cuda", torch.bfloat16) for t in random_qkv(LENS, 8, 2, d=64, seed=0))
    view = plan_batch(LENS, world_size=1, block_size=128).for_rank(0).to("cuda")  # as the collator's loader does
    idx = view.token_index

    def step():
        xs = [t[idx].detach().requires_grad_() for t in (q, k, v)]
        out = fcp_attention(*xs, view)
        (out.float() * dout[idx].float()).sum().backward()

    _sync_free(step)


def test_tiny_llama_forward_backward_without_host_syncs():
    from hf_fcp.integrations.collator import FCPCollator
    from hf_fcp.testing.helpers import examples, make_model

    batch = FCPCollator(world_size=1, rank=0, block_size=16)(examples())
    batch = {name: value.to("cuda") for name, value in batch.items()}  # the plan view included
    model = make_model("llama", "fcp").cuda().to(torch.bfloat16)

    def step():
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()

    _sync_free(step)
