"""Stage `ppo`: reinforcement learning from a reward (RLHF/RLAIF) on the SFT policy; PPO by default, GRPO/RLOO too.

`algorithm: ppo` is our own PPO (`alignment/ppo.py`, math in `alignment/rl.py`): one copy of base + SFT merged
plays every role (policy LoRA, reference = adapters off, value LoRA + head), the reward comes from
`reward.kind` (model: the run's reward artifact; function: a Python callable such as the gold checker; judge:
an AI judge against the prompt's reference answer). `algorithm: grpo | rloo` hands the same config to TRL's
maintained trainers (`alignment/grpo.py`).

Reads `<run>/sft/` (+ `<run>/reward/` for a model reward) and prompts (`alignment.prompts`: text or chat messages,
never token ids). Writes the policy adapter + tokenizer to `model/` (lineage parent = sft, so
`load_policy(ppo)` rebuilds base + SFT + PPO), `log_history.jsonl` (one row per update, `ppo/*`, `objective/*`,
`eval/*` keys) and metrics with the held-out reward and KL curves' first/last/max. Checkpoints every
`checkpoint_every` updates; an interrupted or preempted run resumes from the newest one.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

from alignment.config import Section, StageConfig
from alignment.grpo import GroupSpec
from alignment.ppo import HealthSpec, PPOSpec
from alignment.prompts import PromptData
from alignment.reward_sources import RewardSource
from alignment.schema import PeftSpec, TrainSpec

log = logging.getLogger("align")
STATE_FILE = "ppo_state.pt"


class EvalSpec(Section):
    """Held-out evaluation during the run: the reward curve (and the gold curve the health check watches)."""

    every: int = 5
    """Evaluate before the first update, every N updates, and after the last (0: only before and after)."""
    prompts: int = 32
    """Held-out prompts evaluated (the first N of data.eval)."""
    batch_size: int = 16
    greedy: bool = True
    """Greedy responses: the curve shows the policy's change, not sampling noise."""
    max_new_tokens: int | None = None
    """None: ppo.max_new_tokens."""


class Config(StageConfig):
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    """ppo: our PPO (alignment/ppo.py); grpo / rloo: TRL's GRPOTrainer / RLOOTrainer (alignment/grpo.py)."""
    data: PromptData = PromptData()
    reward: RewardSource = RewardSource()
    peft: PeftSpec = PeftSpec(dropout=0.0)
    """The LoRA of the policy (and of the value model, with the same shape)."""
    ppo: PPOSpec = PPOSpec()
    health: HealthSpec = HealthSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint_every: int = 10
    """ppo: save a checkpoint every N updates (the newest `keep_checkpoints` are kept)."""
    keep_checkpoints: int = 2
    train: TrainSpec = TrainSpec()
    """grpo / rloo: TRL's optimisation settings (ppo keeps its own under `ppo:`)."""
    group: GroupSpec = GroupSpec()
    """grpo / rloo: the group baseline settings."""

    def problems(self):
        out = self.data.problems("data") + self.reward.problems("reward") + self.peft.problems("peft")
        if self.algorithm == "ppo":
            out += self.ppo.problems("ppo")
            for key in ("train", "group"):
                if key in self.model_fields_set:
                    out.append((key, "applies to algorithm grpo/rloo only; PPO's settings are under ppo:"))
            if self.peft.method != "lora":
                out.append(("peft.method", f"ppo trains LoRA adapters (policy and value on one base), not "
                                           f"'{self.peft.method}'; use method: lora (use_dora/use_rslora work)"))
            if self.ppo.value_init == "reward" and self.reward.kind != "model":
                out.append(("ppo.value_init", "'reward' copies the reward model's score head, and reward.kind is "
                                              f"'{self.reward.kind}'; use zero or auto"))
            if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
                out.append(("checkpoint_every", "checkpoint_every and keep_checkpoints must be >= 1"))
            if self.eval.every < 0 or self.eval.prompts < 0 or self.eval.batch_size < 1:
                out.append(("eval", "every >= 0, prompts >= 0 and batch_size >= 1 expected"))
        else:
            from alignment import grpo

            out += grpo.problems(self)
            for key in ("ppo", "health", "eval", "checkpoint_every", "keep_checkpoints"):
                if key in self.model_fields_set:
                    out.append((key, f"applies to algorithm ppo only, not '{self.algorithm}' (use train: / group:)"))
        return out


def upstream(cfg: Config) -> tuple[str, ...]:
    judge = cfg.reward.judge
    needs_rm = cfg.reward.kind == "model" or (
        cfg.reward.kind == "judge" and judge is not None and judge.kind == "reward_model" and not judge.reward_artifact)
    return ("sft", "reward") if needs_rm else ("sft",)


