"""Config sections shared by the training stages (data, PEFT, optimisation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from alignment.config import Section
from alignment.data import Source


class TrainSpec(Section):
    """Optimisation settings, mapped onto transformers' TrainingArguments.

    The TrainingArguments names work too (`learning_rate`, `num_train_epochs`, `per_device_train_batch_size`,
    `per_device_eval_batch_size`, `gradient_accumulation_steps`, `lr_scheduler_type`, `activation_checkpointing`),
    and `args:` passes any other TrainingArguments field through as it is (checked at load)."""

    model_config = ConfigDict(populate_by_name=True)

    lr: float = Field(2e-4, validation_alias=AliasChoices("lr", "learning_rate"))
    """Peak learning rate (TrainingArguments `learning_rate`)."""
    epochs: float = Field(1.0, validation_alias=AliasChoices("epochs", "num_train_epochs"))
    """Passes over the training data (`num_train_epochs`)."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run `epochs`)."""
    batch_size: int = Field(8, validation_alias=AliasChoices("batch_size", "per_device_train_batch_size"))
    """Examples per process per forward pass (`per_device_train_batch_size`)."""
    eval_batch_size: int = Field(16, validation_alias=AliasChoices("eval_batch_size", "per_device_eval_batch_size"))
    """Examples per process per evaluation forward pass (`per_device_eval_batch_size`)."""
    grad_accum: int = Field(1, validation_alias=AliasChoices("grad_accum", "gradient_accumulation_steps"))
    """Forward passes per optimiser step (`gradient_accumulation_steps`)."""
    max_length: int = 512
    """Tokens per example; longer examples are truncated."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", validation_alias=AliasChoices("lr_scheduler", "lr_scheduler_type"))
    """Learning-rate schedule after warm-up (`lr_scheduler_type`)."""
    logging_steps: int = 10
    """Log the training metrics every N steps."""
    save_steps: int = 50
    """Checkpoint every N steps; an interrupted run resumes from the newest one."""
    save_total_limit: int = 2
    """Checkpoints kept in the partial folder."""
    gradient_checkpointing: bool = Field(
        False, validation_alias=AliasChoices("gradient_checkpointing", "activation_checkpointing"))
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    args: dict[str, Any] = {}
    """Further transformers.TrainingArguments fields, passed to the trainer as they are (e.g. `optim: adafactor`,
    `deepspeed: ds.json`, `eval_strategy: steps`, `torch_compile: true`); names and types are checked at load
    against TrainingArguments. The pipeline's own keys (output_dir, seed, precision, report_to) stay its own."""

    @model_validator(mode="before")
    @classmethod
    def _one_name_each(cls, data):
        """`lr` and `learning_rate` are one setting: keep the later one, which is the command line's when an
        override names it differently from the file (an override of a new key goes to the end)."""
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            name = cls._own_names().get(key, key) if key != "args" else key
            out.pop(name, None)
            out[name] = value
        return out

    @field_validator("args")
    @classmethod
    def _check_args(cls, value: dict) -> dict:
        from alignment.training import training_args_problems

        problems = training_args_problems(value, own=cls._own_names())
        if problems:
            raise PydanticCustomError("align_problems", "; ".join(problems))
        return value

    @classmethod
    def _own_names(cls) -> dict[str, str]:
        """{TrainingArguments name: our key} for the settings this section already holds."""
        out = {}
        for name, field in cls.model_fields.items():
            if name == "args":
                continue
            out[name] = name
            for alias in getattr(field.validation_alias, "choices", ()):
                out[alias] = name
        return out


PeftMethod = Literal["lora", "qlora", "prefix", "prompt", "ptuning", "ia3", "adapter", "bitfit", "freeze", "full"]


