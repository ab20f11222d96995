"""Stage `reward`: a reward model trained on preference pairs (TRL RewardTrainer + peft LoRA).

The RM starts from the SFT policy (`init: sft`, base + SFT adapter merged) or from the base
model (`init: base`): the causal LM's transformer is carried over into a sequence-classification
model with one output and a fresh score head. LoRA (task SEQ_CLS: the score head trains fully;
DoRA/rsLoRA, (IA)^3 and full fine-tuning work too) learns the pairwise loss: Bradley-Terry with
an optional per-pair margin, or, when every pair has the labeller's `p_chosen` (RLAIF), the
cross-entropy on that soft label.

`model/` holds the MERGED sequence-classification model + tokenizer, so
`AutoModelForSequenceClassification.from_pretrained(<artifact>/model)` is all a consumer needs
(evaluation, GRPO/RLOO, a user). A LoRA RM is also published unmerged in `adapter/` (peft layout:
the LoRA weights + the score head, safetensors), which PPO loads as a fourth role on its one base.
The manifest records the base, the lineage (the policy it was initialised from), the reward
mean/std over the training responses (for PPO to whiten rewards) and the quality gate on held-out pairs. An RM that misses a `gate:` threshold is still
published, with status `failed_gate`, and the command fails naming the thresholds.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from alignment.config import Section, StageConfig
from alignment.errors import DataError
from alignment.hardware import peak_rss_mb, resolve_precision
from alignment.models import load_tokenizer
from alignment.peft_methods import peft_config
from alignment.policy import lineage_for, load_policy, require_mergeable
from alignment.preferences import PrefData, stage_sources, to_trl_dataset, train_eval_pairs
from alignment.reward import (gate_failures, gate_metrics, mean_std, metrics_by_group, pairwise_accuracy,
                              reward_model_from_policy, score_pairs, soft_label_reward_trainer)
from alignment.reward_sources import ADAPTER_DIR
from alignment.schema import PeftSpec, TrainSpec
from alignment.training import callbacks, param_counts, throughput, train, trainer_args

log = logging.getLogger("align")
PEFT_METHODS = ("lora", "ia3", "full")
"""Methods whose result folds into one plain sequence-classification model (lora with use_dora/use_rslora)."""
LABEL_ARTIFACT = "artifact:label"
"""`data.train` value that reads the RLAIF `label` stage's pairs, `<label artifact>/pairs.jsonl` (or data.from_stage: label)."""


class RewardData(PrefData):
    train: str = "data/prefs/train.jsonl"
    """JSONL/Parquet file, a `datasets` name/path, or `artifact:label` (the label stage's pairs)."""
    eval_fraction: float = 0.2


class LossSpec(Section):
    labels: Literal["auto", "hard", "soft"] = "auto"
    """auto: soft-label cross-entropy when every train pair has `p_chosen`, else Bradley-Terry.
    hard: Bradley-Terry on chosen > rejected even when `p_chosen` is given. soft: require `p_chosen`."""
    use_margin: bool = True
    """Bradley-Terry with the pairs' `margin` (Llama 2) when every pair has one."""
    center_rewards_coefficient: float | None = None
    """Reward centering (Eisenstein et al., 2023): adds coef * mean((r_c + r_r)^2); TRL suggests 0.01."""


class GateSpec(Section):
    """Thresholds on the held-out pairs an RM must meet to drive RL (None: not checked)."""

    min_accuracy: float | None = 0.6
    max_length_corr: float | None = 0.5
    """Upper bound on |Pearson r| between reward and response length (tokens)."""
    max_ece: float | None = None
    ece_bins: int = 10


