"""Fine-tuning methods: which parameters train, how the base loads, and what the artifact holds.

The families follow the PEFT survey taxonomy (Lialin et al., 2023, "Scaling Down to Scale Up"):

| method  | family                 | paper                                 | artifact model/ | merges into weights  |
|---------|------------------------|---------------------------------------|-----------------|----------------------|
| lora    | reparameterised        | Hu et al., 2021 (+ DoRA, rsLoRA)      | peft adapter    | yes                  |
| qlora   | reparameterised        | Dettmers et al., 2023 (4-bit NF4 base)| peft adapter    | yes (onto fp base)   |
| ia3     | additive (rescaling)   | Liu et al., 2022, (IA)^3              | peft adapter    | yes                  |
| prefix  | additive (soft prompt) | Li & Liang, 2021, prefix tuning       | peft adapter    | no                   |
| prompt  | additive (soft prompt) | Lester et al., 2021, prompt tuning    | peft adapter    | no                   |
| ptuning | additive (soft prompt) | Liu et al., 2021, P-tuning (encoder)  | peft adapter    | no                   |
| bitfit  | selective              | Ben Zaken et al., 2021, BitFit        | full weights    | -                    |
| freeze  | selective              | last N blocks / named modules         | full weights    | -                    |
| full    | full fine-tuning       |                                       | full weights    | -                    |

Selective methods save full weights (not a diff): every later stage loads them as a root model, the same
way as full fine-tuning. Soft prompts cannot fold into the weights; `alignment.policy.load_policy` returns them
as an unmerged PeftModel (fine for generation and evaluation) and `require_mergeable` refuses them for stages
that train on top of the policy.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from alignment.errors import ConfigError


@dataclass(frozen=True)
class Method:
    family: str
    paper: str
    adapter: bool
    """The artifact's model/ is a peft adapter on top of its parent (else full weights)."""
    mergeable: bool
    """The adapter folds into the weights, so the policy loads as a plain causal LM."""


METHODS: dict[str, Method] = {
    "lora": Method("reparameterised", "Hu et al., 2021 (LoRA)", adapter=True, mergeable=True),
    "qlora": Method("reparameterised", "Dettmers et al., 2023 (QLoRA)", adapter=True, mergeable=True),
    "ia3": Method("additive (rescaling vectors)", "Liu et al., 2022 ((IA)^3)", adapter=True, mergeable=True),
    "prefix": Method("additive (soft prompt)", "Li & Liang, 2021 (prefix tuning)", adapter=True, mergeable=False),
    "prompt": Method("additive (soft prompt)", "Lester et al., 2021 (prompt tuning)", adapter=True, mergeable=False),
    "ptuning": Method("additive (soft prompt)", "Liu et al., 2021 (P-tuning)", adapter=True, mergeable=False),
    "adapter": Method("additive (bottleneck adapter)", "Houlsby et al., 2019; Pfeiffer et al., 2021 (adapters)",
                      adapter=True, mergeable=False),
    "bitfit": Method("selective", "Ben Zaken et al., 2021 (BitFit)", adapter=False, mergeable=True),
    "freeze": Method("selective", "train the last N blocks", adapter=False, mergeable=True),
    "full": Method("full fine-tuning", "", adapter=False, mergeable=True),
}
SOFT_PROMPTS = ("prefix", "prompt", "ptuning")
LORA_FAMILY = ("lora", "qlora")
BOTTLENECK = ("adapter",)
"""Methods of this module's own (alignment/bottleneck.py), not peft's: `peft_config` has none for them."""
UNMERGEABLE = {
    **{m: "trains virtual tokens, not weights, so it cannot be merged" for m in SOFT_PROMPTS},
    "adapter": "inserts bottleneck layers with a non-linearity between their projections, which cannot be folded "
               "into the base weights, so it cannot be merged",
}
"""Why a method cannot be merged (the message `merge: true` is refused with)."""
# Set explicitly for another method, these keys are an error (their defaults are not "off" values).
_EXPLICIT_ONLY = {"adapter_placement": BOTTLENECK, "reduction_factor": BOTTLENECK,
                  "adapter_non_linearity": BOTTLENECK, "init_lora_weights": ("lora",),
                  "loraplus_lr_ratio": ("lora",)}


