"""Spawn gloo process groups on loopback for multi-process tests and benchmarks; collect results, never hang.

``run_workers(fn, world_size, *args, timeout=...)`` starts ``world_size`` spawned processes, each with a
gloo process group (``file://`` store in a fresh temp dir, loopback only, one thread), calls
``fn(rank, world_size, *args)`` in each and returns the per-rank results as a list. ``fn`` must be a
module-level function (spawn pickles it by name); its result must be picklable (tensors are fine).
A worker exception re-raises in the caller with the worker's traceback; a worker still running after
``timeout`` seconds is killed and the call raises ``TimeoutError`` — a hang fails the test, it never
stalls the run. With ``allow_missing=True`` a rank whose process exited without a result (e.g. killed by
a signal on purpose) yields ``None`` instead of an error; a rank still running at the deadline is always
an error. :func:`fcp_subgroups` serves every world size 2..W from one spawn.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback

import torch

GRACE_S = 5.0  # after one worker failed, how long the others get to finish before they are killed


def _worker(fn, rank: int, world_size: int, init: str, timeout: float, results, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            payload = ("ok", pickle.dumps(fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 — everything goes back to the parent as text
        payload = ("error", traceback.format_exc())
    results.put((rank, *payload))


def run_workers(fn, world_size: int, *args, timeout: float = 60.0, allow_missing: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return results by rank.

    Raises RuntimeError with the first failing worker's traceback, or TimeoutError naming the ranks that
    did not report within ``timeout`` seconds (those processes are killed). Every process is reaped.
    """
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="hf_fcp_dist_")
    results = ctx.Queue()
    init = f"file://{os.path.join(tmp, 'store')}"
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init, timeout, results, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results, world_size, timeout, allow_missing)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


def _collect(procs, results, world_size: int, timeout: float, allow_missing: bool = False) -> list:
    out: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    ended = False
    while len(out) + len(errors) < world_size:
        left = deadline - time.monotonic()
        if errors:
            left = min(left, GRACE_S)
        if left <= 0:
            break
        try:
            rank, status, payload = results.get(timeout=min(left, 0.5))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                if ended:
                    break  # every process ended; those that did not report died (e.g. killed by a signal)
                ended = True  # one more look: a result may still be in the pipe
            continue
        if status == "ok":
            out[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
    if errors:
        rank = min(errors)
        raise RuntimeError(f"worker rank {rank} of {world_size} failed:\n{errors[rank]}")
    missing = [r for r in range(world_size) if r not in out]
    if allow_missing:
        missing = [r for r in missing if procs[r].exitcode is None]  # only hung ranks are an error
    if missing:
        hung = [r for r in missing if procs[r].exitcode is None]
        died = {r: procs[r].exitcode for r in missing if r not in hung}
        raise TimeoutError(f"of {world_size} ranks, {hung} were still running after {timeout} s (killed) and "
                           f"{sorted(died)} exited without a result (exit codes {died}); a worker must "
                           f"be a module-level function and the launching script guarded by __main__")
    return [out.get(r) for r in range(world_size)]


def fcp_subgroups(rank: int, world: int):
    """Inside a worker: for each size W = 2..world, create the subgroup of ranks 0..W-1 (a collective:
    every rank creates every subgroup) and, on its members, yield ``(W, group)`` with the group bound as
    FCP's default; unbound again afterwards. One spawn then serves every world size."""
    import torch.distributed as dist

    from ..engine import comm

    for size in range(2, world + 1):
        group = dist.new_group(list(range(size)))
        if rank >= size:
            continue
        comm.set_default_group(group)
        try:
            yield size, group
        finally:
            comm.set_default_group(None)
