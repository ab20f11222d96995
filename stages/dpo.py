"""Stage `dpo`: direct preference optimisation of the SFT policy (TRL DPOTrainer; LoRA by default).

Reads `<run>/sft/` and preference pairs (a JSONL/Parquet file or a `datasets` name/path, or with
`data.from_stage: label` the RLAIF `label` artifact's pairs.jsonl / eval.jsonl). Writes the DPO
adapter + tokenizer to `model/` (and base + SFT + DPO merged to `merged/` with `merge: true`).

The reference policy is the SFT model, not the pre-SFT base. Design (merge, then adapt):
`load_policy(sft)` merges the SFT adapter into one copy of the base weights; the trainer wraps
that model with a fresh LoRA adapter, and TRL's DPOTrainer (ref_model=None, peft model) computes
the reference by disabling the adapter, i.e. on exactly the merged SFT weights. No second copy of
the weights is loaded. Methods without an adapter to switch off (full, bitfit, freeze) keep an
explicit frozen copy instead, because TRL would otherwise reload the reference from
`config._name_or_path`, which is the raw base folder. Adapter methods: lora (with DoRA/rsLoRA)
and ia3; soft prompts and qlora are refused at config load (see `Config.problems`).
The manifest's lineage names the SFT artifact as parent, so `load_policy(dpo)` rebuilds
base + SFT + DPO in the order they were trained.
"""

from __future__ import annotations

import logging

from alignment.config import Section, StageConfig
from alignment.dpo import (adapter_disabled, data_record, dpo_trainer_class, implicit_preference, loss_problems,
                           pair_logps, reward_metrics, sampled_kl, separate_reference)
from alignment.errors import DataError
from alignment.fused_lora import use_kernel
from alignment.hardware import peak_rss_mb, resolve_precision
from alignment.models import load_tokenizer
from alignment.peft_methods import METHODS, SOFT_PROMPTS, describe, peft_config, select_trainable, trl_lm_head_problems
from alignment.policy import lineage_for, load_policy, require_mergeable, save_on_parent
from alignment.preferences import PrefData, pairs_that_fit, stage_sources, to_trl_dataset, train_eval_pairs
from alignment.schema import PeftSpec, TrainSpec
from alignment.training import callbacks, group_pairs_by_length, param_counts, throughput, train, trainer_args

log = logging.getLogger("align")


def upstream(cfg) -> tuple[str, ...]:
    return ("sft",) + ((cfg.data.from_stage,) if cfg.data.from_stage else ())  # `label`: RLAIF pairs


class DPOData(PrefData):
    soft_labels: bool = False
    """Use each pair's `p_chosen` as the probability that chosen wins (cDPO); every pair needs one."""


class DPOSpec(Section):
    """The objective (Rafailov et al., 2023) and TRL's variants of it."""

    beta: float = 0.1
    """Strength of the KL anchor to the reference: higher stays closer to the SFT model."""
    loss_type: str | list[str] = "sigmoid"
    """A TRL 1.16 DPO loss (sigmoid, ipo, hinge, robust, exo_pair, ...) or a list to mix (with loss_weights)."""
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    """robust: assumed label-flip rate in [0, 0.5); exo_pair / aot: epsilon. Other losses ignore it (refused)."""
    precompute_ref_log_probs: bool = False
    """Score every pair under the reference once before training: skips the reference forward each step."""


class EvalSpec(Section):
    kl_prompts: int = 32
    """Held-out prompts on which KL(policy || reference) is estimated from sampled responses (0: skip)."""
    kl_sample_length: int = 32


class Config(StageConfig):
    data: DPOData = DPOData()
    dpo: DPOSpec = DPOSpec()
    peft: PeftSpec = PeftSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    merge: bool = False
    """Also write base + SFT + DPO merged into full weights to `merged/` (loads with AutoModelForCausalLM)."""

    @property
    def loss_types(self) -> list[str]:
        return [self.dpo.loss_type] if isinstance(self.dpo.loss_type, str) else list(self.dpo.loss_type)

    def problems(self):
        out = loss_problems(self.loss_types, self.dpo.loss_weights, self.dpo.label_smoothing,
                            self.data.soft_labels, self.dpo.beta)
        out += self.data.problems("data") + self.peft.problems("peft") + trl_lm_head_problems(self.peft, "peft", "dpo")
        m = self.peft.method
        if m in SOFT_PROMPTS or m == "qlora":
            out.append(("peft.method", f"the dpo stage trains lora (use_dora/use_rslora), ia3, bitfit, freeze or "
                                       f"full on the merged SFT policy, not '{m}'"
                                       + (" (a 4-bit copy of base + SFT is not built yet)" if m == "qlora" else
                                          " (virtual tokens shift the scored positions)") + "; use method: lora"))
        if m == "bitfit" and self.peft.add_bias:
            out.append(("peft.add_bias", "new biases can only be added by the sft stage; train bitfit there "
                                         "with add_bias, or use method: lora here"))
        if self.merge and not METHODS[m].adapter:
            out.append(("merge", f"{m} saves full weights, there is no adapter to merge; set merge: false"))
        if self.eval.kl_prompts < 0 or self.eval.kl_sample_length < 1:
            out.append(("eval", "kl_prompts must be >= 0 and kl_sample_length >= 1"))
        return out


