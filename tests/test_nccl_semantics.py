"""The NCCL path's rules, checked on a CPU machine (issue: first 8-GPU run).

* Backend and device come from the group's backend map and the tensors, never from the string "nccl"
  (``dist.get_backend`` returns "cpu:gloo,cuda:nccl" for a mixed group); CUDA tensors need NCCL and the
  current CUDA device.
* Waits: gloo blocks, bounded; NCCL waits on the stream (``Work.wait()`` without a timeout) only where the
  received data is read, and keeps send-only handles until they complete.
* One kernel packs each message.
* NCCL ignores tags: with every message on tag 0 (NCCL's matching: order per pair only), the sequence rank a
  sends to b equals what b receives from a, at W = 2, 3, 4, with activation checkpointing too, and the
  numerics still match the float64 reference.
* The plan check covers everything that sizes a message, and a failure on one rank reaches every rank.

Multi-process tests spawn gloo groups (``run_workers``); a hang fails them, it never stalls the run.
"""

from __future__ import annotations

import collections
import datetime
import re
import time
import types

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from hf_fcp import plan_batch
from hf_fcp.engine import comm, comm_trace
from hf_fcp.plan.views import RoundView
from hf_fcp.testing import fcp_subgroups, run_workers
from hf_fcp.testing.cases import AttentionCase as Case
from hf_fcp.testing.cases import compare_to_reference, plan_for, run_case

TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- backend and device
@pytest.mark.parametrize("config, expected", [
    ("cpu:gloo,cuda:nccl", {"cpu": "gloo", "cuda": "nccl"}),
    ("cuda:nccl", {"cuda": "nccl"}),  # init_process_group() without a backend on a GPU machine
    ("cpu:gloo,cuda:gloo", {"cpu": "gloo", "cuda": "gloo"}),
    ("nccl", {"cuda": "nccl"}),
    ("gloo", {"cpu": "gloo", "cuda": "gloo"}),
])
def test_backend_map_from_config(config, expected):
    assert comm.parse_backend_config(config) == expected


def _backends(monkeypatch, mapping):
    monkeypatch.setattr(comm, "device_backends", lambda group: dict(mapping))


