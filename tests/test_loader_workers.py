"""Planning off the training step: with ``dataloader_num_workers`` ≥ 1 (the recipes' default) the FCP collator,
and so ``plan_batch``, runs in DataLoader worker processes, never in the trainer's process, for training and
evaluation alike. Losses, the evaluation loss and the logged plan figures equal those of planning in the
trainer's process; on 2 gloo ranks no worker calls ``torch.distributed``.

A recorder wraps the collator's ``plan_batch`` and the ``torch.distributed`` entry points before the trainer
exists; DataLoader workers are forked, so they inherit it and append what they did to a file."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import multiprocessing
import os
import pathlib
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_fcp.integrations.collator as collator_module
from hf_fcp import plan_batch
from hf_fcp.integrations.accelerate import FCPPlugin
from hf_fcp.integrations.embedded import tiny_config
from hf_fcp.integrations.trainer import FCPTrainer
from hf_fcp.integrations.transformers import register
from hf_fcp.testing import run_workers
from hf_fcp.testing.helpers import VOCAB, token_dataset

register()
STEPS = 4  # an epoch of token_dataset() holds 3 batches: training crosses an epoch boundary
EVAL_LENS = [30, 7, 55, 12]
DIST_CALLS = ("is_initialized", "get_rank", "get_world_size", "new_group", "barrier", "broadcast", "all_reduce",
              "all_gather", "all_gather_object", "all_to_all_single", "reduce", "send", "recv", "isend", "irecv",
              "batch_isend_irecv")
"""``torch.distributed`` functions a DataLoader worker must never call: a forked worker inherits the rank's
process-group state, and a call there would use (or corrupt) the parent's connections."""


def record_into(path: pathlib.Path, setattr_=setattr) -> None:
    """Append ``plan <pid>`` to ``path`` on every ``plan_batch`` call of the FCP collator, and ``dist.<name>
    <pid>`` (then raise) when a DataLoader worker calls one of :data:`DIST_CALLS`."""
    plan_batch = collator_module.plan_batch

    def write(line: str) -> None:
        with open(path, "a") as f:
            f.write(f"{line} {os.getpid()}\n")

    def planning(*args, **kwargs):
        write("plan")
        return plan_batch(*args, **kwargs)

    def guarded(name, fn):
        def call(*args, **kwargs):
            if torch.utils.data.get_worker_info() is not None:
                write(f"dist.{name}")
                raise RuntimeError(f"torch.distributed.{name} called in a DataLoader worker")
            return fn(*args, **kwargs)
        return call

    setattr_(collator_module, "plan_batch", planning)
    for name in DIST_CALLS:
        setattr_(dist, name, guarded(name, getattr(dist, name)))


def recorded(path: pathlib.Path) -> list[tuple[str, int]]:
    return [(what, int(pid)) for what, pid in (line.split() for line in path.read_text().splitlines())]


