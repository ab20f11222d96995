"""Config sections shared by the training stages (data, PEFT, optimisation)."""

from __future__ import annotations

from typing import Literal

from alignment.config import Section


class TrainSpec(Section):
    """Optimisation settings, mapped onto transformers' TrainingArguments."""

    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run `epochs`)."""
    batch_size: int = 8
    eval_batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 512
    """Tokens per example; longer examples are truncated."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    logging_steps: int = 10
    save_steps: int = 50
    """Checkpoint every N steps; an interrupted run resumes from the newest one."""
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0


class PeftSpec(Section):
    """Which parameters train. LoRA (Hu et al., 2021) on all linear layers by default."""

    method: Literal["lora", "full"] = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


class SFTData(Section):
    train: str = "data/instruct/train.jsonl"
    """JSONL/Parquet file or a `datasets` name/path; rows hold `messages` or `prompt` + `completion`."""
    eval: str | None = "data/instruct/eval.jsonl"
    """Held-out rows; None: split `eval_fraction` off the train rows."""
    train_split: str = "train"
    eval_split: str = "test"
    eval_fraction: float = 0.1
    max_bad_fraction: float = 0.0
    """Refuse to start when more than this fraction of rows is malformed (0: any bad row is fatal)."""
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