def test_exchange_backend_follows_the_device(monkeypatch):
    _backends(monkeypatch, {"cpu": "gloo", "cuda": "nccl"})
    assert comm.exchange_backend(None, "cpu") == "gloo"
    assert comm.exchange_backend(None, torch.device("cuda", 3)) == "nccl"
    assert comm.plan_check_device(None, torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert comm.plan_check_device(None, "cpu") == torch.device("cpu")
    _backends(monkeypatch, {"cpu": "gloo", "cuda": "gloo"})
    assert comm.plan_check_device(None, torch.device("cuda", 3)) == torch.device("cpu")


@pytest.mark.parametrize("mapping, device, current, words", [
    ({"cpu": "gloo", "cuda": "gloo"}, "cuda:1", 1, ["backend for cuda tensors: got 'gloo', expected 'nccl'"]),
    ({"cpu": "gloo"}, "cuda:1", 1, ["got backends 'cpu:gloo', expected one for cuda tensors"]),
    ({"cuda": "nccl"}, "cpu", 0, ["got backends 'cuda:nccl', expected one for cpu tensors"]),
    ({"cuda": "nccl"}, "cuda:3", 0, ["torch.cuda.current_device(): got 0, expected 3", "set_device(3)"]),
])
def test_exchange_device_problems(monkeypatch, mapping, device, current, words):
    _backends(monkeypatch, mapping)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    problem = comm.check_exchange_device(None, device)
    assert problem is not None and all(w in problem for w in words), problem


def test_exchange_device_fine(monkeypatch):
    _backends(monkeypatch, {"cpu": "gloo", "cuda": "nccl"})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert comm.check_exchange_device(None, "cuda:2") is None
    assert comm.check_exchange_device(None, "cpu") is None


# ----------------------------------------------------------------------------- waits
class FakeWork:
    """A Work that records how it was waited on."""

    def __init__(self, done: bool = True, error: Exception | None = None):
        self.calls: list[tuple] = []
        self.done, self.error = done, error

    def wait(self, *args):
        self.calls.append(args)
        if self.error is not None:
            raise self.error
        return True

    def is_completed(self) -> bool:
        return self.done


@pytest.fixture
def no_retired():
    comm._RETIRED.clear()
    yield
    comm._RETIRED.clear()


SEND, RECV = [("send to", 1)], [("receive from", 2)]


def test_gloo_waits_block_with_the_fcp_timeout(no_retired):
    works = [FakeWork(), FakeWork()]
    comm.Pending(works, [], SEND + RECV, what="stage 0").wait(consume=False)
    for w in works:  # gloo waits on everything, send-only too (failure detection), bounded
        assert len(w.calls) == 1 and isinstance(w.calls[0][0], datetime.timedelta)
        assert w.calls[0][0].total_seconds() <= comm.get_timeout()
    assert not comm._RETIRED


def test_nccl_waits_on_the_stream_only_for_consumed_receives(no_retired):
    received = FakeWork()
    comm.Pending([received], [], SEND + RECV, stream_ordered=True).wait()
    assert received.calls == [()]  # Work.wait() without a timeout: a stream wait, no host polling
    sent = FakeWork(done=False)
    comm.Pending([sent], [torch.zeros(1)], SEND, stream_ordered=True).wait()
    unread = FakeWork(done=False)
    comm.Pending([unread], [], SEND + RECV, stream_ordered=True).wait(consume=False)
    assert sent.calls == [] and unread.calls == []  # nothing waits on a send or on data nobody reads
    assert comm.release_retired() == 2  # kept while in flight
    sent.done = True
    assert comm.release_retired() == 1
    unread.done = True
    assert comm.release_retired() == 0


def test_nccl_wait_error_names_the_stage(no_retired):
    work = FakeWork(error=RuntimeError("NCCL error: remote process exited"))
    with pytest.raises(comm.PeerFailureError, match="forward K/V exchange of stage 1.*remote process exited"):
        comm.Pending([work], [], RECV, what="forward K/V exchange of stage 1", stream_ordered=True).wait()


def test_failure_names_global_ranks_of_a_subgroup(monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_global_rank", lambda group, rank: rank + 4)  # the FCP group is ranks 4, 5
    msg = comm.failure_message(object(), "forward K/V exchange of stage 0", [("receive from", 0)], 0,
                               None, 2.0, expired=True)
    assert msg.startswith("FCP rank 1 (global rank 5) of 2: forward K/V exchange of stage 0: receive from rank 0 "
                          "(global rank 4) failed: no progress within the FCP timeout of 2 s"), msg


class OpLog(TorchDispatchMode):
    """Names of the aten ops run inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fake_p2p(monkeypatch, no_retired):
    """Posts without a process group (``batch_isend_irecv`` on NCCL, one ``isend``/``irecv`` per op on gloo);
    ``posted`` holds each ``comm.post`` call's ops; ``backend`` decides gloo or NCCL behaviour."""
    state = types.SimpleNamespace(backend="gloo", posted=[])
    real_post = comm.post

    def post(*args, **kwargs):
        state.posted.append([])
        return real_post(*args, **kwargs)

    def one(name):
        def call(tensor, group=None, tag=0, **peer):
            state.posted[-1].append(types.SimpleNamespace(op=getattr(dist, name), tensor=tensor, tag=tag,
                                                          group_peer=next(iter(peer.values()))))
            return FakeWork(done=False)
        return call

    monkeypatch.setattr(comm, "post", post)
    monkeypatch.setattr(dist, "isend", one("isend"))
    monkeypatch.setattr(dist, "irecv", one("irecv"))
    monkeypatch.setattr(dist, "P2POp", lambda op, t, group=None, tag=0, group_peer=None: types.SimpleNamespace(
        op=op, tensor=t, tag=tag, group_peer=group_peer))
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: state.posted[-1].extend(ops) or [FakeWork(done=False)])
    monkeypatch.setattr(comm, "exchange_backend", lambda group, device: state.backend)
    return state


def _data_ops(ops: list[str]) -> collections.Counter:
    """Ops that move data (views and allocations left out)."""
    return collections.Counter(o for o in ops if o not in {"slice", "new_empty", "empty", "view", "alias"})


def test_one_kernel_per_message(fake_p2p):
    k, v = torch.randn(10, 2, 4), torch.randn(10, 2, 4)
    rounds = [RoundView(1, torch.tensor([1, 3, 5]), 2, 0, 4), RoundView(2, torch.tensor([0, 2]), -1, 0, 0),
              RoundView(-1, torch.zeros(0, dtype=torch.int64), 3, 4, 2)]
    kv = comm.pack_kv(k, v, [types.SimpleNamespace(rounds=rounds)])
    with OpLog() as log:
        comm.post_kv(rounds, kv, torch.empty(6, 4, 4), None)
    assert _data_ops(log.ops) == {"index_select": 2}, log.ops  # two K/V messages, one kernel each
    sent = [op.tensor for op in fake_p2p.posted[-1] if op.op is dist.isend]
    assert torch.equal(sent[0], torch.cat([k, v], dim=1)[[1, 3, 5]])
    dkv = torch.randn(6, 4, 4)
    for wire in (torch.float32, torch.bfloat16):
        with OpLog() as log:
            pending, incoming = comm.post_grads(rounds, dkv, None, wire)
        assert _data_ops(log.ops) == {"_to_copy": 2}, log.ops  # two dK|dV messages, one cast-copy each
        grads = [op.tensor for op in fake_p2p.posted[-1] if op.op is dist.isend]
        assert grads[0].dtype == wire and torch.equal(grads[0], dkv[0:4].to(wire))
        assert grads[0].data_ptr() != dkv.data_ptr()  # a copy: later accumulation cannot touch a message
        assert [tuple(b.shape) for _, b in incoming] == [(3, 4, 4), (2, 4, 4)]


def test_post_on_nccl_keeps_send_only_handles_until_complete(fake_p2p):
    fake_p2p.backend = "nccl"
    k = torch.randn(4, 1, 2)
    sender = [RoundView(1, torch.tensor([0, 1]), -1, 0, 0)]
    kv = comm.pack_kv(k, k, [types.SimpleNamespace(rounds=sender)])
    first = comm.post_kv(sender, kv, torch.empty(0, 2, 2), None)
    first.wait()  # send-only: retired, not waited
    assert len(comm._RETIRED) == 1
    (works, _), = comm._RETIRED
    (work,) = works
    assert work.calls == []
    comm.post_kv(sender, kv, torch.empty(0, 2, 2), None)  # the next post drops completed handles only
    assert len(comm._RETIRED) == 1 and comm._RETIRED[0][0] is works
    work.done = True
    comm.post_kv(sender, kv, torch.empty(0, 2, 2), None)
    assert not comm._RETIRED


# ----------------------------------------------------------------------------- message order without tags
def _order_cases(world: int) -> list[tuple[Case, bool]]:
    """(case, activation checkpointing) pairs run with every message on tag 0."""
    long = (1, world * 40 + 5, 9, 17, 3, 40)  # the long document cannot fit one rank: it spans ranks
    return [
        (Case("fcp_3layers_gqa4", long, 8, layers=3), False),
        (Case("fcp_prefetch1_rps2", long, 4, rounds_per_stage=2, prefetch=1), False),
        (Case("fcp_bf16_mqa", long, 8, heads=(8, 1), dtype=torch.bfloat16), False),
        (Case("allgather_rps2", long, 8, strategy="allgather", rounds_per_stage=2), False),
        (Case("tiny_batch_idle_ranks", (1, 2), 4, heads=(4, 1)), False),
        (Case("ring_baseline_2layers", long, 8, strategy="ring", op="ring", layers=2), False),
        (Case("fcp_checkpointed_2layers", long, 8, layers=2), True),
        (Case("fcp_checkpointed_prefetch1", long, 4, layers=2, prefetch=1, rounds_per_stage=2), True),
        (Case("relay_nodes_of_2_prefetch1", long, 4, node_size=2, prefetch=1, layers=2), False),
        (Case("relay_checkpointed_rps2", long, 8, node_size=2, rounds_per_stage=2, layers=2), True),
    ]


def _checkpointed_case(rank: int, world: int, case: Case) -> dict:
    """run_case with every layer under non-reentrant activation checkpointing: the backward re-runs each
    layer's forward, K/V exchange included, before its dK/dV exchange."""
    from torch.utils.checkpoint import checkpoint

    from hf_fcp.engine.attention import fcp_attention
    from hf_fcp.testing import random_qkv

    view = plan_for(case, world).for_rank(rank)
    q, k, v, dout = random_qkv(case.lens, *case.heads, seed=case.seed)
    idx = view.token_index
    xs = [t[idx].to(case.dtype).requires_grad_() for t in (q, k, v)]

    def layer(q_, k_, v_):
        return fcp_attention(q_, k_, v_, view, prefetch=case.prefetch, return_lse=True)

    out = xs[0]
    for _ in range(case.layers):
        out, lse = checkpoint(layer, out, xs[1], xs[2], use_reentrant=False)
    (out.float() * dout[idx].float()).sum().backward()
    return {"index": idx, "out": out.detach().double(), "lse": lse.double(), "grads": [x.grad.double() for x in xs],
            "dtype_ok": out.dtype == case.dtype}


def _untagged_worker(rank: int, world: int) -> dict:
    comm.set_timeout(30)
    results = {}
    for size, _ in fcp_subgroups(rank, world):
        results[size] = []
        with comm_trace.untagged():
            for case, ckpt in _order_cases(size):
                with comm_trace.record_messages() as log:
                    res = (_checkpointed_case if ckpt else run_case)(rank, size, case)
                results[size].append({**res, "log": log})
    return results


@pytest.fixture(scope="module")
def untagged_results():
    return run_workers(_untagged_worker, 4, timeout=TIMEOUT_S)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("index", range(len(_order_cases(2))), ids=[c.name for c, _ in _order_cases(2)])
def test_untagged_sequences_match_per_pair_and_numerics_hold(untagged_results, world, index):
    case, ckpt = _order_cases(world)[index]
    parts = [untagged_results[r][world][index] for r in range(world)]
    logs = [p["log"] for p in parts]
    assert comm_trace.pair_mismatches(logs) == []
    assert not compare_to_reference(case, parts), compare_to_reference(case, parts)
    sent = [m for log in logs for m in log.messages if m.direction == "send"]
    if case.name != "tiny_batch_idle_ranks":
        assert sent, "the layout exchanged nothing: the comparison would be empty"
    if ckpt:  # each layer's forward exchange ran twice (forward, recompute), its backward once
        kv = sum(m.nbytes for m in sent if m.kind == "kv")
        grad = sum(m.nbytes for m in sent if m.kind == "grad")
        assert kv == 2 * grad == 2 * case.layers * plan_for(case, world).stats().comm_bytes


def test_pair_mismatches_catches_a_reordering():
    def log(*messages):
        return comm_trace.MessageLog([comm_trace.Message(*m) for m in messages])

    a = log(("send", 1, "stage 0", "kv", 64), ("send", 1, "stage 1", "kv", 32))
    b_ok = log(("recv", 0, "stage 0", "kv", 64), ("recv", 0, "stage 1", "kv", 32))
    b_swapped = log(("recv", 0, "stage 1", "kv", 32), ("recv", 0, "stage 0", "kv", 64))
    b_short = log(("recv", 0, "stage 0", "kv", 64))
    assert comm_trace.pair_mismatches([a, b_ok]) == []
    (problem,) = comm_trace.pair_mismatches([a, b_swapped])
    assert problem.startswith("rank 0 -> rank 1") and "first difference at message 0" in problem
    assert comm_trace.pair_mismatches([a, b_short])[0].startswith("rank 0 -> rank 1: 2 sent vs 1 received")


def test_a_gloo_post_that_fails_names_its_peer(fake_p2p, monkeypatch):
    """Gloo posts a send eagerly: the op that raises (a dead peer's closed connection) is the one named."""
    def refused(tensor, group=None, tag=0, **peer):
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(dist, "isend", refused)
    with pytest.raises(comm.PeerFailureError, match=r"send to rank 2 failed: the transfer failed before the FCP "
                                                    r"timeout.*Check the log of rank\(s\) \[2\] "):
        comm.post([(2, torch.ones(2))], [(1, torch.ones(2))], None, what="forward K/V exchange")


def test_untagged_posts_on_tag_zero(fake_p2p):
    msg = [(1, torch.ones(2))]
    comm.post(msg, msg, None, tag="grad")
    with comm_trace.untagged():
        comm.post(msg, msg, None, tag="kv")
        comm.post(msg, msg, None, tag="grad")
    comm.post(msg, msg, None, tag="kv")
    assert [[op.tag for op in ops] for ops in fake_p2p.posted] == [[2, 2], [0, 0], [0, 0], [1, 1]]


# ----------------------------------------------------------------------------- failures on one rank
def _outcome(fn) -> tuple[str, float]:
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 — the test checks type and message
        return f"{type(exc).__name__}: {exc}", time.monotonic() - start
    return "no error", time.monotonic() - start


def _layout_mismatch_worker(rank: int, world: int) -> list[str]:
    """Rank 1 calls with k/v of another dtype, head count or head dim than rank 0 (each valid alone)."""
    from hf_fcp.engine.attention import fcp_attention

    comm.set_timeout(20)
    lens = (40, 3, 1, 17)
    out = []
    for dtype, hkv, d in ((torch.bfloat16, 2, 16), (torch.float32, 4, 16), (torch.float32, 2, 32)):
        view = plan_batch(lens, world_size=world, block_size=8).for_rank(rank)  # a fresh view per scenario
        mine = (dtype, hkv, d) if rank == 1 else (torch.float32, 2, 16)
        q = torch.randn(view.num_local, 4, mine[2], dtype=mine[0])
        k, v = (torch.randn(view.num_local, mine[1], mine[2], dtype=mine[0]) for _ in range(2))
        out.append(_outcome(lambda: fcp_attention(q, k, v, view))[0])
    return out


def test_message_layout_mismatch_raises_on_every_rank():
    results = run_workers(_layout_mismatch_worker, 2, timeout=TIMEOUT_S)
    for scenario, detail in enumerate(("torch.bfloat16 with 2 heads of dim 16", "torch.float32 with 4 heads",
                                       "torch.float32 with 2 heads of dim 32")):
        for rank in range(2):
            msg = results[rank][scenario]
            assert msg.startswith("PlanMismatchError: FCP K/V message layout differs"), f"rank {rank}: {msg}"
            assert detail in msg and "on ranks [1]" in msg and "on ranks [0]" in msg, msg


def _kernel_failure_worker(rank: int, world: int) -> dict:
    """The last rank of each group fails kernel selection (e.g. flash-attn missing there)."""
    from hf_fcp.engine import attention

    comm.set_timeout(30)
    real = attention.select_backend
    out = {}
    for size, _ in fcp_subgroups(rank, world):
        def select(device, dtype, requested=None, **options):
            if rank == size - 1:
                raise ImportError("backend 'flash_attn' needs flash-attn (simulated: missing on this rank)")
            return real(device, dtype, requested, **options)

        attention.select_backend = select
        try:
            view = plan_batch((30, 7, 12), world_size=size, block_size=4).for_rank(rank)
            q, k, v = (torch.randn(view.num_local, h, 16) for h in (4, 2, 2))
            out[size] = _outcome(lambda: attention.fcp_attention(q, k, v, view))
        finally:
            attention.select_backend = real
    return out


def test_kernel_selection_failure_on_one_rank_raises_everywhere_at_once():
    results = run_workers(_kernel_failure_worker, 3, timeout=TIMEOUT_S)
    for size in (2, 3):
        for rank in range(size):
            msg, elapsed = results[rank][size]
            if rank == size - 1:
                assert msg.startswith("ImportError: backend 'flash_attn'"), msg
            else:
                assert msg.startswith(f"PlanMismatchError: FCP attention: rank(s) [{size - 1}] rejected"), msg
            assert elapsed < 10, f"W={size} rank {rank} took {elapsed:.1f} s: it waited instead of raising"


FAIL_TIMEOUT_S = 2.0


def _mid_exchange_failure_worker(rank: int, world: int) -> tuple[str, float]:
    """Rank 0 (whose K/V every other rank needs) fails while packing its messages in its second call,
    after the plan check: the others must raise within the FCP timeout, not hang."""
    from hf_fcp.engine.attention import fcp_attention

    view = plan_batch((world * 16,), world_size=world, block_size=16, strategy="allgather").for_rank(rank)
    real, calls = comm.pack_kv, []

    def pack(k, v, stages):
        calls.append(1)
        if rank == 0 and len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated) while packing K/V")
        return real(k, v, stages)

    comm.pack_kv = pack
    q, k, v = (torch.randn(view.num_local, h, 16) for h in (4, 2, 2))
    fcp_attention(q, k, v, view)  # first call: plan check and a clean exchange (default timeout: the spawned
    comm.set_timeout(FAIL_TIMEOUT_S)  # ranks may start seconds apart on a loaded machine)
    return _outcome(lambda: fcp_attention(q, k, v, view))


@pytest.mark.parametrize("world", [2, 3])
def test_failure_during_exchange_on_one_rank_is_bounded_on_gloo(world):
    results = run_workers(_mid_exchange_failure_worker, world, timeout=TIMEOUT_S)
    assert results[0][0].startswith("RuntimeError: CUDA out of memory (simulated)"), results[0]
    for rank in range(1, world):
        msg, elapsed = results[rank]
        assert msg.startswith(f"PeerFailureError: FCP rank {rank} of {world}: forward K/V exchange"), msg
        # names the failed peer, rank 0, and only it: as the transfer that failed, or as the one rank whose log
        # to check (a message naming every peer of the stage, "[0, 1]", does not say which one failed)
        assert re.search(r"(from|to) rank 0 failed|Check the log of rank\(s\) \[0\] ", msg), msg
        assert elapsed < 2 * FAIL_TIMEOUT_S + 5, f"rank {rank} took {elapsed:.1f} s"
