"""Where stages run: the compute device rule, and that every loader puts its model there.

The GPU itself is checked by `bench/gpu_smoke.sh` on a machine that has one (docs/cluster.md); here the rule is
tested with a patched `torch.cuda`, and the loaders with the `meta` device standing in for a GPU (a model moved
there has no storage, so a loader that skipped `place` keeps CPU parameters and fails the check).
"""

from __future__ import annotations

import pytest
import torch

from alignment import hardware

from _tiny_lm import build


@pytest.fixture
def fake_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_cpu_machine_keeps_the_model_object_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = torch.nn.Linear(2, 2)
    assert hardware.compute_device() == torch.device("cpu")
    assert hardware.place(model) is model
    assert hardware.accelerator_metrics() == {}
    assert hardware.device_label() == "cpu"


@pytest.mark.parametrize("local_rank, expected", [(None, 0), ("1", 1), ("3", 1)])
def test_each_rank_takes_its_own_gpu(fake_gpus, monkeypatch, local_rank, expected):
    # srun / torchrun set LOCAL_RANK; a rank that sees fewer GPUs than its rank (CUDA_VISIBLE_DEVICES per task)
    # wraps around instead of asking for a GPU it cannot see
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert hardware.compute_device() == torch.device("cuda", expected)


def test_place_moves_the_model_to_the_gpu(fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    moved = []

    class Model:
        def to(self, device):
            moved.append(device)
            return self

    model = Model()
    assert hardware.place(model) is model
    assert moved == [torch.device("cuda", 1)]


@pytest.fixture
def meta_as_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "compute_device", lambda: torch.device("meta"))


def test_the_policy_loader_puts_the_model_on_the_compute_device(tmp_path, meta_as_gpu):
    from alignment.models import load_causal_lm

    build(tmp_path)
    model = load_causal_lm(tmp_path, "fp32")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_the_reward_model_loader_puts_the_model_on_the_compute_device(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from alignment.reward import load_reward_model

    build(tmp_path / "lm")
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "rm" / name).write_bytes((tmp_path / "lm" / name).read_bytes())
    monkeypatch.setattr(hardware, "compute_device", lambda: torch.device("meta"))
    model, _ = load_reward_model(tmp_path / "rm")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_stage_turns_hub_kernels_off_unless_the_user_chose(tiny_store, monkeypatch):
    # transformers fetches compiled "hub kernels" on a GPU when `kernels` is installed: network code at run time
    # (and a ValueError offline). A stage sets USE_HUB_KERNELS=NO unless the user set it; an up-to-date base skips.
    import os

    from alignment.runner import run_stage

    root, run = tiny_store
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    run_stage("base", "configs/tiny/base.yaml", root=root, run=run)
    assert os.environ["USE_HUB_KERNELS"] == "NO"
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    run_stage("base", "configs/tiny/base.yaml", root=root, run=run)
    assert os.environ["USE_HUB_KERNELS"] == "YES"


def test_a_published_manifest_says_where_the_stage_ran(tiny_store):
    import json

    root, run = tiny_store
    manifest = json.loads((root / run / "sft" / "manifest.json").read_text())
    assert manifest["versions"]["device"] == hardware.device_label()
    assert ("cuda_peak_memory_mb" in manifest["metrics"]) == torch.cuda.is_available()
