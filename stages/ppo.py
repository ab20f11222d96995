"""Stage `ppo`: RLHF with PPO on the SFT policy (our trainer, `alignment/ppo.py`; math in `alignment/rl.py`).

One copy of base + SFT merged plays every role: the policy (LoRA), the reference (adapters off), the value model
(a head on the policy's trunk, or its own LoRA + head) and, for `reward.kind: model`, the reward model (the reward
stage's LoRA adapter + score head, a fourth adapter on the same base; the merged RM when the adapter does not fit).
The reward may also be a Python function (`kind: function`, e.g. the verifiable gold checker: RLVR) or an AI judge
against the prompt's reference answer (`kind: judge`). GRPO and RLOO are the `grpo` stage (stages/grpo.py).

Reads `<run>/sft/` (+ `<run>/reward/` for a model reward) and prompts (`alignment.prompts`). Writes the policy
adapter + tokenizer to `model/` (lineage parent = sft, so `load_policy(ppo)` rebuilds base + SFT + PPO),
`log_history.jsonl` (one row per update: `ppo/*`, `objective/*`, `eval/*`) and metrics with the held-out reward,
gold and KL curves' first/last/max. `PPOTrainer.train` checkpoints every `checkpoint_every` updates
(safetensors + JSON, alignment/ppo_state.py); an interrupted or preempted run resumes from the newest one.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import model_validator

from alignment.config import StageConfig
from alignment.ppo import EvalSpec, HealthSpec, PPOSpec
from alignment.prompts import PromptData
from alignment.reward_sources import RewardSource
from alignment.schema import PeftSpec

log = logging.getLogger("align")


class Config(StageConfig):
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    """Always ppo here; grpo and rloo are the `grpo` stage (configs/<profile>/grpo.yaml, rloo.yaml)."""
    data: PromptData = PromptData()
    reward: RewardSource = RewardSource()
    peft: PeftSpec = PeftSpec(dropout=0.0)
    """The LoRA of the policy (and of the value model, with the same shape)."""
    ppo: PPOSpec = PPOSpec()
    health: HealthSpec = HealthSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint_every: int = 10
    """Save a checkpoint every N updates (the newest `keep_checkpoints` are kept)."""
    keep_checkpoints: int = 2

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        # An old ppo.yaml with `algorithm: grpo` also holds train:/group: keys; keep only what the one-line
        # error needs instead of listing each as unknown.
        if isinstance(data, dict) and data.get("algorithm") in ("grpo", "rloo"):
            return {k: data[k] for k in ("stage", "algorithm") if k in data}
        return data

    def problems(self):
        if self.algorithm != "ppo":
            a = self.algorithm
            return [("algorithm", f"{a} is the `grpo` stage now: align run grpo -c configs/<profile>/{a}.yaml "
                                  f"(stage: grpo, algorithm: {a})")]
        out = (self.data.problems("data") + self.reward.problems("reward") + self.peft.problems("peft")
               + self.ppo.problems("ppo") + self.eval.problems("eval"))
        if self.peft.method != "lora":
            out.append(("peft.method", f"ppo trains LoRA adapters (policy and value on one base), not "
                                       f"'{self.peft.method}'; use method: lora (use_dora/use_rslora work)"))
        if self.ppo.value_init == "reward" and self.reward.kind != "model":
            out.append(("ppo.value_init", "'reward' copies the reward model's score head, and reward.kind is "
                                          f"'{self.reward.kind}'; use zero or auto"))
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            out.append(("checkpoint_every", "checkpoint_every and keep_checkpoints must be >= 1"))
        return out


def upstream(cfg: Config) -> tuple[str, ...]:
    judge = cfg.reward.judge
    needs_rm = cfg.reward.kind == "model" or (
        cfg.reward.kind == "judge" and judge is not None and judge.kind == "reward_model" and not judge.reward_artifact)
    return ("sft", "reward") if needs_rm else ("sft",)


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    from alignment.hardware import resolve_precision
    from alignment.policy import require_mergeable
    from alignment.ppo import Checkpoints
    from alignment.prompts import train_eval_prompts
    from alignment.training import param_counts

    # -- set up: prompts and reward first (bad data fails in seconds), then the one model ------------------------
    set_seed(cfg.seed)
    s, sft = cfg.ppo, ctx.inputs["sft"]
    require_mergeable(sft, needed_by="ppo")
    train_rows, eval_rows = train_eval_prompts(cfg.data)
    eval_rows = eval_rows[: cfg.eval.prompts]
    trainer, health, value_init = build_trainer(cfg, ctx)
    ctx.metrics.update(param_counts(trainer.model))
    log.info("[ppo] %d train / %d held-out prompts; reward %s; %d updates x %d episodes, %d epochs of %d-episode "
             "minibatches; kl_coef %s (%s); precision %s; value head from %s", len(train_rows), len(eval_rows),
             reward_role(trainer.reward), s.updates, s.batch_size, s.ppo_epochs, s.mini_batch_size, s.kl_coef,
             "adaptive" if s.adaptive_kl else "fixed", resolve_precision(cfg.precision), value_init)

    # -- train (alignment/ppo.py PPOTrainer.train: rollout, score, advantages, optimise; eval; checkpoints) -------
    result = trainer.train(train_rows, eval_rows, stage_callbacks(ctx, health), eval_spec=cfg.eval,
                           checkpoints=Checkpoints(ctx.checkpoints_dir, cfg.checkpoint_every, cfg.keep_checkpoints),
                           resume_from=ctx.resume_from)
    if trainer.update < s.updates:
        return  # preempted at a checkpoint: the runner requeues, nothing is published

    # -- save ----------------------------------------------------------------------------------------------------
    save_policy(cfg, ctx, trainer)
    ctx.metrics.update(run_metrics(cfg, ctx, trainer, result, health, value_init,
                                   n_train=len(train_rows), n_eval=len(eval_rows)))
    er, kl = ctx.metrics["eval_reward"], ctx.metrics["kl"]
    log.info("[ppo] %d updates in %.0fs; held-out reward %s -> %s (max %s); KL per response %s -> %s (max %s)",
             trainer.update - result.start_update, result.seconds, _r(er.get("first")), _r(er.get("last")),
             _r(er.get("max")), _r(kl.get("first")), _r(kl.get("last")), _r(kl.get("max")))


def build_trainer(cfg: Config, ctx):
    """(PPOTrainer on base + SFT merged, its health callback, where the value head starts)."""
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.ppo import HealthCallback, PPOTrainer, lora_config, value_head_from_reward_model
    from alignment.reward_sources import rl_reward

    sft = ctx.inputs["sft"]
    reward = rl_reward(cfg.reward, ctx.inputs, cfg.precision)
    tok = load_tokenizer(sft.model_dir)
    policy = load_policy(sft, cfg.precision)  # base + SFT merged: the only copy; adapters off = the reference
    has_head = hasattr(reward, "score")
    init = cfg.ppo.value_init if cfg.ppo.value_init != "auto" else ("reward" if has_head else "zero")
    head = (value_head_from_reward_model(reward, reward.mean if reward.normalize else 0.0,
                                         reward.std if reward.normalize else 1.0) if init == "reward" else None)
    trainer = PPOTrainer(policy, tok, reward, cfg.ppo, lora_config(cfg.peft), value_head_init=head, seed=cfg.seed,
                         fused_lora=cfg.peft.kernel == "fused")
    return trainer, HealthCallback(cfg.health), init


def stage_callbacks(ctx, health) -> list:
    from alignment.ppo import GoldCheck, JsonlLog, LiveTracking, ProgressBar, StopOnPreemption

    return [GoldCheck(), health, StopOnPreemption(), JsonlLog(ctx.out_dir / "log_history.jsonl"), LiveTracking(),
            ProgressBar()]


def reward_role(reward) -> str:
    from alignment.reward_sources import AdapterReward, ModelReward

    if isinstance(reward, AdapterReward):
        return f"model (adapter '{reward.name}' on the policy's base, {reward.adapter_mb:.1f} MB)"
    if isinstance(reward, ModelReward):
        return f"model (a separate merged model, {reward.weights_mb:.0f} MB)"
    return getattr(reward, "__name__", type(reward).__name__)


def save_policy(cfg: Config, ctx, trainer) -> None:
    """The policy adapter + tokenizer on base + SFT (lineage parent = sft)."""
    from alignment.peft_methods import describe
    from alignment.policy import lineage_for, point_adapter_at_parent

    sft = ctx.inputs["sft"]
    trainer.save_policy(ctx.out_dir / "model")
    trainer.tok.save_pretrained(ctx.out_dir / "model")
    point_adapter_at_parent(ctx.out_dir / "model", sft)
    ctx.lineage = lineage_for(sft, adapter=True, reference="parent", algorithm="ppo", **describe(cfg.peft),
                              reward=reward_lineage(cfg.reward, ctx.inputs))


def reward_lineage(spec, inputs: dict) -> dict:
    """What the manifest's lineage says of the reward: its kind, the RM artifact or the function."""
    out = {"kind": spec.kind}
    if "reward" in inputs:
        out["artifact"] = str(inputs["reward"].path)
    if spec.function:
        out["function"] = spec.function
    return out


