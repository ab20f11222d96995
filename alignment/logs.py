"""What a run prints and what it keeps: a short console, the details in the artifact.

- Console verbosity: `align -q` (warnings and errors only, no progress bars), default (one line per event
  plus progress bars), `align -v` (debug lines, the resolved config, transformers' info). The level travels to
  the stage subprocesses of `align pipeline` through $ALIGN_VERBOSITY.
- Every stage attempt appends its log to `<artifact>/stage.log` (`stage_log`): our lines at debug level, every
  Python warning, transformers' warnings and the trainer's logged rows (`training.callbacks`). A resumed or
  requeued attempt appends, so the file tells the whole story of the artifact. It is runner bookkeeping (not a
  hashed output), because lines keep arriving after the outputs are hashed.
- Warnings that say nothing about the run are silenced at the source (`silence_known_warnings`), matched by
  message, never by category alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path

STAGE_LOG = "stage.log"
"""Per-artifact log file (appended by every attempt)."""
VERBOSITY_ENV = "ALIGN_VERBOSITY"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (message regex, category, why it is noise). Each names one known message: new warnings still show.
KNOWN_NOISE = (
    # transformers 5 renamed gradient checkpointing; peft/trl still call the old method on every model (our
    # trainer arguments set the new field name, so its twin warning is fixed at the source instead).
    (r".*`is_gradient_checkpointing` is deprecated", FutureWarning, "peft/trl call the old name"),
    # peft on tied-embedding models (the tiny profile, SmolLM2) targeting lm_head: the policy code handles the
    # tie when it merges (alignment/policy.py); the 20-line gemma recipe in the message does not apply.
    (r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter", UserWarning, "peft tie"),
    (r"Model with `tie_word_embeddings=True` and the tied_target_modules", UserWarning, "peft tie"),
)


def verbosity() -> int:
    """-1 quiet, 0 default, 1 verbose (from $ALIGN_VERBOSITY, set by `align -q/-v`)."""
    try:
        return max(-1, min(1, int(os.environ.get(VERBOSITY_ENV, "0"))))
    except ValueError:
        return 0


def silence_known_warnings() -> None:
    for message, category, _why in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def setup_console(level: int | None = None) -> int:
    """Configure the console for this process (and, through the environment, its stage subprocesses)."""
    level = verbosity() if level is None else max(-1, min(1, level))
    os.environ[VERBOSITY_ENV] = str(level)
    root = logging.getLogger()
    if not root.handlers:  # else someone (a test harness, an embedding program) owns the console
        logging.basicConfig(format="%(message)s", stream=sys.stderr)
        root.handlers[0].setLevel({-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[level])
    # The logger passes everything; handlers filter, so the stage log file keeps the debug lines.
    logging.getLogger("align").setLevel(logging.DEBUG)
    logging.captureWarnings(True)  # warnings reach the console once (root handler) and the stage log
    silence_known_warnings()
    if level < 0:
        # tqdm reads TQDM_* as defaults for every bar that does not pass `disable` itself (the HF trainer's);
        # datasets and huggingface_hub have their own switches.
        for var in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ[var] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", {-1: "error", 0: "warning", 1: "info"}[level])
    return level


from alignment.config import REDACT_FILTER  # noqa: E402


@contextlib.contextmanager
def stage_log(out_dir: Path, stage: str, enabled: bool = True):
    """Append this attempt's log to `<out_dir>/stage.log` while the block runs; yields the handler (or None)."""
    if not enabled:
        yield None
        return
    handler = logging.FileHandler(Path(out_dir) / STAGE_LOG, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(REDACT_FILTER)  # secrets by value never reach the file either
    targets = [logging.getLogger(n) for n in ("align", "py.warnings", "transformers", "peft", "trl", "datasets")]
    for lg in targets:
        lg.addHandler(handler)
    # `align` sets its logger to DEBUG; a program that embeds the runner may not: the file gets INFO at least.
    ours, old_level = logging.getLogger("align"), logging.getLogger("align").level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    _to_file(handler, logging.INFO, "[%s] attempt started on %s (pid %d, rank %s, Slurm job %s)", stage,
             socket.gethostname(), os.getpid(), os.environ.get("RANK", "0"), os.environ.get("SLURM_JOB_ID", "-"))
    t0 = time.time()
    try:
        yield handler
    except BaseException as e:
        # The console gets the one-line error from the CLI; the file keeps it next to the lines before it.
        _to_file(handler, logging.ERROR, "[%s] attempt ended after %.0fs: %s: %s", stage, time.time() - t0,
                 type(e).__name__, e)
        raise
    finally:
        ours.setLevel(old_level)
        for lg in targets:
            lg.removeHandler(handler)
        handler.close()


def _to_file(handler: logging.Handler, level: int, msg: str, *args) -> None:
    """A line for the stage log only (the console has its own, shorter one)."""
    handler.handle(logging.LogRecord("align", level, __file__, 0, msg, args, None))