class PromptSchedule:
    """Which training prompts update u sees: consecutive slices of a seeded permutation, reshuffled each pass.

    A pure function of (seed, update), so a resumed run draws exactly the prompts the first run would have.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def indices(self, update: int) -> list[int]:
        import random

        out = []
        for k in range(update * self.batch_size, (update + 1) * self.batch_size):
            epoch, pos = divmod(k, self.n)
            perm = list(range(self.n))
            random.Random(self.seed * 7919 + epoch).shuffle(perm)
            out.append(perm[pos])
        return out


def fields_of(rows: list[dict]) -> dict:
    """Per-prompt fields a reward function may take (None when no row has the field)."""
    return {k: ([r.get(k) for r in rows] if any(k in r for r in rows) else None) for k in ("constraints", "reference")}


def gold_mean(rows: list[dict], completions: list[str]) -> float | None:
    """Mean gold score (alignment.gold) over the held-out prompts that have constraints; None without any."""
    from alignment import gold

    scored = [gold.score(c, r["constraints"]) for r, c in zip(rows, completions) if r.get("constraints")]
    return sum(scored) / len(scored) if scored else None


def curve(values: list[float]) -> dict:
    return {"first": values[0], "last": values[-1], "max": max(values), "min": min(values)} if values else {}


def run(cfg: Config, ctx) -> None:
    if cfg.algorithm != "ppo":
        from alignment import grpo

        return grpo.run_trl(cfg, ctx)
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from alignment import preemption
    from alignment.artifacts import remove_tree, write_json
    from alignment.hardware import peak_rss_mb, resolve_precision
    from alignment.models import load_tokenizer
    from alignment.peft_methods import describe
    from alignment.policy import lineage_for, load_policy, point_adapter_at_parent, require_mergeable
    from alignment.ppo import HealthMonitor, HealthStop, PPOTrainer, lora_config, value_head_from_reward_model
    from alignment.prompts import train_eval_prompts
    from alignment.reward_sources import ModelReward, text_reward_fn
    from alignment.training import param_counts

    # -- set up: prompts and reward first (bad data fails in seconds), then the one model --------------------------
    set_seed(cfg.seed)
    s = cfg.ppo
    sft = ctx.inputs["sft"]
    require_mergeable(sft, needed_by="ppo")
    train_rows, eval_rows = train_eval_prompts(cfg.data)
    eval_rows = eval_rows[: cfg.eval.prompts]
    rss0 = peak_rss_mb()
    reward = text_reward_fn(cfg.reward, ctx.inputs, cfg.precision)
    reward_mb = 0.0
    if isinstance(reward, ModelReward):
        reward_mb = sum(p.numel() * p.element_size() for p in reward.model.parameters()) / 2**20
        log.info("[ppo] reward model %s loaded as a separate model (a merged fine-tune, not an adapter): "
                 "%.0f MB of weights (peak RSS %.0f -> %.0f MB)", ctx.inputs["reward"].path, reward_mb, rss0,
                 peak_rss_mb())
    tok = load_tokenizer(sft.model_dir)
    policy = load_policy(sft, cfg.precision)  # base + SFT merged: the only copy; adapters off = the reference
    init = s.value_init if s.value_init != "auto" else ("reward" if isinstance(reward, ModelReward) else "zero")
    head = (value_head_from_reward_model(reward.model, reward.mean if reward.normalize else 0.0,
                                         reward.std if reward.normalize else 1.0) if init == "reward" else None)
    trainer = PPOTrainer(policy, tok, reward, s, lora_config(cfg.peft), value_head_init=head, seed=cfg.seed)
    ctx.metrics.update(param_counts(trainer.model))
    monitor = HealthMonitor(cfg.health)
    history: list[dict] = []
    if ctx.resume_from:
        state = torch.load(ctx.resume_from / STATE_FILE, weights_only=False)
        trainer.load_state_dict(state["trainer"])
        monitor.load_state_dict(state["health"])
        history = state["history"]
        log.info("[ppo] resumed at update %d from %s", trainer.update, ctx.resume_from)
    log_path = ctx.out_dir / "log_history.jsonl"
    log_path.write_text("".join(json.dumps(r) + "\n" for r in history))  # rows past the checkpoint are dropped
    schedule = PromptSchedule(len(train_rows), s.batch_size, cfg.seed)
    eval_prompts = [r["prompt"] for r in eval_rows]
    log.info("[ppo] %d train / %d held-out prompts; reward %s; %d updates x %d episodes, %d epochs of %d-episode "
             "minibatches; kl_coef %s (%s); precision %s; value head from %s", len(train_rows), len(eval_rows),
             cfg.reward.kind, s.updates, s.batch_size, s.ppo_epochs, s.mini_batch_size, s.kl_coef,
             "adaptive" if s.adaptive_kl else "fixed", resolve_precision(cfg.precision), init)

    def evaluate(row: dict) -> None:
        if not eval_rows:
            return
        metrics, texts = trainer.evaluate(eval_prompts, fields_of(eval_rows), batch_size=cfg.eval.batch_size,
                                          greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens)
        row.update(metrics)
        g = gold_mean(eval_rows, texts)
        if g is not None:
            row["eval/gold"] = g
        row["eval/sample"] = texts[0][:200]

    def save_checkpoint(update: int) -> None:
        folder = ctx.checkpoints_dir / f"checkpoint-{update}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"trainer": trainer.state_dict(), "health": monitor.state_dict(), "history": history},
                   folder / STATE_FILE)
        write_json(folder / "trainer_state.json", {"global_step": update, "update": update})  # last: complete
        done = sorted((p for p in ctx.checkpoints_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                      key=lambda p: int(p.name.split("-")[-1]))
        for old in done[: -cfg.keep_checkpoints]:
            remove_tree(old)

    def record(row: dict) -> None:
        history.append(row)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    # -- train -------------------------------------------------------------------------------------------------------
    if trainer.update == 0 and not history:
        row = {"step": 0}
        evaluate(row)  # the SFT policy's held-out reward: the curve's first point
        monitor.check(row)
        record(row)
    start, t0 = trainer.update, time.perf_counter()
    bar = tqdm(total=s.updates, initial=start, desc="ppo", unit="update", dynamic_ncols=True)
    while trainer.update < s.updates:
        u = trainer.update
        if s.lr_schedule == "linear":
            trainer.set_lr(s.lr * (1.0 - u / s.updates))
        batch = [train_rows[i] for i in schedule.indices(u)]
        # steps 1-6 (alignment/ppo.py): rollout, score, reference + values, GAE, K epochs of minibatches, stats
        row = {"step": u + 1, "episodes": (u + 1) * s.batch_size,
               **trainer.step([r["prompt"] for r in batch], fields_of(batch))}
        # 7. held-out reward (and gold) every eval.every updates and after the last
        if (cfg.eval.every and (u + 1) % cfg.eval.every == 0) or u + 1 == s.updates:
            evaluate(row)
        # 8. guardrails: warn, or save and stop past a limit
        try:
            for warning in monitor.check(row):
                log.warning("[ppo] update %d: %s", u + 1, warning)
        except HealthStop:
            record(row)
            save_checkpoint(u + 1)
            bar.close()
            raise
        # 9. log, 10. checkpoint (and stop here when preemption was requested)
        record(row)
        bar.update(1)
        bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['ppo/kl']:.3f}",
                        **({"eval": f"{row['eval/reward']:.3f}"} if "eval/reward" in row else {}))
        if (u + 1) % cfg.checkpoint_every == 0 or preemption.requested():
            save_checkpoint(u + 1)
        if preemption.requested() and trainer.update < s.updates:
            bar.close()
            log.warning("[ppo] preemption requested: checkpoint-%d saved, stopping", u + 1)
            return
    bar.close()
    runtime = time.perf_counter() - t0

    # -- save ---------------------------------------------------------------------------------------------------------
    trainer.save_policy(ctx.out_dir / "model")
    tok.save_pretrained(ctx.out_dir / "model")
    point_adapter_at_parent(ctx.out_dir / "model", sft)
    ctx.lineage = lineage_for(sft, adapter=True, reference="parent", algorithm="ppo", **describe(cfg.peft),
                              reward={"kind": cfg.reward.kind, **({"artifact": str(ctx.inputs["reward"].path)}
                                                                  if "reward" in ctx.inputs else {}),
                                      **({"function": cfg.reward.function} if cfg.reward.function else {})})
    series = lambda key: [r[key] for r in history if key in r]  # noqa: E731
    done = trainer.update - start
    ctx.metrics.update({
        "algorithm": "ppo", "updates": trainer.update, "episodes": trainer.update * s.batch_size,
        "eval_reward": curve(series("eval/reward")), "eval_gold": curve(series("eval/gold")),
        "kl": curve(series("ppo/kl")), "train_score": curve(series("objective/scores")),
        "response_length": curve(series("ppo/response_length")),
        "missing_eos_rate": curve(series("ppo/missing_eos_rate")), "entropy": curve(series("ppo/entropy")),
        "kl_coef_last": trainer.kl_ctl.value, "health_warnings": monitor.warnings,
        "resumed_from_update": start if ctx.resume_from else 0,
        "train_seconds": round(runtime, 2), "seconds_per_update": round(runtime / max(done, 1), 2),
        "episodes_per_s": round(done * s.batch_size / runtime, 3) if runtime > 0 else 0.0,
        "reward_model_mb": round(reward_mb, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_prompts": len(train_rows), "eval_prompts": len(eval_rows), "value_init": init,
    })
    er, kl = ctx.metrics["eval_reward"], ctx.metrics["kl"]
    log.info("[ppo] %d updates in %.0fs; held-out reward %s -> %s (max %s); KL per response %s -> %s (max %s)",
             done, runtime, _r(er.get("first")), _r(er.get("last")), _r(er.get("max")), _r(kl.get("first")),
             _r(kl.get("last")), _r(kl.get("max")))


def _r(x):
    return "n/a" if x is None else f"{x:.3f}"