def run_metrics(cfg: Config, ctx, trainer, result, health, value_init, *, n_train: int, n_eval: int) -> dict:
    from alignment.hardware import peak_rss_mb
    from alignment.reward_sources import AdapterReward, ModelReward

    history, s, done = result.history, cfg.ppo, trainer.update - result.start_update
    series = lambda key: [r[key] for r in history if key in r]  # noqa: E731
    reward = trainer.reward
    return {
        "algorithm": "ppo", "updates": trainer.update, "episodes": trainer.update * s.batch_size,
        "eval_reward": curve(series("eval/reward")), "eval_gold": curve(series("eval/gold")),
        "eval_missing_eos_rate": curve(series("eval/missing_eos_rate")),
        "kl": curve(series("ppo/kl")), "train_score": curve(series("objective/scores")),
        "response_length": curve(series("ppo/response_length")),
        "missing_eos_rate": curve(series("ppo/missing_eos_rate")), "entropy": curve(series("ppo/entropy")),
        "kl_coef_last": trainer.kl_ctl.value, "health_warnings": health.monitor.warnings,
        "resumed_from_update": result.start_update if ctx.resume_from else 0,
        "train_seconds": round(result.seconds, 2), "train_cpu_seconds": round(result.cpu_seconds, 2),
        "seconds_per_update": round(result.seconds / max(done, 1), 2),
        "episodes_per_s": round(done * s.batch_size / result.seconds, 3) if result.seconds > 0 else 0.0,
        "reward_role": ("adapter" if isinstance(reward, AdapterReward) else
                        "merged_model" if isinstance(reward, ModelReward) else cfg.reward.kind),
        "reward_model_mb": round(reward.adapter_mb if isinstance(reward, AdapterReward) else
                                 reward.weights_mb if isinstance(reward, ModelReward) else 0.0, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "train_prompts": n_train, "eval_prompts": n_eval,
        "value_init": value_init,
    }


def curve(values: list[float]) -> dict:
    return {"first": values[0], "last": values[-1], "max": max(values), "min": min(values)} if values else {}


def _r(x):
    return "n/a" if x is None else f"{x:.3f}"
