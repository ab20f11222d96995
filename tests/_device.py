"""For tests that call a model themselves: the inputs go where the loaders put the model (alignment.hardware: the
GPU when the machine has one), and what comes back is on the CPU, beside the test's own tensors."""
from __future__ import annotations

import torch


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(device_of(model))).logits.float().cpu()


def to_model(batch: dict, model) -> dict:
    """A collated batch on the model's device (the Trainer's loop does this itself; a test calling compute_loss or
    compute_ref_log_probs directly does not)."""
    dev = device_of(model)
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