class PeftSpec(Section):
    """Which parameters train; `alignment.peft_methods` documents each method and its paper.

    reparameterised: lora (Hu et al., 2021; options use_dora, use_rslora), qlora (4-bit base, CUDA only);
    additive: ia3 (Liu et al., 2022), prefix (Li & Liang, 2021), prompt (Lester et al., 2021), ptuning (Liu et al.,
    2021, prompt encoder), adapter (bottleneck adapters: Houlsby et al., 2019; Pfeiffer et al., 2021); selective: bitfit (Ben Zaken et al., 2021), freeze (last N layers / named modules);
    full fine-tuning.
    """

    method: PeftMethod = "lora"
    # -- lora / qlora (and the `r` of nothing else) ------------------------------------------------------------
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] | None = None
    """lora/qlora: modules to adapt (None: all linear layers); ia3: modules to rescale (None: peft's defaults for
    the architecture: keys, values and the FFN down projection, as in the paper)."""
    use_dora: bool = False
    """lora/qlora: DoRA (Liu et al., 2024), weight-decomposed LoRA: a trained magnitude per output column."""
    use_rslora: bool = False
    """lora/qlora: rank-stabilised LoRA (Kalajdzievski, 2023): scale alpha/sqrt(r) instead of alpha/r."""
    loraplus_lr_ratio: float | None = None
    """lora: LoRA+ (Hayou et al., 2024): the B matrices learn this many times faster than A (the paper: ~16);
    peft's `create_loraplus_optimizer`. None: one learning rate for both."""
    init_lora_weights: Literal["true", "gaussian", "pissa", "olora"] = "true"
    """lora: how A and B start. true: A random, B zero (the adapted model is the base); gaussian: A Gaussian;
    pissa (Meng et al., 2024): A, B from the top singular vectors of W, the base keeps the residual; olora
    (Büyükakyüz, 2024): from a QR decomposition of W. pissa/olora change the base during training; the saved
    adapter is converted to a plain LoRA (rank 2r) on the original base, so later stages load it as any LoRA."""
    kernel: Literal["fused", "peft"] = "fused"
    """lora: how a plain LoRA layer adds its update to the base output while a stage trains it (sft, reward, dpo,
    online_dpo, grpo, ppo).
    fused: one addmm, base(x) + scaling (x A^T) B^T inside the GEMM (alignment.fused_lora: no elementwise passes
    over the layer's output, forward or backward; the same math rounded once); peft: peft's own forward. Layers that
    are not plain LoRA (DoRA, dropout, merged, disabled) use peft's either way."""
    # -- ia3 --------------------------------------------------------------------------------------------------------
    feedforward_modules: list[str] | None = None
    """ia3: which of target_modules are feed-forward (scaled on their input, not output); None: peft's defaults."""
    # -- prefix / prompt / ptuning (soft prompts) ---------------------------------------------------------------
    num_virtual_tokens: int = 20
    prompt_init_text: str | None = None
    """prompt: start the soft prompt from this text's token embeddings (Lester et al.) instead of random vectors."""
    encoder_hidden_size: int | None = None
    """ptuning: hidden size of the prompt encoder MLP; prefix with prefix_projection: of the projection (None:
    the model's hidden size)."""
    prefix_projection: bool = False
    """prefix: reparameterise the prefix through an MLP (Li & Liang train more stably with it)."""
    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _init_true(cls, value):
        # YAML reads `true` as a boolean; peft's default initialisation is spelled "true" here.
        return "true" if value is True else value

    # -- adapter (bottleneck) -------------------------------------------------------------------------------------
    adapter_placement: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    """adapter: pfeiffer, one adapter after each block's feed-forward sublayer; houlsby, one after attention and
    one after the feed-forward sublayer."""
    reduction_factor: int = 16
    """adapter: bottleneck width = hidden size / reduction_factor."""
    adapter_non_linearity: Literal["relu", "gelu", "silu"] = "relu"
    """adapter: the activation between the down and up projections."""
    # -- bitfit -----------------------------------------------------------------------------------------------------
    add_bias: bool = False
    """bitfit on a model without biases (Llama, SmolLM2): switch on the config's attention_bias/mlp_bias and start
    those biases at zero, so training starts from exactly the base model. Without it such a model is refused."""
    # -- freeze -----------------------------------------------------------------------------------------------------
    last_layers: int = 0
    """freeze: train the last N transformer blocks."""
    trainable_modules: list[str] = []
    """freeze: also train parameters whose name matches one of these regular expressions (e.g. 'lm_head', 'norm')."""
    # -- qlora ------------------------------------------------------------------------------------------------------
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True

    def problems(self, prefix: str = "peft") -> list[tuple[str, str]]:
        """Cross-field checks, for the `problems()` of any stage config holding a PeftSpec."""
        from alignment.peft_methods import spec_problems

        return spec_problems(self, prefix)