def spec_problems(spec, prefix: str = "peft") -> list[tuple[str, str]]:
    """Config-load checks of a PeftSpec: impossible combinations and methods this machine cannot run."""
    m, out = spec.method, []
    only = {"use_dora": LORA_FAMILY, "use_rslora": LORA_FAMILY, "add_bias": ("bitfit",),
            "last_layers": ("freeze",), "trainable_modules": ("freeze",), "prompt_init_text": ("prompt",),
            "prefix_projection": ("prefix",), "feedforward_modules": ("ia3",)}
    for key, methods in only.items():
        if getattr(spec, key) and m not in methods:
            out.append((f"{prefix}.{key}", f"applies to method {'/'.join(methods)} only, not '{m}'"))
    for key, methods in _EXPLICIT_ONLY.items():
        if key in spec.model_fields_set and m not in methods and getattr(spec, key) not in (None, "true"):
            out.append((f"{prefix}.{key}", f"applies to method {'/'.join(methods)} only, not '{m}'"))
    if spec.loraplus_lr_ratio is not None and spec.loraplus_lr_ratio <= 0:
        out.append((f"{prefix}.loraplus_lr_ratio", "expected a positive ratio (the paper uses ~16)"))
    if m in BOTTLENECK and spec.reduction_factor < 1:
        out.append((f"{prefix}.reduction_factor", "expected at least 1 (bottleneck width = hidden size / factor)"))
    if m in LORA_FAMILY and spec.r < 1:
        out.append((f"{prefix}.r", "expected a rank of at least 1"))
    if m in SOFT_PROMPTS and spec.num_virtual_tokens < 1:
        out.append((f"{prefix}.num_virtual_tokens", "expected at least 1 virtual token"))
    if m == "freeze":
        if spec.last_layers < 0:
            out.append((f"{prefix}.last_layers", "expected 0 or more blocks"))
        if spec.last_layers == 0 and not spec.trainable_modules:
            out.append((f"{prefix}.last_layers", "freeze trains nothing: set last_layers (the last N blocks train) "
                                                 "and/or trainable_modules (name patterns)"))
        for pattern in spec.trainable_modules:
            try:
                re.compile(pattern)
            except re.error as e:
                out.append((f"{prefix}.trainable_modules", f"{pattern!r} is not a regular expression ({e})"))
    if m == "qlora":
        out.extend(_qlora_problems(prefix))
    return out


def _qlora_problems(prefix: str) -> list[tuple[str, str]]:
    import torch

    if not torch.cuda.is_available():
        return [(f"{prefix}.method", "qlora quantises the base to 4 bits with bitsandbytes, which needs a CUDA GPU, "
                                     "and this machine has none; use method: lora (the same adapter on a "
                                     "full-precision base) or run on a GPU machine")]
    if importlib.util.find_spec("bitsandbytes") is None:
        return [(f"{prefix}.method", "qlora needs bitsandbytes: pip install bitsandbytes")]
    return []


# -- loading the base ---------------------------------------------------------------------------------------------
def load_model(spec, model_dir, precision: str):
    """The model to train: 4-bit for qlora, zero-initialised biases for bitfit with add_bias, else as stored.

    Methods that train the model's own weights (bitfit, freeze, full) keep them in fp32 even when training in
    bf16: the trainer then computes in bf16 under autocast (mixed precision). A bf16 weight cannot take an update
    smaller than ~1/256 of itself, which is most Adam steps at fine-tuning learning rates. peft keeps its
    adapter weights in fp32 by itself, so adapter methods load the frozen base directly in bf16.
    """
    from alignment.models import load_causal_lm

    if spec.method == "qlora":
        return _load_4bit(spec, model_dir, precision)
    if spec.method in BOTTLENECK:
        from alignment import bottleneck

        model = load_causal_lm(model_dir, precision)
        bottleneck.add_adapters(model, bottleneck.BottleneckConfig(
            placement=spec.adapter_placement, reduction_factor=spec.reduction_factor,
            non_linearity=spec.adapter_non_linearity))
        return model
    weights = precision if METHODS[spec.method].adapter else "fp32"
    if spec.method == "bitfit" and spec.add_bias:
        return _load_with_zero_biases(model_dir, weights)
    return load_causal_lm(model_dir, weights)


