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
mean/std over the training responses (for PPO to whiten rewards) and the quality gate on held-out pairs.
Further held-out sets (`data.eval_sets`, e.g. the bundled pairs whose prompts use phrasings no training pair
uses) are scored and reported apart, like the eval stage's `prompt_sets`, so an RM that learned the training
phrasings rather than the constraints shows. An RM that misses a `gate:` threshold (also a per-kind floor on
one set, `gate.min_kind_accuracy`) is still published, with status `failed_gate`, and the command fails
naming the thresholds.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Literal

from alignment.config import Section, StageConfig
from alignment.errors import DataError
from alignment.fused_lora import use_kernel
from alignment.hardware import peak_rss_mb, resolve_precision
from alignment.models import load_tokenizer
from alignment.peft_methods import peft_config
from alignment.policy import lineage_for, load_policy, require_mergeable
from alignment.preferences import PrefData, load_pairs, stage_sources, to_trl_dataset, train_eval_pairs
from alignment.evaluation import bootstrap_ci
from alignment.reward import (gate_failures, gate_metrics, kind_gate_failures, mean_std, metrics_by_group,
                              pairwise_accuracy, reward_model_from_policy, score_pairs, soft_label_reward_trainer)
from alignment.reward_sources import ADAPTER_DIR
from alignment.schema import PeftSpec, TrainSpec
from alignment.training import callbacks, group_pairs_by_length, param_counts, throughput, train, trainer_args

log = logging.getLogger("align")
PEFT_METHODS = ("lora", "ia3", "full")
"""Methods whose result folds into one plain sequence-classification model (lora with use_dora/use_rslora)."""
SET_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
"""A further set's name prefixes its metrics (`<name>_accuracy`), so: lowercase letters, digits and `_`."""
MAIN_SET = "eval"
"""`gate.kind_set` value that names the main held-out pairs (data.eval; their metrics are `eval_*`)."""
LABEL_ARTIFACT = "artifact:label"
"""`data.train` value that reads the RLAIF `label` stage's pairs, `<label artifact>/pairs.jsonl` (or data.from_stage: label)."""


