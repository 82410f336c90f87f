"""``FCPPlugin``: the Accelerate side of FCP.

From Accelerate's point of view FCP is plain data parallelism (DDP / FSDP2 wrap the model as usual) with
a different dataloader: every rank iterates the SAME global batches (token-budget batches of whole
documents) and keeps only its FCP shard. The plugin owns the fixed state, bound once at :meth:`setup`:
the FCP process group (its own group, so FCP's P2P traffic never interleaves with DDP's all-reduces; NCCL
on GPU, gloo on CPU), this rank and world size, and the settings, whose defaults come from ``FCP_*``
environment variables like Accelerate's ``ParallelismConfig``::

    plugin = FCPPlugin(tokens_per_rank=8192)        # or FCP_TOKENS_PER_RANK=8192 in the environment
    plugin.setup(accelerator)
    model = plugin.prepare_model(model)             # checks that the model runs attn_implementation="fcp"
    loader = plugin.prepare_dataloader(dataset, accelerator, model_config=model.config)
    model = accelerator.prepare(model)
    for batch in loader:                            # batch["fcp_plan"] is this rank's plan view
        loss = model(**batch).loss
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..engine import comm
from ..engine.kernels import select_backend
from ..plan import KERNELS, PlanSettings
from ..plan.checks import check_choice
from ..plan.cost import load_kernel_cost
from ..plan.settings import BATCH_TOKENS_PER_RANK
from .collator import FCPCollator
from .layer_kinds import attention_layers
from .sampler import (
    LONG_SEQUENCE_POLICIES,
    PieceDataset,
    TokenBudgetSampler,
    dataset_lengths,
)
from .transformers import ATTN_IMPLEMENTATION
from .workers import WorkerCollate

logger = logging.getLogger(__name__)
KERNEL_CHOICES = ("auto", *KERNELS)
_TRUE, _FALSE = ("1", "true", "yes", "on", "y", "t"), ("0", "false", "no", "off", "n", "f")


@dataclass(kw_only=True)
class FCPPlugin:
    """FCP settings for Accelerate / Trainer. ``None`` fields take the ``FCP_<NAME>`` environment
    variable, else the default shown."""

    # Each field's help is metadata, so HfArgumentParser shows it (the recipes' --help); None fields read
    # FCP_<NAME>, else the default named there, which for planner settings is PlanSettings' own.
    block_size: int | None = field(default=None, metadata={
        "help": f"Tokens per block (FCP_BLOCK_SIZE; default {PlanSettings.block_size})."})
    tokens_per_rank: int | None = field(default=None, metadata={
        "help": f"Tokens each rank holds per step (FCP_TOKENS_PER_RANK; default {BATCH_TOKENS_PER_RANK}): a global "
                f"batch holds up to world_size × tokens_per_rank tokens."})
    kernel: str | None = field(default=None, metadata={
        "help": "Attention kernel backend: auto, torch_cpu, flash_attn, torch_cuda or naive (FCP_KERNEL; default "
                "auto); it reaches every attention layer with the batch's plan (PlanSettings.kernel)."})
    overlap: bool | None = field(default=None, metadata={
        "help": "Run attention while the K/V exchange is in flight, one congestion-free round at a time (true), "
                "or exchange everything first and then run fused kernels (false) (FCP_OVERLAP; unset: the "
                "planner decides per batch by its cost model, PlanSettings.overlap='auto')."})
    long_sequence_policy: str | None = field(default=None, metadata={
        "help": "Documents longer than a global batch: split, truncate or error (FCP_LONG_SEQUENCE_POLICY; "
                "default split)."})
    strategy: str | None = field(default=None, metadata={
        "help": f"Placement strategy, for comparisons (FCP_STRATEGY; default {PlanSettings.strategy})."})
    balance: str | None = field(default=None, metadata={
        "help": f"What fcp equalises across ranks: kernel (modelled attention-kernel work) or pairs (FCP_BALANCE; "
                f"default {PlanSettings.balance}); see hf_fcp.PlanSettings.balance."})
    kernel_cost: str | None = field(default=None, metadata={
        "help": "Calibration file of your GPU's attention kernel, written by benchmarks/calibrate_attention.py "
                "(FCP_KERNEL_COST; default: the kernel measured on an H200, hf_fcp.plan.cost.FLASH)."})
    log_stats: bool = field(default=True, metadata={
        "help": "Emit plan figures with each batch (FCPTrainer logs them)."})
    timeout_s: float | None = field(default=None, metadata={
        "help": "Timeout of the FCP process group and of every FCP wait (FCP_TIMEOUT_S, else the job's timeout: "
                "TrainingArguments.ddp_timeout under FCPTrainer, else 300 s). On gloo a dead or stuck peer then "
                "makes every surviving rank raise PeerFailureError; on NCCL the group's watchdog ends the job."})

    world_size: int = field(default=1, init=False)
    rank: int = field(default=0, init=False)
    group: Any = field(default=None, init=False, repr=False)
    device: Any = field(default=None, init=False, repr=False)
    """The device FCP exchanges on (set by :meth:`setup`)."""
    group_timeout_s: float | None = field(default=None, init=False)
    """The timeout the FCP group was created with, which also bounds every gloo wait (set by :meth:`setup`)."""
    plan_settings: PlanSettings = field(default=None, init=False)
    """The planner settings these fields make (built and validated once, in ``__post_init__``)."""

    def __post_init__(self) -> None:
        self.block_size = _env("block_size", self.block_size, PlanSettings.block_size, int)
        self.tokens_per_rank = _env("tokens_per_rank", self.tokens_per_rank, BATCH_TOKENS_PER_RANK, int)
        self.kernel = check_choice("kernel", _env("kernel", self.kernel, "auto", str), KERNEL_CHOICES)
        self.overlap = _env("overlap", self.overlap, None, _to_bool)
        self.long_sequence_policy = check_choice("long_sequence_policy", _env(
            "long_sequence_policy", self.long_sequence_policy, "split", str), LONG_SEQUENCE_POLICIES)
        self.strategy = _env("strategy", self.strategy, PlanSettings.strategy, str)
        self.balance = _env("balance", self.balance, PlanSettings.balance, str)
        self.kernel_cost = _env("kernel_cost", self.kernel_cost, None, str)
        self.plan_settings = PlanSettings(  # every planner setting, validated once here
            block_size=self.block_size, tokens_per_rank=self.tokens_per_rank, strategy=self.strategy,
            balance=self.balance, overlap={None: "auto", True: "always", False: "never"}[self.overlap],
            kernel_cost=load_kernel_cost(self.kernel_cost) if self.kernel_cost else None,
            kernel=None if self.kernel == "auto" else self.kernel)
        if self.timeout_s is not None:
            self.timeout_s = comm.check_timeout(self.timeout_s, "timeout_s")
        else:
            comm.get_timeout()  # a bad FCP_TIMEOUT_S fails here, before any process group exists
        self._ready = False

    # ---- fixed state ---------------------------------------------------------------------------------
    def setup(self, accelerator=None, *, job_timeout_s: float | None = None, device=None) -> "FCPPlugin":
        """Create the FCP process group (once) and bind it as FCP's default group. Idempotent.

        Args:
            accelerator: Accelerate's ``Accelerator``; its ``device`` is the device FCP exchanges on.
            job_timeout_s: the job's collective timeout, used when neither ``timeout_s`` nor FCP_TIMEOUT_S
                is set (``FCPTrainer`` passes ``TrainingArguments.ddp_timeout``).
            device: the device the model trains on, overriding the accelerator's. Without either: the
                default group's bound device, else ``cuda:LOCAL_RANK`` when CUDA is available and the job's
                default group runs CUDA tensors on NCCL, else the CPU.

        A CUDA device gets an NCCL group, created with ``device_id`` (so every rank builds the communicator
        now, not in a later point-to-point call some ranks skip) and the timeout above; it must be the
        current CUDA device (``torch.cuda.set_device``, which Accelerate calls). The CPU gets a gloo group.
        Without torch.distributed (one process) there is no group and the world size is 1.
        """
        if self._ready:
            return self
        device = _job_device(accelerator, device)
        if self.kernel != "auto":  # fail before training if, e.g., flash-attn is asked for but missing
            select_backend(device, torch.bfloat16 if device.type == "cuda" else torch.float32, self.kernel)
        self.group_timeout_s = self._timeout(job_timeout_s)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = _new_fcp_group(device, self.group_timeout_s)
            self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            comm.set_default_group(self.group)
            logger.info("FCP group: %d ranks, %s on %s, timeout %g s", self.world_size,
                        "nccl" if device.type == "cuda" else "gloo", device, self.group_timeout_s)
        comm.set_timeout(self.group_timeout_s)
        self.device = device
        self._ready = True
        return self

    def _timeout(self, job_timeout_s) -> float:
        """``timeout_s``, else FCP_TIMEOUT_S, else ``job_timeout_s``, else 300 s."""
        if self.timeout_s is not None:
            return self.timeout_s
        env = comm.env_timeout()
        if env is not None:
            return env
        if job_timeout_s is not None:
            return comm.check_timeout(job_timeout_s, "job_timeout_s (TrainingArguments.ddp_timeout)")
        return comm.DEFAULT_TIMEOUT_S

    def teardown(self) -> None:
        """Unbind and destroy the FCP group (call before ``destroy_process_group``)."""
        if self.group is not None:
            comm.release_retired(wait=True)
            comm.set_default_group(None)
            dist.destroy_process_group(self.group)
            self.group = None
        if self._ready:
            comm.set_timeout(None)
        self._ready = False

    def prepare_model(self, model):
        """Check that the model runs FCP attention and that FCP trains it exactly: every module verified
        token-local, positions and masks FCP reproduces (:func:`hf_fcp.integrations.model_support.check_model`;
        a ``ValueError`` names the model, the feature and the way out). Returns ``model``."""
        from .model_support import check_model

        config = getattr(model, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(f"model attention: got attn_implementation={impl!r}, expected 'fcp'; load the model "
                             f"with from_pretrained(..., attn_implementation='fcp') (after import hf_fcp)")
        check_model(model)
        return model

    # ---- data ----------------------------------------------------------------------------------------
    def collator(self, model_config=None) -> FCPCollator:
        """This rank's :class:`FCPCollator`; ``model_config`` sizes the KV bytes in the plan stats and gives
        the model's attention layer kinds (full / sliding windows) the planner plans for."""
        settings = self.plan_settings
        if model_config is not None:
            heads = getattr(model_config, "num_attention_heads", None)
            settings = replace(settings, attention_layers=attention_layers(model_config),
                               kv_heads=getattr(model_config, "num_key_value_heads", None) or heads or 8,
                               head_dim=getattr(model_config, "head_dim", None) or (
                                   model_config.hidden_size // heads if heads else 128),
                               kv_dtype=_kv_dtype(model_config))
            settings = _links_for_model(settings, heads)
        pad = getattr(model_config, "pad_token_id", None)
        return FCPCollator(world_size=self.world_size, rank=self.rank, settings=settings,
                           return_stats=self.log_stats, pad_token_id=pad if isinstance(pad, int) else 0)

    def sampler(self, dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        """The :class:`TokenBudgetSampler` over ``dataset`` (same order on every rank)."""
        return TokenBudgetSampler(dataset_lengths(dataset), max_tokens=self.world_size * self.tokens_per_rank,
                                  long_sequence_policy=self.long_sequence_policy, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last)

    def prepare_dataloader(self, dataset, accelerator=None, *, shuffle: bool = True, seed: int = 0,
                           model_config=None, drop_last: bool = False, **loader_kwargs) -> DataLoader:
        """A dataloader yielding this rank's shard of every global batch (``FCPCollator`` output).

        With an ``accelerator`` the loader is Accelerate's ``DataLoaderShard`` on its device (batches,
        the plan view included, are moved there) but NOT sharded: every rank must see every global batch.
        ``loader_kwargs`` go to ``DataLoader`` (num_workers, pin_memory, ...); with ``num_workers`` ≥ 1 the
        batches are planned in the worker processes, off the training step (:class:`WorkerCollate`).
        """
        self.setup(accelerator)
        loader = DataLoader(PieceDataset(dataset), batch_sampler=self.sampler(
            dataset, shuffle=shuffle, seed=seed, drop_last=drop_last),
            collate_fn=WorkerCollate(self.collator(model_config)), **loader_kwargs)
        if accelerator is None:
            return loader
        from accelerate.data_loader import prepare_data_loader

        return prepare_data_loader(loader, device=accelerator.device, num_processes=1, process_index=0,
                                   put_on_device=True, rng_types=None, non_blocking=accelerator.non_blocking,
                                   use_seedable_sampler=False)


def _job_device(accelerator, device) -> torch.device:
    """The device FCP exchanges on (see :meth:`FCPPlugin.setup`)."""
    if device is not None:
        return torch.device(device)
    if accelerator is not None:
        return torch.device(accelerator.device)
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    bound = getattr(_world(), "bound_device_id", None)
    if bound is not None:
        return torch.device(bound)
    if torch.cuda.is_available() and comm.device_backends(_world()).get("cuda") == "nccl":
        local = os.environ.get("LOCAL_RANK", "").strip()
        return torch.device("cuda", int(local) if local.isdigit() else torch.cuda.current_device())
    return torch.device("cpu")


def _world():
    """The default (WORLD) process group."""
    return dist.group.WORLD


def _new_fcp_group(device: torch.device, timeout_s: float):
    """The FCP group: NCCL bound to ``device`` on CUDA, gloo on the CPU; created with ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type != "cuda":
        return dist.new_group(backend="gloo", timeout=timeout)
    index = torch.cuda.current_device() if device.index is None else device.index
    device = torch.device("cuda", index)
    if torch.cuda.current_device() != index:
        raise ValueError(f"torch.cuda.current_device(): got {torch.cuda.current_device()}, expected {index} (the "
                         f"FCP device {device}); call torch.cuda.set_device({index}) (the local rank) before "
                         f"FCPPlugin.setup, as Accelerate does: NCCL point-to-point calls need it")
    bound = getattr(_world(), "bound_device_id", None)
    if bound is not None and torch.device(bound) != device:
        raise ValueError(f"FCP device: got {device}, expected {bound} (the device the default process group is "
                         f"bound to with init_process_group(device_id=...))")
    kwargs = {"device_id": device} if bound is None else {}  # bound: new_group inherits it
    return dist.new_group(backend="nccl", timeout=timeout, **kwargs)


def shutdown(destroy_process_group: bool = True) -> None:
    """Clean end of a distributed run, after the caller dropped its model/trainer references: unbind
    FCP's group, collect garbage (DDP's reducer must go before its group), then destroy the default
    process group. Avoids gloo's abort at interpreter exit."""
    comm.release_retired(wait=True)
    comm.set_default_group(None)
    gc.collect()
    if destroy_process_group and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _env(name: str, value, default, parse):
    if value is not None:
        return value
    raw = os.environ.get(f"FCP_{name.upper()}")
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError as err:
        raise ValueError(f"FCP_{name.upper()}: got {raw!r}, which is not a valid {name} ({err})") from None


def _to_bool(raw) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"expected one of {_TRUE + _FALSE}")


