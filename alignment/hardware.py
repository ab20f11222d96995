"""Device and precision decisions, made once per stage."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmul runs ~4-6x faster than fp32 on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_device():
    """Where a stage's own loops (PPO, sampling, judging, scoring, eval) run: this process's GPU when it has one
    (`cuda:LOCAL_RANK` under torchrun / srun, modulo the GPUs it sees), else the CPU. `CUDA_VISIBLE_DEVICES=`
    keeps a stage on the CPU. TRL's trainers place their models the same way (accelerate's device); accelerate's
    `PartialState().device` is not used here because constructing it starts the process group as a side effect,
    which `alignment.cluster` does itself, once."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def place(model):
    """`model` on `compute_device()`; on a CPU-only machine the same object, untouched."""
    device = compute_device()
    return model if device.type == "cpu" else model.to(device)


def device_label() -> str:
    """The manifest's `versions.device`: `cpu`, or `cuda:0 NVIDIA H200` (figures depend on it)."""
    device = compute_device()
    if device.type == "cpu":
        return "cpu"
    import torch

    return f"{device} {torch.cuda.get_device_name(device)}"


def accelerator_metrics() -> dict:
    """Peak GPU memory of this stage's process, in MB (a manifest metric); nothing on a CPU-only machine. Also
    the evidence that a stage ran on the GPU at all: a stage that never touched CUDA reports nothing."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_peak_memory_mb": round(torch.cuda.max_memory_allocated(compute_device()) / 2**20, 1)}


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' where the hardware runs bf16 fast, else 'fp32'."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def torch_dtype(precision: str):
    import torch

    return torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
