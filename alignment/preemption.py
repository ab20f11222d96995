"""Preemption: a signal asks the running stage to checkpoint and stop, so a requeued job resumes there.

Slurm sends `--signal=B:USR1@<seconds>` before the time limit (and SIGTERM on preemption). Saving
inside a signal handler could interrupt a half-done optimizer step, so the handler only sets a flag;
training loops look at it between steps (HF trainers through `PreemptionCallback`, our PPO loop
directly), save a complete checkpoint and return. The runner then refuses to publish and exits
with `REQUEUE_EXIT` so the job script can requeue itself.
"""

from __future__ import annotations

import logging
import signal
import threading

from alignment.errors import AlignError

log = logging.getLogger("align")
REQUEUE_EXIT = 3
"""Exit status of a stage that stopped at a checkpoint on request (not done, not failed)."""


class Requeue(AlignError):
    """Raised by the runner instead of publishing when the stage stopped at a checkpoint on request."""

    exit_code = REQUEUE_EXIT


_requested: list[str] = []


def _handler(signum, _frame) -> None:
    name = signal.Signals(signum).name
    if not _requested:
        log.warning("received %s: will save a checkpoint after the current step and stop", name)
    _requested.append(name)


def install(signals=(signal.SIGUSR1,)) -> None:
    """Route the given signals to the flag (main thread only, as Python requires: elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in signals:
        signal.signal(s, _handler)


def requested() -> bool:
    return bool(_requested)


def reset() -> None:
    _requested.clear()


def requested_anywhere() -> bool:
    """`requested()` agreed by every rank of a multi-process launch.

    The signal reaches each rank at a slightly different step; a rank that stopped alone would leave
    the others waiting in the next gradient all-reduce. So the ranks combine their flags every step
    (one tiny all-reduce), and all stop at the same step. A rank that learns of it from a peer sets
    its own flag, so its runner also requeues instead of publishing."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return requested()
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1.0 if requested() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0 and not requested():
        _requested.append("peer rank")
    return requested()


def callback():
    """A TrainerCallback that saves a checkpoint and stops training once preemption is requested."""
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if requested_anywhere():
                control.should_save = True
                control.should_training_stop = True
            return control

    return PreemptionCallback()
