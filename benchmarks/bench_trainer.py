"""FCPTrainer (with DDP, activation checkpointing, FSDP2) vs standard DDP with DataCollatorWithFlattening:
tokens/s, peak RSS per rank and per-step imbalance.

Every run trains the same tiny model on the same global batches (token-budget batches of Python
standard-library files, byte tokens, long documents split at the budget) on the same processes:

* ``fcp``: FCPTrainer + DDP; every document is cut into blocks placed over all ranks (plan stats per step);
* ``fcp_ckpt``: the same with ``activation_checkpointing=True`` (non-reentrant; the recompute re-runs the
  FCP exchange);
* ``fcp_fsdp2``: the same with FSDP2 (``fsdp=True, fsdp_config={"version": 2}``: one ``fully_shard`` per
  decoder layer, parameters re-gathered for backward);
* ``fcp_compile`` (only on request): the same with ``torch_compile=True`` (inductor; the FCP attention is one
  graph break per layer);
* ``ddp_flatten``: plain ``Trainer`` + DDP; each global batch's documents are dealt round-robin to the
  ranks (whole sequences per rank, as a distributed sampler does) and packed by
  ``DataCollatorWithFlattening``. A rank left without a document gets a 1-token dummy without labels;
* ``sft_fcp`` (TRL): ``hf_fcp.FCPSFTTrainer`` + DDP on the same documents (TRL's fused-LM-head loss,
  its default activation checkpointing);
* ``sft_padding_free`` (TRL): TRL's ``SFTTrainer`` + DDP with ``padding_free=True`` (what users run today),
  the global batches dealt round-robin as for ``ddp_flatten``. Side by side with ``sft_fcp``:
  ``--modes sft_fcp sft_padding_free``.

All use ``attn_implementation="fcp"`` (the ``ddp_flatten`` run without a plan: exact varlen attention
from ``position_ids``). Peak RSS is each process's resident high-water mark during ``train()`` (reset
before each run through ``/proc/self/clear_refs``). Run::

    accelerate launch --config_file recipes/accelerate/cpu.yaml benchmarks/bench_trainer.py

Prints a table on rank 0 and writes ``--out`` (JSON); ``--write BLOCK`` also writes it into that generated
block of the docs (:data:`BLOCKS`), replacing the previous figures.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_fcp.integrations.accelerate import FCPPlugin, shutdown
from hf_fcp.integrations.embedded import byte_tokenizer, stdlib_corpus, tiny_config
from hf_fcp.integrations.sampler import (
    PieceDataset,
    TokenBudgetSampler,
    dataset_lengths,
)
from hf_fcp.integrations.trainer import FCPTrainer
from hf_fcp.integrations.transformers import register

register()


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (data loading included)."""

    def __init__(self):
        self.ends = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.ends:
            self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds(self, warmup: int) -> np.ndarray:
        return np.diff(self.ends)[warmup:]


class RoundRobinBatches:
    """This rank's share of each global batch: documents ``rank, rank + W, ...`` (a dummy if none)."""

    def __init__(self, sampler: TokenBudgetSampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            mine = batch[self.rank::self.world]
            yield mine if mine else [(-1, 0, 1)]

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)


class DummyAware(PieceDataset):
    def __getitem__(self, piece):
        if piece[0] < 0:
            return {"input_ids": [0], "labels": [-100]}
        return super().__getitem__(piece)


class RoundRobinMixin:
    """A Trainer whose loader deals the shared global batches round-robin (whole documents), collated by
    ``self.round_robin_collator()``."""

    def __init__(self, *args, sampler: TokenBudgetSampler, **kwargs):
        super().__init__(*args, **kwargs)
        self.global_sampler = sampler

    def get_train_dataloader(self):
        from accelerate.data_loader import prepare_data_loader

        batches = RoundRobinBatches(self.global_sampler, self.args.process_index, self.args.world_size)
        loader = DataLoader(DummyAware(self.train_dataset), batch_sampler=batches,
                            collate_fn=self.round_robin_collator())
        return prepare_data_loader(loader, device=self.args.device, num_processes=1, process_index=0,
                                   put_on_device=True, use_seedable_sampler=False)


class FlattenTrainer(RoundRobinMixin, Trainer):
    """Standard Trainer + ``DataCollatorWithFlattening`` over round-robin dealt global batches."""

    def round_robin_collator(self):
        return DataCollatorWithFlattening(return_position_ids=True)


