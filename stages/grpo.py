"""Stage `grpo`: critic-free RL on the SFT policy with TRL's GRPOTrainer or RLOOTrainer (`alignment/grpo.py`).

`algorithm.name` picks the method, and the `algorithm:` section holds only that method's settings (`grpo`:
loss_type, scale_rewards; `rloo`: normalize_advantages); `algorithm: grpo` alone is short for the defaults.
The group settings both share are under `group:`, TRL's optimisation settings under `train:`. Prompts and the
reward (model, function such as the gold checker, or judge) are the same sections as the `ppo` stage's.

Reads `<run>/sft/` (+ `<run>/reward/` for a model reward: the merged RM, a text-level scorer). Writes a LoRA
adapter trained on base + SFT merged + tokenizer to `model/` (lineage parent = sft, so `load_policy(artifact)`
rebuilds base + SFT + GRPO), `log_history.jsonl` (TRL's log rows) and metrics with the reward and KL curves.
The reference is the SFT model with the adapter switched off: one copy of the weights in memory.
"""

from __future__ import annotations

import logging

from pydantic import field_validator

from alignment.config import StageConfig
from alignment.grpo import Algorithm, GroupSpec
from alignment.ppo_callbacks import HealthSpec
from alignment.prompts import PromptData
from alignment.reward_sources import RewardSource
from alignment.schema import PeftSpec, TrainSpec

log = logging.getLogger("align")


class Config(StageConfig):
    algorithm: Algorithm = "grpo"
    """grpo (Shao et al., 2024) or rloo (Ahmadian et al., 2024), with that method's own settings."""
    data: PromptData = PromptData()
    reward: RewardSource = RewardSource()
    peft: PeftSpec = PeftSpec(dropout=0.0)
    train: TrainSpec = TrainSpec()
    """TRL's optimisation settings; the batch counts completions (prompts x group.num_generations)."""
    group: GroupSpec = GroupSpec()
    health: HealthSpec = HealthSpec()
    """The ppo stage's guardrails on TRL's logged rows (completions cut at the limit, length drift, entropy collapse),
    counted in logged rows (train.logging_steps), not updates; KL and reward hacking do not apply here."""

    @field_validator("algorithm", mode="before")
    @classmethod
    def _short(cls, value):
        return {"name": value} if isinstance(value, str) else value

    def problems(self):
        return (self.data.problems("data") + self.reward.problems("reward") + self.peft.problems("peft")
                + self.group.problems(self.train, "group") + self.group.peft_problems(self.peft, "peft")
                + self.algorithm.problems("algorithm"))


def upstream(cfg: Config) -> tuple[str, ...]:
    from stages.ppo import upstream as ppo_upstream

    return ppo_upstream(cfg)  # the same reward sources: sft, + reward for a model (or reward-model judge)


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    from alignment.grpo import build_trainer, curve_summary
    from alignment.hardware import peak_rss_mb, resolve_precision
    from alignment.peft_methods import METHODS, describe
    from alignment.policy import lineage_for, require_mergeable, save_on_parent
    from alignment.prompts import load_prompts
    from alignment.reward_sources import text_reward_fn
    from alignment.training import param_counts, throughput, train
    from stages.ppo import reward_lineage

    # -- set up: prompts and reward before the model, so bad data or a bad reward fails in seconds -------------
    name = cfg.algorithm.name
    set_seed(cfg.seed)
    sft = ctx.inputs["sft"]
    require_mergeable(sft, needed_by=name)
    prompts = load_prompts(cfg.data.train, cfg.data.max_prompts, cfg.data.train_split)
    score = text_reward_fn(cfg.reward, ctx.inputs, cfg.precision)
    log.info("[%s] %d prompts x %d completions, reward %s, beta %s; precision %s", name, len(prompts),
             cfg.group.num_generations, cfg.reward.kind, cfg.group.beta, resolve_precision(cfg.precision))
    trainer, tok = build_trainer(cfg, sft, prompts, score, ctx.checkpoints_dir)
    ctx.metrics.update(param_counts(trainer.model))

    # -- train (TRL: generate groups -> reward -> group-baseline advantages -> clipped loss + beta KL) ----------
    trained = train(trainer, ctx)

    # -- save: the adapter on base + SFT, lineage parent = sft (like dpo and ppo) ------------------------------
    adapter = METHODS[cfg.peft.method].adapter
    if trainer.is_world_process_zero():  # one writer, as in dpo: every rank holds the same weights
        save_on_parent(trainer.model, tok, ctx.out_dir / "model", sft, adapter=adapter)
    ctx.lineage = lineage_for(sft, adapter=adapter, reference="parent", algorithm=name, **describe(cfg.peft),
                              reward=reward_lineage(cfg.reward, ctx.inputs))
    ctx.metrics.update({
        "algorithm": name, **curve_summary(trainer.state.log_history), "train_loss": trained.result.training_loss,
        "steps": trained.result.global_step, "train_prompts": len(prompts),
        "resumed_from_step": int(ctx.resume_from.name.split("-")[-1]) if ctx.resume_from else 0,
        "train_seconds": round(trained.seconds, 2), "train_cpu_seconds": round(trained.cpu_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), **throughput(trainer, trained.seconds),
    })
    log.info("[%s] reward %s -> %s, KL %s over %d steps in %.1fs", name, ctx.metrics.get("reward_first"),
             ctx.metrics.get("reward_last"), ctx.metrics.get("kl_last"), trained.result.global_step, trained.seconds)