class RewardData(PrefData):
    train: str = "data/prefs/train.jsonl"
    """JSONL/Parquet file, a `datasets` name/path, or `artifact:label` (the label stage's pairs)."""
    eval_fraction: float = 0.2
    eval_sets: dict[str, str] = {}
    """Further held-out pair sets (name -> pair file), each scored after training and reported apart:
    `<name>_accuracy` (+ `_ci`, bootstrap 95% over pairs), `<name>_accuracy_by_category`, `<name>_by_category`,
    `<name>_length_corr`, ... Bundled: `heldout_phrasings: data/prefs/eval_heldout_phrasings.jsonl` (prompts
    phrased in ways no training pair is). {}: none."""
    max_set_pairs: int | None = None
    """Pairs per further set, the first ones (None: as max_eval_pairs)."""
    max_stat_pairs: int | None = None
    """Training pairs (the first ones) scored after training for `train_accuracy` and `reward_mean`/`reward_std`
    (PPO whitens rewards with them); None: all. Scoring costs a forward pass per response, so a large training
    set need not be scored whole for two moments."""

    def set_problems(self, prefix: str = "data") -> list[tuple[str, str]]:
        out = []
        for name in self.eval_sets:
            if not SET_NAME.fullmatch(name) or name in (MAIN_SET, "train"):
                out.append((f"{prefix}.eval_sets.{name}", "expected a name of lowercase letters, digits and '_' "
                                                          f"(not '{MAIN_SET}' or 'train'): it prefixes the metrics"))
        for key in ("max_set_pairs", "max_stat_pairs"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                out.append((f"{prefix}.{key}", "expected at least 1 (or leave unset)"))
        return out


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
    min_kind_accuracy: float | None = None
    """Floor on every constraint kind's (`category`'s) accuracy in `kind_set`. Gated: kinds the RM trained on
    with at least `min_kind_pairs` pairs there; the others are reported (`gate_kinds_not_gated`)."""
    kind_set: str = MAIN_SET
    """The held-out set the per-kind floor applies to: `eval` (data.eval) or a name in data.eval_sets."""
    min_kind_pairs: int = 5
    """Kinds with fewer pairs than this in `kind_set` are not gated: one pair moves their accuracy by 1/n."""


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
        out += self.data.set_problems("data")
        if self.gate.kind_set != MAIN_SET and self.gate.kind_set not in self.data.eval_sets:
            out.append(("gate.kind_set", f"expected '{MAIN_SET}' or a name in data.eval_sets "
                                         f"({', '.join(self.data.eval_sets) or 'none'}), got {self.gate.kind_set!r}"))
        if self.gate.min_kind_pairs < 1:
            out.append(("gate.min_kind_pairs", "expected at least 1"))
        return out


def upstream(cfg: Config) -> tuple[str, ...]:
    names = ("base", "sft") if cfg.init == "sft" else ("base",)
    return names + (("label",) if cfg.data.train == LABEL_ARTIFACT or cfg.data.from_stage == "label" else ())


def _load_data(cfg: Config, ctx) -> tuple[list[dict], list[dict], str]:
    d = stage_sources(cfg.data, ctx.inputs)
    source = str(ctx.inputs["label"].path / "pairs.jsonl") if d.train == LABEL_ARTIFACT else d.train
    train, held_out = train_eval_pairs(d, cfg.seed, train_source=source)
    return train, held_out, source


def _load_sets(data: RewardData) -> dict[str, list[dict]]:
    """Every further held-out set, validated before any model loads; a bad one names its key."""
    limit = data.max_set_pairs if data.max_set_pairs is not None else data.max_eval_pairs
    sets = {}
    for name, source in data.eval_sets.items():
        try:
            sets[name] = load_pairs(source, data.eval_split, data.max_bad_fraction)[:limit]
        except DataError as e:
            raise DataError(f"data.eval_sets.{name}: {e}") from None
    return sets


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


def _set_metrics(pairs: list[dict], scores: dict, cfg: Config) -> dict:
    """One held-out set: the gate metrics (accuracy, margin, ECE, length corr), a bootstrap 95% CI of the accuracy
    over pairs, and pairs, accuracy, margin and length correlation per `category` (the constraint kind)."""
    m = gate_metrics(scores["chosen"], scores["rejected"], scores["len_chosen"], scores["len_rejected"],
                     cfg.gate.ece_bins)
    correct = [1.0 if c > r else 0.0 for c, r in zip(scores["chosen"], scores["rejected"], strict=True)]
    m["accuracy_ci"] = [round(x, 4) for x in bootstrap_ci(correct, seed=cfg.seed)]
    m["by_category"] = metrics_by_group([p.get("category") for p in pairs], scores["chosen"], scores["rejected"],
                                        scores["len_chosen"], scores["len_rejected"])
    m["pairs"], m["responses_truncated"] = len(pairs), scores["truncated"]
    return m


def _flat(prefix: str, m: dict) -> dict:
    """A set's metrics under `<prefix>_` names (`eval_accuracy`, `heldout_phrasings_accuracy_by_category`)."""
    out = {f"{prefix}_{k}": (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}
    out[f"{prefix}_accuracy_by_category"] = {c: v["accuracy"] for c, v in m["by_category"].items()}
    return out


def _log_set(name: str, m: dict) -> None:
    lo, hi = m["accuracy_ci"]
    log.info("[reward] %s: %d pairs, accuracy %.3f [%.3f, %.3f], mean margin %.3f, ECE %.3f, length corr %.3f",
             name, m["pairs"], m["accuracy"], lo, hi, m["mean_margin"], m["ece"], m["length_corr"])
    kinds = m["by_category"]
    if kinds:  # one line on the console; each kind's figures in the stage log (-v) and metrics.json
        low = sorted(kinds.items(), key=lambda kv: kv[1]["accuracy"])[:3]
        log.info("[reward]   kinds at accuracy >= 0.8: %d of %d; lowest: %s", sum(v["accuracy"] >= 0.8 for v in
                 kinds.values()), len(kinds), ", ".join(f"{c} {v['accuracy']:.2f}" for c, v in low))
    for cat, v in kinds.items():
        log.debug("[reward]   %-18s %3d pairs: accuracy %.3f, length corr %+.3f", cat, v["pairs"], v["accuracy"],
                  v["length_corr"])


def _quality_gate(cfg: Config, ctx, rm, tok, train_pairs: list[dict], held: dict[str, list[dict]]) -> list[str]:
    """Score the held-out sets (`eval` first) and the training pairs; record the metrics; the gate's failures."""
    bs, max_len = cfg.train.eval_batch_size, cfg.train.max_length
    t0 = time.perf_counter()
    sets = {name: _set_metrics(pairs, score_pairs(rm, tok, pairs, batch_size=bs, max_length=max_len), cfg)
            for name, pairs in held.items()}
    seen = score_pairs(rm, tok, train_pairs[: cfg.data.max_stat_pairs], batch_size=bs, max_length=max_len)
    failures = gate_failures(sets[MAIN_SET], min_accuracy=cfg.gate.min_accuracy,
                             max_length_corr=cfg.gate.max_length_corr, max_ece=cfg.gate.max_ece)
    trained = {p["category"] for p in train_pairs if "category" in p}  # none (unlabelled kinds): gate every kind
    kind_failures, not_gated = kind_gate_failures(
        sets[cfg.gate.kind_set]["by_category"], min_accuracy=cfg.gate.min_kind_accuracy,
        min_pairs=cfg.gate.min_kind_pairs, gated=trained or None, set_name=cfg.gate.kind_set)
    failures += kind_failures
    for name, m in sets.items():
        _log_set(name, m)
    reward_mean, reward_std = mean_std(seen["chosen"] + seen["rejected"])
    ctx.metrics.update({
        **{k: v for name, m in sets.items() for k, v in _flat(name, m).items()},
        "eval_sets": [n for n in sets if n != MAIN_SET],
        "train_accuracy": round(pairwise_accuracy(seen["chosen"], seen["rejected"]), 4),
        "stat_pairs": len(seen["chosen"]),
        # PPO whitens the RM's scores with these: (r - reward_mean) / reward_std.
        "reward_mean": reward_mean, "reward_std": reward_std,
        "gate": cfg.gate.model_dump(), "gate_passed": not failures, "gate_failures": failures,
        "gate_kinds_not_gated": not_gated, "score_seconds": round(time.perf_counter() - t0, 2),
    })
    return failures


def initial_reward_model(parent, tok, precision: str):
    """The `init` artifact's policy with a one-output score head (the policy's LM head dropped)."""
    policy = load_policy(parent, precision)
    model = reward_model_from_policy(policy, tok.pad_token_id)
    del policy
    log.info("[reward] reward model %s (num_labels=1); peak RSS so far %.0f MB", type(model).__name__, peak_rss_mb())
    return model


def save_reward_model(cfg: Config, ctx, trainer, tok):
    """The trained RM merged (one plain AutoModelForSequenceClassification folder, `model/`) and, for LoRA on base
    + SFT, also unmerged (adapter + score head, peft layout), which PPO loads as a role on its own base instead of
    a second model (alignment.reward_sources.AdapterReward). Returns the merged model."""
    if cfg.peft.method == "lora" and trainer.is_world_process_zero():
        trainer.model.save_pretrained(ctx.out_dir / ADAPTER_DIR, safe_serialization=True)
    rm = trainer.model.merge_and_unload() if cfg.peft.method != "full" else trainer.model
    rm.config.pad_token_id = tok.pad_token_id
    if trainer.is_world_process_zero():  # one writer: with several processes every rank holds the same weights
        rm.save_pretrained(ctx.out_dir / "model", safe_serialization=True)
        tok.save_pretrained(ctx.out_dir / "model")
    return rm


def _trainer(cfg: Config, ctx, model, tok, train_ds):
    """TRL's RewardTrainer (soft labels when the pairs carry them) on the LoRA/PEFT config, pairs batched by length."""
    from trl import RewardConfig

    args = RewardConfig(**trainer_args(cfg.train, out_dir=ctx.checkpoints_dir, seed=cfg.seed,
                                       precision=cfg.precision, report_to=cfg.report_to),
                        max_length=cfg.train.max_length,
                        center_rewards_coefficient=cfg.loss.center_rewards_coefficient)
    trainer = soft_label_reward_trainer()(model=model, args=args, processing_class=tok, train_dataset=train_ds,
                                          peft_config=peft_config(cfg.peft, "SEQ_CLS"), callbacks=callbacks())
    use_kernel(trainer.model, cfg.peft)
    group_pairs_by_length(trainer)
    return trainer


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    train_pairs, eval_pairs, source = _load_data(cfg, ctx)
    further = _load_sets(cfg.data)
    labels = _labels(cfg, train_pairs, source)
    train_ds = _train_dataset(train_pairs, labels, cfg.loss.use_margin)
    parent = ctx.inputs[cfg.init]
    require_mergeable(parent, needed_by="reward")  # a soft-prompt SFT has no weights to carry into the RM
    log.info("[reward] %d train / %d held-out pairs from %s%s; %s labels%s; init from %s (%s); precision %s",
             len(train_pairs), len(eval_pairs), source, "".join(f", {len(p)} {n} pairs" for n, p in further.items()),
             labels, " + margin" if "margin" in train_ds.column_names else "", cfg.init, parent.path,
             resolve_precision(cfg.precision))

    tok = load_tokenizer(ctx.inputs["base"].model_dir)
    model = initial_reward_model(parent, tok, cfg.precision)
    max_len = cfg.train.max_length
    before = score_pairs(model, tok, eval_pairs, batch_size=cfg.train.eval_batch_size, max_length=max_len)

    trainer = _trainer(cfg, ctx, model, tok, train_ds)
    # RewardTrainer drops (does not truncate) pairs longer than max_length.
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise DataError(f"{source}: every pair is longer than train.max_length={max_len} tokens; raise it")
    ctx.metrics.update(param_counts(trainer.model))

    # -- train ---------------------------------------------------------------------------------
    trained = train(trainer, ctx)
    result, runtime = trained.result, trained.seconds

    # -- save ----------------------------------------------------------------------------------
    rm = save_reward_model(cfg, ctx, trainer, tok)
    ctx.lineage = lineage_for(parent, adapter=False, init=cfg.init, head="sequence_classification",
                              method=cfg.peft.method, merged=cfg.peft.method != "full")

    # -- quality gate --------------------------------------------------------------------------
    ctx.metrics.update({
        "eval_accuracy_before": round(pairwise_accuracy(before["chosen"], before["rejected"]), 4),
        "loss_labels": labels, "train_loss": result.training_loss, "steps": result.global_step,
        "resumed_from_step": int(ctx.resume_from.name.split("-")[-1]) if ctx.resume_from else 0,
        "train_pairs": len(train_pairs), "train_pairs_too_long": len(train_pairs) - kept,
        "eval_pairs": len(eval_pairs), "train_seconds": round(runtime, 2), **throughput(trainer, runtime),
    })
    failures = _quality_gate(cfg, ctx, rm, tok, train_pairs, {MAIN_SET: eval_pairs, **further})
    ctx.metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    m = ctx.metrics
    log.info("[reward] held-out accuracy %.3f (before %.3f); rewards mean %.3f std %.3f", m["eval_accuracy"],
             m["eval_accuracy_before"], m["reward_mean"], m["reward_std"])
    if failures:
        # Published anyway (the runner keeps it, for inspection), but marked unfit to drive RL.
        ctx.status = "failed_gate"
        log.error("[reward] quality gate failed: %s", "; ".join(failures))