def padding_free_sft_trainer(*args, **kwargs):
    """TRL's ``SFTTrainer`` with its own padding-free collator over round-robin dealt global batches."""
    from trl import SFTTrainer

    class PaddingFreeSFT(RoundRobinMixin, SFTTrainer):
        def round_robin_collator(self):
            return self.data_collator  # TRL's DataCollatorForLanguageModeling(padding_free=True)

    return PaddingFreeSFT(*args, **kwargs)


def round_robin_imbalance(sampler: TokenBudgetSampler, steps: int, world: int) -> dict[str, float]:
    """Mean over steps of max/mean − 1 of attention cost (causal pairs) and tokens per rank."""
    cost, tokens = [], []
    for batch in sampler.batches(0)[:steps]:
        lens = [[b - a for _, a, b in batch[r::world]] for r in range(world)]
        c = np.array([sum(n * (n + 1) / 2 for n in ls) for ls in lens])
        t = np.array([sum(ls) for ls in lens], dtype=float)
        cost.append(c.max() / c.mean() - 1)
        tokens.append(t.max() / t.mean() - 1)
    return {"compute_imbalance": float(np.mean(cost)), "memory_imbalance": float(np.mean(tokens))}


FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
MODES = {"fcp": {}, "fcp_ckpt": {"activation_checkpointing": True}, "fcp_fsdp2": FSDP2, "ddp_flatten": {},
         "fcp_compile": {"torch_compile": True},  # compile (inductor): on request, --modes fcp fcp_compile
         "sft_fcp": {}, "sft_padding_free": {"padding_free": True}}  # TRL: on request
DEFAULT_MODES = ["fcp", "fcp_ckpt", "fcp_fsdp2", "ddp_flatten"]
LABELS = {"fcp": "FCPTrainer + DDP", "fcp_ckpt": "+ activation checkpointing", "fcp_fsdp2": "+ FSDP2 (instead of DDP)",
          "ddp_flatten": "Trainer + DDP + flattening", "fcp_compile": "FCPTrainer + DDP + torch.compile",
          "sft_fcp": "FCPSFTTrainer + DDP", "sft_padding_free": "SFTTrainer + DDP, `padding_free=True`"}
BLOCKS = {"trainer": "docs/performance.md", "trainer-stack": "docs/performance.md", "sft": "docs/finetuning.md"}
"""Generated blocks ``--write`` fills: block name → file."""
SCRIPT = "benchmarks/bench_trainer.py"


