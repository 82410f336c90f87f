"""A peer that dies (SIGKILL) or stalls mid-run: the other ranks raise PeerFailureError within the FCP
timeout instead of blocking forever. Three spawned gloo ranks run repeated fcp_attention forward/backward;
rank 2 kills itself between the forward and backward of step 3 (or stalls before its forward).
``run_workers`` kills and reaps any process still running after its hard timeout, so a regression fails
the test, it never stalls the run.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from hf_fcp import plan_batch
from hf_fcp.testing import random_qkv, run_workers

WORLD, VICTIM, FCP_TIMEOUT_S = 3, 2, 2.0
HARD_TIMEOUT_S = 45.0  # the whole spawn; every process is killed and reaped after it
LENS, BLOCK = (90, 7, 20, 33), 8


def _train_until_fault(rank: int, world: int, fault: str) -> dict:
    from hf_fcp.engine import comm
    from hf_fcp.engine.attention import fcp_attention

    comm.set_timeout(FCP_TIMEOUT_S)
    view = plan_batch(LENS, world_size=world, block_size=BLOCK, kv_heads=2, head_dim=16).for_rank(rank)
    q, k, v, dout = random_qkv(LENS, 4, 2, seed=0)
    idx = view.token_index
    started = None
    try:
        for step in range(6):
            started = time.monotonic()
            xs = [t[idx].clone().requires_grad_() for t in (q, k, v)]
            if rank == VICTIM and step == 2 and fault == "stall_in_forward":
                time.sleep(FCP_TIMEOUT_S + 1.5)  # the others time out meanwhile
                return {"error": "stalled rank", "elapsed": 0.0, "step": step}
            out = fcp_attention(*xs, view)
            if rank == VICTIM and step == 2 and fault == "kill_in_backward":
                os.kill(os.getpid(), signal.SIGKILL)  # after the forward, before the dK/dV exchange
            (out * dout[idx]).sum().backward()
    except comm.PeerFailureError as exc:
        return {"error": f"PeerFailureError: {exc}", "elapsed": time.monotonic() - started, "step": step}
    return {"error": "no error", "elapsed": 0.0, "step": step}


@pytest.mark.parametrize("fault", ["kill_in_backward", "stall_in_forward"])
def test_survivors_raise_instead_of_hanging(fault):
    t0 = time.monotonic()
    results = run_workers(_train_until_fault, WORLD, fault, timeout=HARD_TIMEOUT_S, allow_missing=True)
    assert time.monotonic() - t0 < HARD_TIMEOUT_S
    if fault.startswith("kill"):
        assert results[VICTIM] is None, "the killed rank cannot have reported"
    survivors = [r for r in range(WORLD) if r != VICTIM]
    named_victim = False
    for r in survivors:
        res = results[r]
        msg = res["error"]
        assert msg.startswith(f"PeerFailureError: FCP rank {r} of {WORLD}: "), f"rank {r}: {msg}"
        assert res["step"] == 2, f"rank {r} failed at step {res['step']}, expected the faulty step 2"
        assert "exchange of stage" in msg and "restart from the last checkpoint" in msg and "FCP_TIMEOUT_S" in msg
        # bounded: the FCP timeout (possibly twice: a rank may wait on a survivor that itself waited), + slack
        assert res["elapsed"] < 2 * FCP_TIMEOUT_S + 5.0, f"rank {r} took {res['elapsed']:.1f} s"
        named_victim |= f"from rank {VICTIM} failed" in msg or f"to rank {VICTIM} failed" in msg
    assert named_victim, f"no survivor named rank {VICTIM} as the failed peer: {results}"
    kind = "backward dK/dV exchange" if fault == "kill_in_backward" else "forward K/V exchange"
    assert all(kind in results[r]["error"] for r in survivors), results
    cause = "connection was closed" if fault.startswith("kill") else "no progress within the FCP timeout of 2 s"
    assert any(cause in results[r]["error"] for r in survivors), results