class Config(StageConfig):
    init: Literal["sft", "base"] = "sft"
    """Start the RM from the SFT policy (base + SFT merged) or from the base model."""
    data: RewardData = RewardData()
    loss: LossSpec = LossSpec()
    peft: PeftSpec = PeftSpec()
    train: TrainSpec = TrainSpec()
    gate: GateSpec = GateSpec()

    def problems(self):
        out = []
        for key in ("train", "eval"):
            value = getattr(self.data, key)
            if value and value.startswith("artifact:") and value != LABEL_ARTIFACT:
                out.append((f"data.{key}", f"only '{LABEL_ARTIFACT}' names an artifact, got {value!r}"))
        if self.data.eval == LABEL_ARTIFACT:
            out.append(("data.eval", "held-out pairs must not come from the label artifact's train file"))
        out += self.data.problems("data") + self.peft.problems("peft")
        if self.peft.method not in PEFT_METHODS:
            out.append(("peft.method", f"the reward stage trains {', '.join(PEFT_METHODS)} (merged into one "
                                       f"sequence-classification model), not '{self.peft.method}'"))
        if self.gate.ece_bins < 1:
            out.append(("gate.ece_bins", "expected at least 1 bin"))
        return out


def upstream(cfg: Config) -> tuple[str, ...]:
    names = ("base", "sft") if cfg.init == "sft" else ("base",)
    return names + (("label",) if cfg.data.train == LABEL_ARTIFACT or cfg.data.from_stage == "label" else ())


def _load_data(cfg: Config, ctx) -> tuple[list[dict], list[dict], str]:
    d = stage_sources(cfg.data, ctx.inputs)
    source = str(ctx.inputs["label"].path / "pairs.jsonl") if d.train == LABEL_ARTIFACT else d.train
    train, held_out = train_eval_pairs(d, cfg.seed, train_source=source)
    return train, held_out, source


def _labels(cfg: Config, pairs: list[dict], source: str) -> str:
    has_p = all("p_chosen" in p for p in pairs)
    if cfg.loss.labels == "soft" and not has_p:
        missing = next(p for p in pairs if "p_chosen" not in p)
        raise DataError(f"{source}: row {missing['row']}: loss.labels is 'soft' but the pair has no 'p_chosen'")
    return "soft" if cfg.loss.labels == "soft" or (cfg.loss.labels == "auto" and has_p) else "hard"


def _train_dataset(pairs: list[dict], labels: str, use_margin: bool):
    ds = to_trl_dataset(pairs)
    drop = [c for c in ds.column_names
            if (c == "p_chosen" and labels == "hard") or (c == "margin" and (labels == "soft" or not use_margin))]
    return ds.remove_columns(drop)