def _load_4bit(spec, model_dir, precision: str):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from alignment.hardware import torch_dtype

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                               bnb_4bit_use_double_quant=spec.double_quant,
                               bnb_4bit_compute_dtype=torch_dtype(precision))
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch_dtype(precision),
                                                 device_map={"": 0}, use_safetensors=True)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _load_with_zero_biases(model_dir, precision: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignment.hardware import torch_dtype

    config = AutoConfig.from_pretrained(model_dir)
    switches = [k for k in ("attention_bias", "mlp_bias") if hasattr(config, k)]
    if not switches:
        raise ConfigError([f"peft.add_bias: {config.model_type} has no attention_bias/mlp_bias switch in its config, "
                           "so biases cannot be added in a form later stages reload; use another method"])
    for k in switches:
        setattr(config, k, True)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch_dtype(precision),
                                                       use_safetensors=True, output_loading_info=True)
    # Zero for the biases the checkpoint lacks, so the new model computes exactly what the base did; biases the
    # checkpoint has (e.g. Qwen2's q/k/v) keep their trained values.
    missing = set(info["missing_keys"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in missing and name.endswith(".bias"):
                p.zero_()
    return model


# -- which parameters train ---------------------------------------------------------------------------------------
def peft_config(spec, task_type: str = "CAUSAL_LM", *, tokenizer_path=None):
    """The peft config of an adapter method; None for bitfit / freeze / full (see `select_trainable`)."""
    import peft

    m = spec.method
    if m in BOTTLENECK:
        raise ConfigError([f"peft.method: {m} (bottleneck adapters, alignment/bottleneck.py) is trained by the sft "
                           "stage only; this stage trains peft's methods (lora, ia3, ...) or bitfit/freeze/full"])
    if m in LORA_FAMILY:
        return peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                               target_modules=spec.target_modules or "all-linear", use_dora=spec.use_dora,
                               use_rslora=spec.use_rslora,
                               init_lora_weights=True if spec.init_lora_weights == "true" else spec.init_lora_weights,
                               task_type=task_type)
    if m == "ia3":
        return peft.IA3Config(target_modules=spec.target_modules, feedforward_modules=spec.feedforward_modules,
                              task_type=task_type)
    if m == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type,
                                       prefix_projection=spec.prefix_projection,
                                       **({"encoder_hidden_size": spec.encoder_hidden_size}
                                          if spec.encoder_hidden_size else {}))
    if m == "prompt":
        if spec.prompt_init_text:
            return peft.PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type,
                                           prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                           prompt_tuning_init_text=spec.prompt_init_text,
                                           tokenizer_name_or_path=str(tokenizer_path))
        return peft.PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type)
    if m == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type,
                                        encoder_reparameterization_type="MLP",
                                        **({"encoder_hidden_size": spec.encoder_hidden_size}
                                           if spec.encoder_hidden_size else {}))
    return None


def select_trainable(model, spec) -> list[str]:
    """Set requires_grad for the non-adapter methods; return the names of the parameters that train.

    Adapter methods are left alone (peft freezes the base when it wraps the model).
    """
    m = spec.method
    if METHODS[m].adapter:
        return []
    names = [n for n, _ in model.named_parameters()]
    if m == "full":
        keep = set(names)
    elif m == "bitfit":
        keep = {n for n in names if n.endswith(".bias") or n == "bias"}
        if not keep:
            raise ConfigError([f"peft.method: bitfit trains bias terms, but this {model.config.model_type} model has "
                               "none; set peft.add_bias: true to add zero-initialised biases (attention_bias, "
                               "mlp_bias) and train those, or pick another method"])
    else:  # freeze
        keep = set()
        if spec.last_layers:
            prefix, n_blocks = transformer_blocks(model)
            if spec.last_layers > n_blocks:
                raise ConfigError([f"peft.last_layers: the model has {n_blocks} blocks ({prefix}), "
                                   f"cannot train the last {spec.last_layers}"])
            wanted = tuple(f"{prefix}.{i}." for i in range(n_blocks - spec.last_layers, n_blocks))
            keep |= {n for n in names if n.startswith(wanted)}
        for pattern in spec.trainable_modules:
            hits = {n for n in names if re.search(pattern, n)}
            if not hits:
                raise ConfigError([f"peft.trainable_modules: {pattern!r} matches no parameter "
                                   f"(names look like {names[0]!r})"])
            keep |= hits
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return sorted(keep)


def transformer_blocks(model) -> tuple[str, int]:
    """(dotted name, length) of the model's stack of transformer blocks (`model.layers` in Llama)."""
    import torch

    found = [(name, len(mod)) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) and name.split(".")[-1] in ("layers", "h", "blocks")]
    if not found:
        raise ConfigError(["peft.last_layers: cannot find this model's transformer blocks (no `layers`/`h`/`blocks` "
                           "list); name the modules with peft.trainable_modules instead"])
    return max(found, key=lambda x: x[1])


