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

log = logging.getLogger("align")
REQUEUE_EXIT = 3
"""Exit status of a stage that stopped at a checkpoint on request (not done, not failed)."""

_requested: list[str] = []


def _handler(signum, _frame) -> None:
    name = signal.Signals(signum).name
    if not _requested:
        log.warning("received %s: will save a checkpoint after the current step and stop", name)
    _requested.append(name)


def install(signals=(signal.SIGUSR1,)) -> None:
    """Route the given signals to the flag (main thread only, as Python requires)."""
    for s in signals:
        signal.signal(s, _handler)


def requested() -> bool:
    return bool(_requested)


def reset() -> None:
    _requested.clear()


def callback():
    """A TrainerCallback that saves a checkpoint and stops training once preemption is requested."""
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if requested():
                control.should_save = True
                control.should_training_stop = True
            return control

    return PreemptionCallback()
