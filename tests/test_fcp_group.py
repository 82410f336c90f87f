"""The FCP process group (issue: first 8-GPU run): ``FCPPlugin.setup`` creates it with the job's timeout
(``FCPPlugin(timeout_s=)``, else FCP_TIMEOUT_S, else the Trainer's ``ddp_timeout``, else 300 s) and with NCCL,
bound to the device, whenever the model's device is CUDA — with or without an Accelerator. ``new_group`` and
the CUDA queries are mocked: this runs on a CPU machine.
"""

from __future__ import annotations

import datetime
import types

import pytest
import torch
import torch.distributed as dist

from hf_fcp.engine import comm
from hf_fcp.integrations import accelerate
from hf_fcp.integrations.accelerate import FCPPlugin


@pytest.fixture
def fake_world(monkeypatch):
    """torch.distributed as seen by FCPPlugin.setup in a 4-rank job; records new_group's arguments."""
    created = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "new_group", lambda **kw: created.append(kw) or object())
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: None)
    monkeypatch.setattr(comm, "set_default_group", lambda group: None)
    monkeypatch.setattr(accelerate, "_world", lambda: types.SimpleNamespace(bound_device_id=None))
    monkeypatch.delenv("FCP_TIMEOUT_S", raising=False)
    yield created
    comm.set_timeout(None)


@pytest.mark.parametrize("plugin_s, env_s, job_s, expected", [
    (42.0, "7", 99, 42.0),  # FCPPlugin(timeout_s=) first
    (None, "7", 99, 7.0),  # then FCP_TIMEOUT_S
    (None, None, 99, 99.0),  # then the job's timeout (FCPTrainer: TrainingArguments.ddp_timeout)
    (None, None, None, 300.0),
])
def test_fcp_group_gets_the_job_timeout(monkeypatch, fake_world, plugin_s, env_s, job_s, expected):
    if env_s is not None:
        monkeypatch.setenv("FCP_TIMEOUT_S", env_s)
    plugin = FCPPlugin(timeout_s=plugin_s).setup(job_timeout_s=job_s)
    (kwargs,) = fake_world
    assert kwargs["timeout"] == datetime.timedelta(seconds=expected) and kwargs["backend"] == "gloo"
    assert plugin.group_timeout_s == expected == comm.get_timeout()  # gloo waits use the same bound
    assert (plugin.world_size, plugin.rank) == (4, 1)
    plugin.teardown()
    monkeypatch.delenv("FCP_TIMEOUT_S", raising=False)
    assert comm.get_timeout() == comm.DEFAULT_TIMEOUT_S


def test_bad_job_timeout_names_ddp_timeout(fake_world):
    with pytest.raises(ValueError, match=r"ddp_timeout\): got 0"):
        FCPPlugin().setup(job_timeout_s=0)
    assert fake_world == []


def _cuda(monkeypatch, current: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_cuda_accelerator_gets_an_nccl_group_bound_to_its_device(monkeypatch, fake_world):
    _cuda(monkeypatch, 1)
    plugin = FCPPlugin(timeout_s=60).setup(types.SimpleNamespace(device=torch.device("cuda", 1)))
    (kwargs,) = fake_world
    assert kwargs == {"backend": "nccl", "timeout": datetime.timedelta(seconds=60),
                      "device_id": torch.device("cuda", 1)}
    assert plugin.device == torch.device("cuda", 1)


@pytest.mark.parametrize("job_backends, expected", [
    ({"cuda": "nccl"}, "nccl"),  # init_process_group() on a GPU machine
    ({"cpu": "gloo", "cuda": "nccl"}, "nccl"),
    ({"cpu": "gloo", "cuda": "gloo"}, "gloo"),  # a gloo job on a GPU machine stays on the CPU
])
def test_without_accelerator_the_job_backend_and_local_rank_decide(monkeypatch, fake_world, job_backends, expected):
    _cuda(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(comm, "device_backends", lambda group: job_backends)
    FCPPlugin().setup()
    (kwargs,) = fake_world
    assert kwargs["backend"] == expected
    assert kwargs.get("device_id") == (torch.device("cuda", 2) if expected == "nccl" else None)


def test_set_device_not_called_fails_clearly(monkeypatch, fake_world):
    _cuda(monkeypatch, 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(comm, "device_backends", lambda group: {"cuda": "nccl"})
    with pytest.raises(ValueError, match=r"torch.cuda.current_device\(\): got 0, expected 3.*set_device\(3\)"):
        FCPPlugin().setup()
    assert fake_world == []  # before any group exists


def test_device_other_than_the_bound_one_fails_clearly(monkeypatch, fake_world):
    _cuda(monkeypatch, 1)
    monkeypatch.setattr(accelerate, "_world", lambda: types.SimpleNamespace(bound_device_id=torch.device("cuda", 0)))
    with pytest.raises(ValueError, match=r"FCP device: got cuda:1, expected cuda:0"):
        FCPPlugin().setup(device="cuda:1")


def test_fcp_trainer_passes_ddp_timeout(tmp_path, monkeypatch):
    import copy

    from transformers import AutoModelForCausalLM, TrainingArguments

    from hf_fcp.integrations.embedded import tiny_config
    from hf_fcp.integrations.trainer import FCPTrainer
    from hf_fcp.testing.helpers import VOCAB
    from hf_fcp.testing.helpers import token_dataset as dataset

    monkeypatch.delenv("FCP_TIMEOUT_S", raising=False)
    cfg = tiny_config("llama", vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fcp")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, ddp_timeout=123)
    trainer = FCPTrainer(model=model, args=args, train_dataset=dataset())
    try:
        assert trainer.fcp.group_timeout_s == 123 == comm.get_timeout()
    finally:
        trainer.close(destroy_process_group=False)
    assert comm.get_timeout() == comm.DEFAULT_TIMEOUT_S