def train(output_dir: pathlib.Path, world: int, workers: int) -> list[dict]:
    """:data:`STEPS` steps of the tiny Llama, then one evaluation; the trainer's log history."""
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, kv_heads=2,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fcp")
    args = TrainingArguments(output_dir=str(output_dir), max_steps=STEPS, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             lr_scheduler_type="constant", dataloader_num_workers=workers,
                             dataloader_persistent_workers=workers > 0, dataloader_pin_memory=False)
    trainer = FCPTrainer(model=model, args=args, train_dataset=token_dataset(),
                         eval_dataset=token_dataset(EVAL_LENS, seed=1),
                         fcp_plugin=FCPPlugin(block_size=16, tokens_per_rank=192 // world))
    trainer.train()
    history = [*trainer.state.log_history, trainer.evaluate()]
    trainer.close(destroy_process_group=False)  # run_workers destroys the default group
    return history


def same_training(with_workers: list[dict], without: list[dict]) -> None:
    """Identical losses, evaluation loss and plan figures (plan_ms aside: a timing) in both histories."""
    def kept(key: str) -> bool:
        return key in ("loss", "eval_loss") or (key.startswith("fcp/") and key != "fcp/plan_ms")

    def figures(history):
        return [{k: v for k, v in h.items() if kept(k)} for h in history if "loss" in h or "eval_loss" in h]

    got, want = figures(with_workers), figures(without)
    assert len(want) == STEPS + 1 and all("fcp/tokens" in h for h in want[:STEPS]), want
    assert got == want  # bit-identical: the same batches, planned by the same deterministic planner
    assert all(h["fcp/plan_ms"] > 0 for h in with_workers if "loss" in h)  # the stats crossed from the worker


def test_one_worker_plans_off_the_step_and_trains_the_same(tmp_path, monkeypatch):
    record = tmp_path / "record.txt"
    record_into(record, monkeypatch.setattr)
    histories, planners = {}, {}
    for workers in (0, 1):
        record.write_text("")
        histories[workers] = train(tmp_path / f"workers{workers}", 1, workers)
        planners[workers] = [pid for what, pid in recorded(record) if what == "plan"]
    me = os.getpid()
    assert len(planners[0]) >= STEPS + 1 and set(planners[0]) == {me}  # the recorder sees in-process planning
    assert len(planners[1]) >= STEPS + 1, planners[1]  # training and evaluation batches were planned ...
    assert me not in planners[1], planners[1]  # ... none of them in the trainer's process
    assert len(set(planners[1])) == 2  # one persistent worker for both training epochs, one for evaluation
    same_training(histories[1], histories[0])


def workers_rank(rank: int, world: int, tmp: str):
    """On one gloo rank: the same run planned in the rank's process, then in one DataLoader worker."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    # run_workers starts daemonic processes by "spawn", which they would pass on to their DataLoader workers
    # (Python forbids a daemonic process any children). torchrun and accelerate launch start ordinary
    # interpreters, whose workers fork on Linux: so is this rank now, and its workers inherit the recorder.
    multiprocessing.current_process().daemon = False
    multiprocessing.set_start_method("fork", force=True)
    record = pathlib.Path(tmp) / f"record{rank}.txt"
    record_into(record)  # this process ends with the test
    histories = [train(pathlib.Path(tmp) / f"w{workers}", world, workers) for workers in (0, 1)]
    return os.getpid(), histories, recorded(record)


def test_two_ranks_plan_in_workers_without_torch_distributed(tmp_path):
    for pid, (without, with_workers), calls in run_workers(workers_rank, 2, str(tmp_path), timeout=240):
        assert not [c for c in calls if c[0] != "plan"], calls  # no worker called torch.distributed
        in_workers = [p for what, p in calls if p != pid]
        assert len(in_workers) >= STEPS + 1, calls  # the second run planned in its workers
        assert len(calls) - len(in_workers) >= STEPS + 1  # the first run planned in the rank's process
        same_training(with_workers, without)


@pytest.mark.parametrize("recipe", ["pretrain", "finetune", "sft"])
def test_recipes_plan_in_a_worker_by_default(recipe, tmp_path, monkeypatch, recipes):
    module = importlib.import_module(recipe)
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py", "--output_dir", str(tmp_path / "out")])
    args = module.parse_args()[2]
    assert args.dataloader_num_workers >= 1 and args.dataloader_persistent_workers
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--dataloader_num_workers", "0"])
    assert module.parse_args()[2].dataloader_num_workers == 0  # the command line still decides


def test_a_spawned_worker_gives_the_same_batches():
    """Under "spawn" or "forkserver" (Python 3.14's default on Linux) a worker gets the collator and the dataset
    by pickle and sends each batch back by pickle: batches, plan views and plan figures arrive unchanged, the
    view's many small tensors by value (not one shared-memory segment each, slow to receive)."""
    cfg = tiny_config("llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, kv_heads=2)
    plugin = FCPPlugin(block_size=16, tokens_per_rank=48)
    plugin.world_size, plugin.rank = 2, 1  # rank 1's shard of 2-rank plans (no process group is needed to plan)
    here = list(plugin.prepare_dataloader(token_dataset(), shuffle=False, model_config=cfg))
    spawned = list(plugin.prepare_dataloader(token_dataset(), shuffle=False, model_config=cfg, num_workers=1,
                                             multiprocessing_context="spawn"))
    assert len(spawned) == len(here) >= 3 and any(b["fcp_plan"].num_recv for b in here)  # some K/V is exchanged
    for got, want in zip(spawned, here):
        view = list(tensors(got["fcp_plan"]))
        assert view and not [t for t in view if t.is_shared()]
        assert got["fcp_stats"].plan_ms > 0
        got["fcp_stats"] = dataclasses.replace(got["fcp_stats"], plan_ms=want["fcp_stats"].plan_ms)  # a timing
        assert same(got, want)
    plugin.teardown()


def same(a, b) -> bool:
    """Equal values, tensors (dtype and all) and dataclasses compared field by field, recursively."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def tensors(obj):
    """Every tensor in a plan view (dataclasses and tuples, recursively)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from tensors(getattr(obj, f.name))
    elif isinstance(obj, tuple):
        for x in obj:
            yield from tensors(x)


def test_a_view_with_sliding_windows_crosses_by_value():
    """The by-value transfer rebuilds nested views (a sliding window's own exchange) exactly."""
    from hf_fcp.integrations.collator import FCPCollator
    from hf_fcp.integrations.workers import _ByValue
    from hf_fcp.plan import PlanSettings

    settings = PlanSettings(block_size=16, tokens_per_rank=48, attention_layers=((None, 1), (20, 3)))
    examples = [{"input_ids": list(range(3, 3 + n))} for n in (70, 5, 12, 1, 8)]
    view = FCPCollator(world_size=2, rank=1, settings=settings)(examples)["fcp_plan"]
    got = pickle.loads(pickle.dumps(_ByValue(view)))
    assert view.windows and got.windows[0].window == 20 and same(got, view)
    assert got.to(torch.device("cpu")).fingerprint == view.fingerprint  # a RankView again (Movable.to)


def test_a_large_view_crosses_as_runs_exactly():
    """At many ranks a view's row indices (K/V sent, keys of each task) are millions of values in few runs of
    consecutive rows: they cross as runs, and arrive value for value (vectors of no runs cross as they are)."""
    from hf_fcp.integrations.workers import _ByValue

    lens = [300_000, 40_000, 9_000, *range(500, 9_000, 700)]
    plan = plan_batch(lens, world_size=16, block_size=1024, tokens_per_rank=-(-sum(lens) // 16))
    view = plan.for_rank(int(np.argmax([len(plan.transfers_of(r)) for r in range(16)])))
    raw = sum(t.numel() * t.element_size() for t in tensors(view))
    blob = pickle.dumps(_ByValue(view))
    got = pickle.loads(blob)
    assert same(got, view) and len(blob) < raw / 10, (len(blob), raw)
    rng = np.random.default_rng(0)
    for values in (np.arange(-40, 60), np.r_[np.arange(5, 70), np.arange(3, 40), [7, 7, 7], np.arange(-9, 30)],
                   rng.integers(-5, 5, 100), np.repeat(np.arange(40), 3)):
        vector = torch.from_numpy(values.astype(np.int64))
        assert same(pickle.loads(pickle.dumps(_ByValue(vector))), vector)