def _by_category(pairs: list[dict], scores: dict) -> dict[str, dict]:
    """Held-out pairs, accuracy, margin and length correlation per `category` (the constraint kind)."""
    return metrics_by_group([p.get("category") for p in pairs], scores["chosen"], scores["rejected"],
                            scores["len_chosen"], scores["len_rejected"])


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed
    from trl import RewardConfig

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    train_pairs, eval_pairs, source = _load_data(cfg, ctx)
    labels = _labels(cfg, train_pairs, source)
    train_ds = _train_dataset(train_pairs, labels, cfg.loss.use_margin)
    parent = ctx.inputs[cfg.init]
    require_mergeable(parent, needed_by="reward")  # a soft-prompt SFT has no weights to carry into the RM
    log.info("[reward] %d train / %d held-out pairs from %s; %s labels%s; init from %s (%s); precision %s",
             len(train_pairs), len(eval_pairs), source, labels, " + margin" if "margin" in train_ds.column_names
             else "", cfg.init, parent.path, resolve_precision(cfg.precision))

    tok = load_tokenizer(ctx.inputs["base"].model_dir)
    policy = load_policy(parent, cfg.precision)
    model = reward_model_from_policy(policy, tok.pad_token_id)
    del policy
    log.info("[reward] reward model %s (num_labels=1); peak RSS so far %.0f MB",
             type(model).__name__, peak_rss_mb())
    max_len = cfg.train.max_length
    before = score_pairs(model, tok, eval_pairs, batch_size=cfg.train.eval_batch_size, max_length=max_len)

    args = RewardConfig(**trainer_args(cfg.train, out_dir=ctx.checkpoints_dir, seed=cfg.seed,
                                       precision=cfg.precision, report_to=cfg.report_to),
                        max_length=max_len, center_rewards_coefficient=cfg.loss.center_rewards_coefficient)
    trainer = soft_label_reward_trainer()(model=model, args=args, processing_class=tok, train_dataset=train_ds,
                                          peft_config=peft_config(cfg.peft, "SEQ_CLS"),
                                          callbacks=callbacks())
    # RewardTrainer drops (does not truncate) pairs longer than max_length.
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise DataError(f"{source}: every pair is longer than train.max_length={max_len} tokens; raise it")
    ctx.metrics.update(param_counts(trainer.model))

    # -- train ---------------------------------------------------------------------------------
    trained = train(trainer, ctx)
    result, runtime = trained.result, trained.seconds

    # -- save ----------------------------------------------------------------------------------
    # LoRA on base + SFT: also unmerged (adapter + score head, peft layout), which PPO loads as a role on its own
    # base instead of a second model (alignment.reward_sources.AdapterReward).
    if cfg.peft.method == "lora" and trainer.is_world_process_zero():
        trainer.model.save_pretrained(ctx.out_dir / ADAPTER_DIR, safe_serialization=True)
    # Merged, so the artifact is one plain AutoModelForSequenceClassification folder.
    rm = trainer.model.merge_and_unload() if cfg.peft.method != "full" else trainer.model
    rm.config.pad_token_id = tok.pad_token_id
    if trainer.is_world_process_zero():  # one writer: with several processes every rank holds the same weights
        rm.save_pretrained(ctx.out_dir / "model", safe_serialization=True)
        tok.save_pretrained(ctx.out_dir / "model")
    ctx.lineage = lineage_for(parent, adapter=False, init=cfg.init, head="sequence_classification",
                              method=cfg.peft.method, merged=cfg.peft.method != "full")

    # -- quality gate --------------------------------------------------------------------------
    bs = cfg.train.eval_batch_size
    t0 = time.perf_counter()
    held = score_pairs(rm, tok, eval_pairs, batch_size=bs, max_length=max_len)
    seen = score_pairs(rm, tok, train_pairs, batch_size=bs, max_length=max_len)
    gate = gate_metrics(held["chosen"], held["rejected"], held["len_chosen"], held["len_rejected"],
                        cfg.gate.ece_bins)
    failures = gate_failures(gate, min_accuracy=cfg.gate.min_accuracy, max_length_corr=cfg.gate.max_length_corr,
                             max_ece=cfg.gate.max_ece)
    score_seconds = time.perf_counter() - t0
    reward_mean, reward_std = mean_std(seen["chosen"] + seen["rejected"])
    by_category = _by_category(eval_pairs, held)
    ctx.metrics.update({
        **{f"eval_{k}": round(v, 4) for k, v in gate.items()},
        "eval_accuracy_by_category": {c: v["accuracy"] for c, v in by_category.items()},
        "eval_by_category": by_category,
        "eval_accuracy_before": round(pairwise_accuracy(before["chosen"], before["rejected"]), 4),
        "train_accuracy": round(pairwise_accuracy(seen["chosen"], seen["rejected"]), 4),
        # PPO whitens the RM's scores with these: (r - reward_mean) / reward_std.
        "reward_mean": reward_mean, "reward_std": reward_std,
        "gate": cfg.gate.model_dump(), "gate_passed": not failures, "gate_failures": failures,
        "loss_labels": labels, "train_loss": result.training_loss, "steps": result.global_step,
        "resumed_from_step": int(ctx.resume_from.name.split("-")[-1]) if ctx.resume_from else 0,
        "train_pairs": len(train_pairs), "train_pairs_too_long": len(train_pairs) - kept,
        "eval_pairs": len(eval_pairs), "eval_responses_truncated": held["truncated"],
        "train_seconds": round(runtime, 2), "score_seconds": round(score_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), **throughput(trainer, runtime),
    })
    for cat, v in by_category.items():
        log.info("[reward]   %-14s %3d pairs: accuracy %.3f, length corr %+.3f", cat, v["pairs"], v["accuracy"],
                 v["length_corr"])
    log.info("[reward] held-out accuracy %.3f (before %.3f), mean margin %.3f, ECE %.3f, length corr %.3f; "
             "rewards mean %.3f std %.3f", gate["accuracy"], ctx.metrics["eval_accuracy_before"],
             gate["mean_margin"], gate["ece"], gate["length_corr"], reward_mean, reward_std)
    if failures:
        # Published anyway (the runner keeps it, for inspection), but marked unfit to drive RL.
        ctx.status = "failed_gate"
        log.error("[reward] quality gate failed: %s", "; ".join(failures))