def preference_pairs(data: DPOData, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out pairs, each validated (a bad row stops the stage naming file and row)."""
    train, evals = train_eval_pairs(data, seed)
    missing = next((p for p in train if "p_chosen" not in p), None)
    if data.soft_labels and missing is not None:  # held-out pairs are scored without labels: only train needs it
        raise DataError(f"{data.train}: row {missing['row']}: data.soft_labels is on but the pair has no "
                        "'p_chosen'; label every pair or set data.soft_labels: false")
    return train, evals


def build_trainer(cfg: Config, sft, train_pairs: list[dict], checkpoints_dir):
    """The DPO trainer on base + SFT merged, whose reference is that same SFT model (see module doc)."""
    from trl import DPOConfig

    tok = load_tokenizer(sft.model_dir)
    policy = load_policy(sft, cfg.precision)  # base + SFT merged: one copy; its adapter-off state is the reference
    reference = None
    if not METHODS[cfg.peft.method].adapter:
        # No adapter to switch off: keep a frozen copy of the SFT model (TRL would otherwise load
        # `config._name_or_path`, the raw base folder, as the reference).
        reference = load_policy(sft, cfg.precision).requires_grad_(False)
        # Also undoes the freeze peft left on every weight when it loaded the SFT adapter for inference.
        select_trainable(policy, cfg.peft)
    args = DPOConfig(**trainer_args(cfg.train, out_dir=checkpoints_dir, seed=cfg.seed, precision=cfg.precision,
                                    report_to=cfg.report_to),
                     max_length=cfg.train.max_length, beta=cfg.dpo.beta, loss_type=cfg.loss_types,
                     loss_weights=cfg.dpo.loss_weights, label_smoothing=cfg.dpo.label_smoothing,
                     precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs)
    trainer = dpo_trainer_class(cfg.data.soft_labels)(
        model=policy, ref_model=reference, args=args, processing_class=tok, peft_config=peft_config(cfg.peft),
        train_dataset=to_trl_dataset(train_pairs), callbacks=callbacks())
    use_kernel(trainer.model, cfg.peft)
    group_pairs_by_length(trainer)
    return trainer, tok


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    sft = ctx.inputs["sft"]
    require_mergeable(sft, needed_by="dpo")  # a soft-prompt SFT has no weights to merge and adapt
    data = stage_sources(cfg.data, ctx.inputs)  # data.from_stage: the label artifact's pairs.jsonl / eval.jsonl
    train_pairs, eval_pairs = preference_pairs(data, cfg.seed)  # before the model: bad data fails in seconds
    train_pairs = pairs_that_fit(train_pairs, load_tokenizer(sft.model_dir), cfg.train.max_length, data.train)
    log.info("[dpo] %d train / %d eval pairs; loss %s, beta %s; precision %s", len(train_pairs), len(eval_pairs),
             cfg.loss_types, cfg.dpo.beta, resolve_precision(cfg.precision))
    trainer, tok = build_trainer(cfg, sft, train_pairs, ctx.checkpoints_dir)
    adapter = METHODS[cfg.peft.method].adapter
    ctx.metrics.update(param_counts(trainer.model))

    # -- train ---------------------------------------------------------------------------------
    trained = train(trainer, ctx)
    result, runtime = trained.result, trained.seconds

    # -- evaluate on held-out pairs: the SFT model (= the reference) against the DPO policy --------
    model = trainer.model
    ref_ctx = (lambda: adapter_disabled(model)) if adapter else (lambda: separate_reference(trainer.ref_model))
    lp_kw = dict(batch_size=cfg.train.eval_batch_size, max_length=cfg.train.max_length)
    dpo_lp = pair_logps(model, tok, eval_pairs, **lp_kw)
    with ref_ctx() as ref:
        sft_lp = pair_logps(ref or model, tok, eval_pairs, **lp_kw)
    kl = {}
    if cfg.eval.kl_prompts:
        kl = sampled_kl(model, ref_ctx, tok, [p["prompt"] for p in eval_pairs[: cfg.eval.kl_prompts]],
                        max_new_tokens=cfg.eval.kl_sample_length, batch_size=cfg.train.eval_batch_size,
                        seed=cfg.seed)
    held_out = {**reward_metrics(dpo_lp, sft_lp, cfg.dpo.beta),
                **{f"dpo/{k}": v for k, v in implicit_preference(dpo_lp).items()},
                **{f"sft/{k}": v for k, v in implicit_preference(sft_lp).items()}, **kl}
    log.info("[dpo] held-out: prefers chosen (summed log-prob) SFT %.3f -> DPO %.3f; reward accuracy %.3f, "
             "margin %.3f; KL %s", held_out["sft/prefers_chosen_sum"], held_out["dpo/prefers_chosen_sum"],
             held_out["rewards/accuracies"], held_out["rewards/margins"], kl.get("kl_seq", "skipped"))

    # -- save (one writer: with several processes every rank holds the same weights) ---------------
    if trainer.is_world_process_zero():
        save_on_parent(model, tok, ctx.out_dir / "model", sft, adapter=adapter)
        if cfg.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(ctx.out_dir / "merged", safe_serialization=True)
            tok.save_pretrained(ctx.out_dir / "merged")
    ctx.lineage = lineage_for(sft, adapter=adapter, reference="parent", **describe(cfg.peft),
                              preferences={"train": data_record(data.train, data.train_split,
                                                                len(train_pairs)),
                                           "eval": data_record(data.eval or data.train,
                                                               data.eval_split if data.eval else None,
                                                               len(eval_pairs))})
    ctx.metrics.update({
        "train": _last_train_log(trainer), "eval": held_out, "train_loss": result.training_loss,
        "steps": result.global_step,
        "resumed_from_step": int(ctx.resume_from.name.split("-")[-1]) if ctx.resume_from else 0,
        "train_seconds": round(runtime, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), **throughput(trainer, runtime),
    })


def _last_train_log(trainer) -> dict:
    """TRL's last logged training metrics (rewards/margins, rewards/accuracies, loss, ...)."""
    # The closing summary entry repeats some keys without `loss`; take the last real logging step.
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h and "loss" in h]
    return {k: v for k, v in logs[-1].items() if isinstance(v, (int, float))} if logs else {}