def _kv_dtype(model_config) -> str:
    dtype = str(getattr(model_config, "dtype", None) or "float32")
    name = dtype.replace("torch.", "")
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def _links_for_model(settings: PlanSettings, q_heads: int | None) -> PlanSettings:
    """``link_cost`` and ``link_latency`` left at their defaults (H200 NVLink, Llama-3-70B heads) scaled to
    the model: moving a token takes ∝ its K/V bytes, a causal pair's kernel time ∝ query heads × head dim."""
    ref, nbytes, changes = PlanSettings(), settings.kv_bytes_per_token, {}
    if settings.link_cost == ref.link_cost and q_heads:
        mine = settings.kv_bytes_per_token / (q_heads * settings.head_dim)  # K/V bytes per pair's FLOPs
        changes["link_cost"] = ref.link_cost * mine / (ref.kv_bytes_per_token / (REFERENCE_Q_HEADS * ref.head_dim))
    if settings.link_latency == ref.link_latency:
        changes["link_latency"] = ref.link_latency * ref.kv_bytes_per_token / nbytes
    return replace(settings, **changes)


REFERENCE_Q_HEADS = 64
"""Query heads of the model the default ``link_cost`` describes (Llama-3-70B; its 8 kv heads of 128 are
``PlanSettings``' default K/V shape)."""