def peak_rss_reset() -> None:
    """Reset this process's resident-memory high-water mark (Linux; no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark since the last reset, in MB (VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def per_rank(value: float) -> list[float]:
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run(mode: str, opts, data, world: int) -> dict:
    torch.manual_seed(0)
    config = tiny_config("llama", hidden_size=opts.hidden_size, layers=opts.layers, heads=4, kv_heads=2)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="fcp")
    settings = dict(output_dir=f"outputs/bench_trainer/{mode}", max_steps=opts.steps, learning_rate=1e-3,
                    logging_steps=opts.steps, save_strategy="no", report_to=[], disable_tqdm=True,
                    use_cpu=not torch.cuda.is_available(), seed=0, **MODES[mode])
    timer = StepTimer()
    sampler = TokenBudgetSampler(dataset_lengths(data), max_tokens=world * opts.tokens_per_rank, seed=0)
    plugin = FCPPlugin(block_size=opts.block_size, tokens_per_rank=opts.tokens_per_rank)
    if mode.startswith("sft"):  # TRL: fp32 like the other rows, documents already tokenised and split by the sampler
        from trl import SFTConfig

        from hf_fcp.integrations.sft import FCPSFTTrainer

        args = SFTConfig(**settings, bf16=False, max_length=None)
        common = {"model": model, "args": args, "train_dataset": data, "processing_class": byte_tokenizer(),
                  "callbacks": [timer]}
        trainer = (FCPSFTTrainer(**common, fcp_plugin=plugin) if mode == "sft_fcp" else
                   padding_free_sft_trainer(**common, sampler=sampler))
    elif mode.startswith("fcp"):
        trainer = FCPTrainer(model=model, args=TrainingArguments(**settings), train_dataset=data, fcp_plugin=plugin,
                             callbacks=[timer])
    else:
        trainer = FlattenTrainer(model=model, args=TrainingArguments(**settings), train_dataset=data, sampler=sampler,
                                 callbacks=[timer])
    gc.collect()
    peak_rss_reset()
    start_rss = peak_rss_mb()
    trainer.train()
    rss, grown = per_rank(peak_rss_mb()), per_rank(peak_rss_mb() - start_rss)
    logs = next(h for h in trainer.state.log_history if "loss" in h)
    seconds = timer.seconds(opts.warmup)
    tokens = sum(b - a for batch in sampler.batches(0)[opts.warmup:opts.steps] for _, a, b in batch)
    out = {"mode": mode, "steps_timed": len(seconds), "step_s": float(np.median(seconds)),
           "tokens_per_s": tokens / float(seconds.sum()), "loss": logs["loss"], "peak_rss_mb": rss,
           "rss_growth_mb": grown,
           "wrapped": type(trainer.model_wrapped).__name__}
    if "fcp" in mode:
        out.update({k: logs[f"fcp/{k}"] for k in ("compute_imbalance", "memory_imbalance", "comm_MB")})
    else:
        out.update(round_robin_imbalance(sampler, opts.steps, world))
    trainer.accelerator.free_memory()
    if hasattr(trainer, "fcp"):
        trainer.fcp.teardown()  # unbind FCP's group: a later plain run calls the attention without a plan
    del trainer, model
    for key in [k for k in os.environ if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")]:
        del os.environ[key]  # Accelerate exports its FSDP settings; the next run starts clean
    gc.collect()
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens_per_rank", type=int, default=2048)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max_documents", type=int, default=300)
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--out", default="outputs/bench_trainer.json")
    parser.add_argument("--write", choices=list(BLOCKS), metavar="BLOCK",
                        help=f"also write the table into this generated block ({', '.join(BLOCKS)})")
    opts = parser.parse_args(argv)
    corpus = stdlib_corpus(opts.max_documents, seed=0)
    data = corpus.map(lambda e: {"input_ids": list(e["text"].encode()) + [256]}, remove_columns=corpus.column_names)
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by accelerate launch / torchrun
    results = [run(mode, opts, data, world) for mode in opts.modes]
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"\nworld_size={world} tokens_per_rank={opts.tokens_per_rank} block_size={opts.block_size} "
              f"model=llama h{opts.hidden_size}x{opts.layers} steps={opts.steps} (first {opts.warmup} untimed)")
        print(f"{'mode':<16} {'tokens/s':>9} {'s/step':>7} {'peak RSS MB/rank':>17} {'growth in train()':>17} "
              f"{'compute imb':>11} {'memory imb':>10} {'loss':>6}  model")
        for r in results:
            rss, grown = ("/".join(f"{x:.0f}" for x in r[k]) for k in ("peak_rss_mb", "rss_growth_mb"))
            print(f"{r['mode']:<16} {r['tokens_per_s']:>9.0f} {r['step_s']:>7.3f} {rss:>17} {grown:>17} "
                  f"{r['compute_imbalance']:>11.3f} {r['memory_imbalance']:>10.3f} {r['loss']:>6.3f}  {r['wrapped']}")
        os.makedirs(os.path.dirname(opts.out) or ".", exist_ok=True)
        with open(opts.out, "w") as f:
            json.dump({"world_size": world, "options": vars(opts), "results": results}, f, indent=2)
        if opts.write:
            write_block(opts.write, results, opts.steps)
    shutdown()
    return results


def write_block(name: str, results: list[dict], steps: int) -> None:
    """The run's table in generated block ``name`` of :data:`BLOCKS` (what the rank-0 printout shows)."""
    from hf_fcp.testing.markers import replace_block, table

    rows = [[LABELS[r["mode"]], f"{r['tokens_per_s']:.0f}", f"{r['step_s']:.2f}",
             " / ".join(f"{x:.0f}" for x in r["peak_rss_mb"]), f"{r['compute_imbalance']:.3f}",
             f"{r['memory_imbalance']:.3f}", f"{r['loss']:.3f}"] for r in results]
    header = ["run", "tokens/s", "s/step", "peak RSS per rank (MB)", "compute imbalance", "memory imbalance",
              f"loss after {steps} steps"]
    replace_block(BLOCKS[name], name, SCRIPT, table(header, rows))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