def describe(spec) -> dict:
    """What the manifest's lineage says about the method (read by `alignment.policy`)."""
    info = METHODS[spec.method]
    out = {"method": spec.method, "family": info.family, "mergeable": info.mergeable}
    if spec.method in LORA_FAMILY:
        out.update(use_dora=spec.use_dora, use_rslora=spec.use_rslora)
        if spec.loraplus_lr_ratio is not None:
            out["loraplus_lr_ratio"] = spec.loraplus_lr_ratio
        if spec.init_lora_weights != "true":
            out["init_lora_weights"] = spec.init_lora_weights
    if spec.method in BOTTLENECK:
        out.update(placement=spec.adapter_placement, reduction_factor=spec.reduction_factor,
                   non_linearity=spec.adapter_non_linearity)
    if spec.method == "qlora":
        out["trained_on"] = f"4-bit {spec.quant_type} base; merged onto the full-precision base when loaded"
    if spec.method == "bitfit" and spec.add_bias:
        out["added_biases"] = True
    return out


# -- a LoRA on lm_head (issue 16) ------------------------------------------------------------------------------------
def trl_lm_head_problems(spec, prefix: str, stage: str) -> list[tuple[str, str]]:
    """Config-load refusal of an adapter on `lm_head` for stages trained by TRL (sft, dpo, online_dpo).

    TRL's SFT/DPO trainers compute log-probs from `lm_head.weight` directly, so they refuse such an adapter, but
    only once the model is loaded and the data tokenised. Our PPO (algorithm: ppo) can train one; merging it into
    a tied head is made exact by `alignment.policy.untie_adapted_lm_head`.
    """
    targets = [spec.target_modules] if isinstance(spec.target_modules, str) else (spec.target_modules or [])
    if METHODS[spec.method].adapter and "lm_head" in targets:
        return [(f"{prefix}.target_modules", f"the {stage} stage trains with TRL, which computes log-probs from "
                                             "lm_head.weight directly, so an adapter on lm_head would never train; "
                                             "remove 'lm_head' (the ppo stage's algorithm: ppo can adapt it)")]
    return []


# -- around the trainer (sft) -------------------------------------------------------------------------------------
MUTATES_BASE = ("pissa", "olora")
"""LoRA initialisations that rewrite the base weights (to the residual of W after the adapter's part)."""


def prepare_trainer(trainer, spec, train, scratch) -> None:
    """After the trainer wrapped the model, before training: LoRA+'s optimizer, and the initial PiSSA/OLoRA
    adapter (kept in `scratch`, the stage's checkpoints folder) that `save_trained` converts against."""
    if spec.method not in LORA_FAMILY:
        return
    if spec.loraplus_lr_ratio is not None:
        import torch
        from peft.optimizers import create_loraplus_optimizer

        # Trainer.create_optimizer keeps an optimizer that is already set (the scheduler is built on it).
        trainer.optimizer = create_loraplus_optimizer(trainer.model, torch.optim.AdamW, lr=train.lr,
                                                      loraplus_lr_ratio=spec.loraplus_lr_ratio,
                                                      weight_decay=train.weight_decay)
    if spec.init_lora_weights in MUTATES_BASE and trainer.is_world_process_zero():
        trainer.model.save_pretrained(Path(scratch) / "initial_adapter", safe_serialization=True)


def save_trained(model, tok, spec, folder, parent, *, scratch) -> None:
    """The sft stage's `model/` (+ tokenizer): peft adapter pointed at `parent`, bottleneck adapters, or full weights.

    PiSSA/OLoRA adapters are saved converted to a plain LoRA on the original base (peft's
    `path_initial_model_for_weight_conversion`), so every loader applies them to the unchanged base.
    """
    from alignment.policy import point_adapter_at_parent, save_on_parent

    if spec.method in BOTTLENECK:
        from alignment import bottleneck

        bottleneck.save(model, folder)
        tok.save_pretrained(folder)
    elif spec.method in LORA_FAMILY and spec.init_lora_weights in MUTATES_BASE:
        model.save_pretrained(folder, safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(Path(scratch) / "initial_adapter"))
        tok.save_pretrained(folder)
        point_adapter_at_parent(folder, parent)
    else:
        save_on_parent(model, tok, folder, parent, adapter=METHODS[spec.method].adapter)
