"""Glue between our config sections and the HF/TRL trainers (arguments and measurements)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from alignment.errors import ArtifactError
from alignment.hardware import has_cuda, resolve_precision
from alignment.schema import TrainSpec


def trainer_args(train: TrainSpec, *, out_dir, seed: int, precision: str, report_to: str) -> dict:
    """Keyword arguments common to SFTConfig / RewardConfig / DPOConfig (all TrainingArguments), `train.args` last.

    Every TRL trainer of ours is built from these, so this is also where TRL's fused LM head is told to score only
    labelled positions on CPU (`fused_lm_head_scores_labelled_tokens_only`), before any trainer runs a forward."""
    bf16 = resolve_precision(precision) == "bf16"
    out = dict(
        output_dir=str(out_dir), learning_rate=train.lr, num_train_epochs=train.epochs, max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size, per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=train.grad_accum, warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay, lr_scheduler_type=train.lr_scheduler, max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps, save_strategy="steps", save_steps=train.save_steps,
        save_total_limit=train.save_total_limit, eval_strategy="no", seed=seed, data_seed=seed,
        bf16=bf16, use_cpu=not has_cuda(), report_to=[] if report_to == "none" else [report_to],
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding", disable_tqdm=False,
        # Fused AdamW has no CPU bf16 kernel everywhere; plain AdamW is as fast at these sizes.
        optim="adamw_torch",
    )
    # transformers 5 renamed it; TRL's configs still default the old name, so set the new one (no FutureWarning).
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in _training_fields() else \
        "gradient_checkpointing"
    out[checkpointing] = train.gradient_checkpointing
    out.update(train.args)
    fused_lm_head_scores_labelled_tokens_only()
    return out


def fused_lm_head_scores_labelled_tokens_only() -> bool:
    """On CPU, make TRL's fused LM head score only the positions that have a label (process-wide, idempotent).

    TRL 1.16 (`trl.trainer.utils.add_fused_lm_head`) scores only labelled positions where Triton runs, and every
    position elsewhere, prompt and padding included, so that compilers see fixed tile shapes (its comment: Neuron).
    Eager CPU has no such need and paid for the prompt tokens too, in fp32 torch ops over the vocabulary. The
    labelled positions get the same log-probs either way (tests/test_training_glue.py); an SFT step on SmolLM2
    took 30% less time (docs/pipeline.md). False when this TRL has no such switch (nothing changed).
    """
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    choose = getattr(trl_utils, "_use_triton", None)
    if choose is None:
        return False
    if not getattr(choose, "labelled_only", False):
        def compact(device, _triton=choose):
            return device.type == "cpu" or _triton(device)

        compact.labelled_only, compact.original = True, choose
        trl_utils._use_triton = compact
    return True


# TrainingArguments fields the runner and the stage config own: a `train.args` entry may not change them.
RESERVED_ARGS = {
    "output_dir": "the runner's checkpoint folder", "report_to": "set `report_to` or `tracking`",
    "seed": "set the stage's `seed`", "bf16": "set `precision`", "fp16": "set `precision`",
    "use_cpu": "follows the hardware", "resume_from_checkpoint": "the runner resumes on its own",
    "overwrite_output_dir": "the runner's checkpoint folder",
}


def _training_fields() -> dict:
    """{name: type hint} of transformers.TrainingArguments (imported on first use: it loads torch)."""
    global _FIELDS
    if _FIELDS is None:
        import dataclasses
        import typing

        from transformers import TrainingArguments

        hints = typing.get_type_hints(TrainingArguments)
        _FIELDS = {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(TrainingArguments) if f.init}
    return _FIELDS


_FIELDS: dict | None = None


def _enum_choices(hint) -> set[str]:
    """The allowed strings of an `SomeEnum | str` field (optim, eval_strategy, ...); empty for other types."""
    import enum
    import typing

    return {str(m.value) for t in typing.get_args(hint) if isinstance(t, type) and issubclass(t, enum.Enum)
            for m in t}


def training_args_problems(args: dict, own: dict[str, str]) -> list[str]:
    """One message per `train.args` entry that TrainingArguments would refuse (or that is not the user's to set)."""
    import difflib

    from pydantic import TypeAdapter, ValidationError

    if not args:
        return []
    fields, problems = _training_fields(), []
    for key, value in args.items():
        if key in own:
            problems.append(f"{key}: set train.{own[key]} instead (the same setting)")
        elif key in RESERVED_ARGS:
            problems.append(f"{key}: not settable here ({RESERVED_ARGS[key]})")
        elif key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            problems.append(f"{key}: not a transformers.TrainingArguments field"
                            + (f" (did you mean '{close[0]}'?)" if close else ""))
        else:
            choices = _enum_choices(fields[key])
            if choices and isinstance(value, str) and value not in choices:
                problems.append(f"{key}: expected one of {sorted(choices)}, got {value!r}")
                continue
            try:
                TypeAdapter(fields[key]).validate_python(value)
            except ValidationError as e:
                problems.append(f"{key}: {e.errors()[0]['msg']} (got {value!r})")
            except Exception:  # a hint pydantic cannot build a validator for: TrainingArguments checks it
                continue
    return problems


def progress(iterable, desc: str, *, total: int | None = None, unit: str = "batch"):
    """A progress bar for a loop that may run long (scoring, held-out evals). It appears only after 2 s, so the
    tiny profile's console stays short, and it disappears when done (`align -q` turns all bars off)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, delay=2.0, dynamic_ncols=True)


def param_counts(model) -> dict:
    if hasattr(model, "get_nb_trainable_parameters"):
        # peft counts 4-bit weights at their real size (bitsandbytes packs two per byte-sized element).
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def throughput(trainer, runtime_s: float) -> dict:
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    return {"train_tokens": tokens, "tokens_per_s": round(tokens / runtime_s, 1) if runtime_s > 0 else 0.0}


def callbacks() -> list:
    """Callbacks every stage's HF trainer gets: stop at a checkpoint when preemption is requested, and copy every
    logged row into the stage log (`<artifact>/stage.log`; the console shows them at -v)."""
    from transformers import TrainerCallback

    from alignment import preemption

    class LogRows(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                logging.getLogger("align").debug("step %d: %s", state.global_step, json.dumps(logs, default=str))
                if set(args.report_to or []) & {"wandb", "tensorboard"}:
                    from alignment import tracking

                    tracking.trainer_logged_live()

    return [preemption.callback(), LogRows()]


def save_log_history(trainer, out_dir) -> Path:
    """The trainer's logged steps as `log_history.jsonl` (one JSON object per log line), for reports and
    dashboards: the checkpoints that held `trainer_state.json` are deleted when the artifact is published."""
    path = Path(out_dir) / "log_history.jsonl"
    if not trainer.is_world_process_zero():  # every rank holds the same history; one writer
        return path
    with path.open("w") as f:
        for row in trainer.state.log_history:
            f.write(json.dumps(row) + "\n")
    return path


@dataclass
class Trained:
    result: object
    """What `trainer.train` returned (TrainOutput: training_loss, metrics)."""
    seconds: float
    cpu_seconds: float


def train(trainer, ctx) -> Trained:
    """Train (resuming from the runner's newest checkpoint when there is one), timed, then write the log history."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = train_from(trainer, ctx.resume_from)
    done = Trained(result, time.perf_counter() - t0, time.process_time() - cpu0)
    save_log_history(trainer, ctx.out_dir)
    return done


def train_from(trainer, checkpoint: Path | None):
    """`trainer.train`, resuming from `checkpoint` when given. HF loads a checkpoint's optimizer, scheduler and RNG
    files with torch's weights-only unpickler, which refuses anything but tensors (a planted or foreign pickle):
    that is one line naming the checkpoint, since every re-run would otherwise resume from it and fail again."""
    import pickle

    _bar_without_rows(trainer)
    if checkpoint is None:
        return trainer.train()
    try:
        return trainer.train(resume_from_checkpoint=str(checkpoint))
    except pickle.UnpicklingError as e:
        why = str(e).split(".")[0]
        raise ArtifactError(f"{checkpoint}: this checkpoint cannot be loaded safely ({why}: a file in it is not "
                            "plain tensors); remove that folder and re-run (it resumes from an earlier checkpoint, "
                            "or starts the stage over)") from None


def _bar_without_rows(trainer) -> None:
    """Keep the trainer's progress bar but not the dict it prints under it at every logged step: those rows go to
    the stage log (and the console at -v) and to log_history.jsonl, so the console stays short."""
    from transformers.trainer_callback import ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(BarOnly())


def group_pairs_by_length(trainer) -> bool:
    """Make `train.args.train_sampling_strategy: group_by_length` work for TRL's pair trainers (DPO, reward).

    HF's LengthGroupedSampler infers lengths from an `input_ids` column, which TRL's tokenised pairs do not have
    (prompt_ids / chosen_ids / rejected_ids), so the setting raised at the first batch. Here each pair's length is
    the row it pads to (prompt + the longer response): batches of similar pairs pad less. On the SmolLM2 default's
    300 pairs the padded tokens fall from 28% to 10% of a reward batch of 8 pairs and from 23% to 10% of a DPO batch
    of 4. The order is HF's (megabatches of 50 batches sorted by length, seeded by the trainer). Not on by default:
    batches of alike pairs change what a short run learns (the tiny reward model of tests/test_reward_stage.py ranked
    its training pairs at 0.84 instead of >= 0.9 with it). Returns whether it applied."""
    if getattr(trainer.args, "train_sampling_strategy", "random") != "group_by_length":
        return False
    from transformers.trainer_pt_utils import LengthGroupedSampler

    ds = trainer.train_dataset
    prompts = ds["prompt_ids"] if "prompt_ids" in ds.column_names else [[]] * len(ds)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, ds["chosen_ids"], ds["rejected_ids"])]
    batch = trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps

    def sampler(dataset=None):
        return LengthGroupedSampler(batch, lengths=lengths)

    trainer._get_train_sampler = sampler  # the dataloader asks the trainer for its sampler at train time
    return True