class SourceSpec(Section):
    """One dataset of an instruction mixture (FLAN / OPT-IML style)."""

    name: str
    """Names this source in the manifest's realised mixture and in the per-source eval losses."""
    train: Source | None = None
    """Training rows (a path or a DataSource mapping, as data.train). None: an eval-only source (needs `eval`)."""
    from_stage: Literal["generate"] | None = None
    """Train on a stage's published data instead of a file: `generate` reads the run's Self-Instruct artifact
    (its train.jsonl), verified through the artifact store like every input (leave `train` unset)."""
    eval: Source | None = None
    """This source's evaluation rows. None: split data.eval_fraction off its training rows."""
    train_split: str = "train"
    eval_split: str = "test"
    weight: float | None = None
    """Mixing rate: the source's share of the training examples is weight / sum(weights). Leave every weight
    unset for examples-proportional mixing (each source in proportion to its size after the cap)."""
    cap: int | None = None
    """At most this many training examples from this source (the K of examples-proportional mixing, T5/FLAN)."""
    category: str | None = None
    """Task/category label of every row of this source; None: each row's own `category` field."""
    categories: list[str] | None = None
    """Keep only rows of these categories (a task subset of a larger file)."""
    held_out: bool = False
    """Evaluation only: never trained on; its loss is reported per source."""
    sample: Literal["random", "first"] = "random"
    """Which rows a cap or weight keeps: a seeded random sample, or the first rows in file order."""


class SFTData(Section):
    train: Source = "data/instruct/train.jsonl"
    """A file (JSONL/JSON/CSV/Parquet), folder or hub id, or a mapping (alignment.data.DataSource: data_files, name,
    revision, split, columns, format); rows hold `messages`, `prompt` + `completion`, Alpaca or ShareGPT.
    The one-source form; ignored when `sources` is given."""
    eval: Source | None = "data/instruct/eval.jsonl"
    """Held-out rows; None: split `eval_fraction` off the train rows."""
    train_split: str = "train"
    eval_split: str = "test"
    sources: list[SourceSpec] = []
    """An instruction mixture: several datasets with weights, caps and labels (replaces train/eval)."""
    held_out_categories: list[str] = []
    """Categories never trained on: their rows are dropped from every source's training rows and their eval
    rows (from every source, whatever its `categories` filter) are reported as a loss per category."""
    eval_fraction: float = 0.1
    max_bad_fraction: float = 0.0
    """Refuse to start when more than this fraction of rows is malformed (0: any bad row is fatal)."""
    max_train_examples: int | None = None
    """Training examples in all (the one-source form: the first N rows). None: as many as weights and caps allow."""
    max_eval_examples: int | None = None
    """Evaluation examples per eval group (the eval set, each source, each held-out category)."""

    def problems(self, prefix: str = "data") -> list[tuple[str, str]]:
        out = []
        if not 0 <= self.max_bad_fraction < 1:
            out.append((f"{prefix}.max_bad_fraction", "expected a fraction in [0, 1)"))
        if not 0 < self.eval_fraction < 1:
            out.append((f"{prefix}.eval_fraction", "expected a fraction in (0, 1)"))
        if self.sources:
            for key in ("train", "eval", "train_split", "eval_split"):
                if key in self.model_fields_set:
                    out.append((f"{prefix}.{key}", "use either data.train/data.eval (one source) or data.sources, "
                                                   f"not both; give each source its own {key}"))
            names = [s.name for s in self.sources]
            weighted = [s.weight is not None for s in self.sources if not s.held_out]
            if any(weighted) and not all(weighted):
                out.append((f"{prefix}.sources", "give every training source a weight (mixing rates), or none "
                                                 "(examples-proportional mixing)"))
            for i, s in enumerate(self.sources):
                key = f"{prefix}.sources.{i}"
                if names.count(s.name) > 1:
                    out.append((f"{key}.name", f"'{s.name}' names more than one source"))
                if s.from_stage and s.train is not None:
                    out.append((f"{key}.from_stage", "reads the stage's train.jsonl: leave `train` unset"))
                if s.train is None and s.eval is None and not s.from_stage:
                    out.append((f"{key}.train", "a source needs train rows, eval rows or both"))
                if s.train is None and not s.from_stage and s.eval is not None and not s.held_out:
                    out.append((f"{key}.held_out", "a source without train rows is eval-only: set held_out: true"))
                if s.weight is not None and s.weight <= 0:
                    out.append((f"{key}.weight", "expected a positive mixing rate"))
                if s.cap is not None and s.cap < 1:
                    out.append((f"{key}.cap", "expected at least 1 example"))
            if not any(not s.held_out for s in self.sources):
                out.append((f"{prefix}.sources", "every source is held out: nothing to train on"))
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                out.append((f"{prefix}.{key}", "expected at least 1 (or leave unset)"))
        return out
