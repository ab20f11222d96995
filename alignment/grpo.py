"""GRPO and RLOO through TRL's maintained trainers (the `grpo` stage, stages/grpo.py; `algorithm.name: grpo | rloo`).

Both are critic-free policy-gradient methods that sample a *group* of `num_generations` completions per prompt
and use the group itself as the baseline:

- GRPO (Shao et al., 2024, DeepSeekMath): advantage = (r - mean(group)) / std(group), PPO-style clipped ratio
  (epsilon) and a k3 KL penalty to the reference weighted by `beta` inside the loss (not in the reward).
- RLOO (Ahmadian et al., 2024, "Back to Basics"; Kool et al., 2019): advantage = r - mean(other completions of
  the same prompt), the leave-one-out baseline; TRL folds `beta` x KL into the reward.

They read the same prompts (`alignment.prompts`) and the same reward sources (`alignment.reward_sources`) as our
PPO, and publish the same artifact layout: a LoRA adapter trained on base + SFT merged, lineage parent = sft,
so `alignment.policy.load_policy(artifact)` rebuilds base + SFT + GRPO. As in DPO, the reference is the SFT model
with the adapter switched off (TRL does that by itself for a peft model): one copy of the weights in memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag

from alignment.config import ConfigError, Section
from alignment.errors import AlignError
from alignment.fused_lora import use_kernel

log = logging.getLogger("align")


class GroupSpec(Section):
    """Group-baseline settings both algorithms share, passed to TRL 1.16's GRPOConfig / RLOOConfig (same names)."""

    num_generations: int = 4
    """Completions sampled per prompt (the group, G). The per-step batch (train.batch_size x train.grad_accum)
    counts completions and must be a multiple of it; at least 2 (a group of one has no baseline)."""
    beta: float = 0.04
    """KL coefficient against the reference (the SFT model). 0 skips the reference forward entirely (TRL's GRPO
    default; then no KL is measured). 0.04 is the DeepSeekMath GRPO value; TRL's RLOO default is 0.05."""
    epsilon: float = 0.2
    """Clip range of the importance ratio (PPO's epsilon), lower side."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO's clip-higher recommends 0.28); None: the same as epsilon."""
    num_iterations: int = 1
    """Optimisation passes over each generated batch (GRPO's mu); with 1 the ratio is always 1 and clipping is
    inactive, as in the DeepSeekMath runs."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the log-probs are computed at the same temperature)."""
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k filtering."""
    max_completion_length: int = 64
    """Tokens generated per completion; a completion cut at this length has no EOS."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_completion_length out of the loss (DAPO's overlong filtering)."""
    truncated_reward: float | None = None
    """The reward of a completion cut at max_completion_length without an EOS, instead of its score (DAPO's overlong
    punishment in its hard form). None: the reward source scores the cut text. With the gold check a cut answer
    still collects what its text meets so far (min words, min sentences, keyword counts), so GRPO learned to run
    on (docs/algorithms.md); 0 makes an unfinished answer a failed one. With mask_truncated_completions too, the cut
    completions still set their group's baseline but get no gradient themselves."""
    soft_overlong: int | None = None
    """DAPO's soft overlong punishment (TRL's `get_soft_overlong_punishment`, a second reward function added to the
    source's): a completion longer than max_completion_length - soft_overlong tokens loses reward linearly, 1 at the
    limit. None: off. It favours answers that end well inside the budget. Measured on SmolLM2's gold check (3 seeds,
    docs/algorithms.md): shorter answers, the held-out-kinds gain up and the held-out-phrasings gain down."""
    greedy_member: bool = False
    """The first completion of every group is the policy's greedy answer (the eval stage's decoding), the others
    sampled. A 135M SFT model's greedy answers loop until the budget where its samples end: on 64 unseen training
    prompts 41% of the recipe's SFT model's greedy answers were cut against 22% of its samples at temperature 1 and
    11% at 0.7 (bench/greedy_vs_sampled.py, fp32), so sampled groups barely see the failure the evaluation
    counts. The greedy member is scored and trained like the others (its advantage against the group), so a looping
    mode loses probability directly; as in self-critical sequence training (Rennie et al., 2017) the test-time
    decoding takes part in training. Needs the engine sampler; RLOO too."""
    log_completions: bool = False
    """Print a sample of prompts, completions and rewards at each logging step."""
    sampler: Literal["engine", "trl"] = "engine"
    """engine: the rollouts are sampled through alignment.generation (LoRA merged into temporary weights while
    sampling, ended rows leave the batch, one seeded stream per row; `with_engine`); trl: TRL's own `generate`
    call. vLLM, continuous batching and sampling options the engine does not cover always use TRL's."""

    def problems(self, train, prefix: str = "group") -> list[tuple[str, str]]:
        """Config-load checks; `train` is the stage's TrainSpec (its batch counts completions)."""
        out = []
        if self.num_generations < 2:
            out.append((f"{prefix}.num_generations", "a group needs at least 2 completions per prompt (the others "
                                                     "are each one's baseline)"))
        elif (train.batch_size * train.grad_accum) % self.num_generations:
            out.append(("train.batch_size", f"train.batch_size x train.grad_accum = "
                                            f"{train.batch_size * train.grad_accum} completions per step must be a "
                                            f"multiple of {prefix}.num_generations ({self.num_generations}): "
                                            "every prompt's group is generated in the same batch"))
        if self.beta < 0:
            out.append((f"{prefix}.beta", "expected a KL coefficient >= 0"))
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            out.append((f"{prefix}.epsilon", "expected a clip range > 0"))
        if self.num_iterations < 1:
            out.append((f"{prefix}.num_iterations", "expected at least 1 pass per generated batch"))
        if self.temperature <= 0:
            out.append((f"{prefix}.temperature", "expected a sampling temperature > 0"))
        if not 0 < self.top_p <= 1:
            out.append((f"{prefix}.top_p", "expected a probability in (0, 1]"))
        if self.max_completion_length < 1:
            out.append((f"{prefix}.max_completion_length", "expected at least 1 token"))
        if self.greedy_member and self.sampler != "engine":
            out.append((f"{prefix}.greedy_member", f"needs {prefix}.sampler: engine (TRL's own sampler cannot "
                                                   "decode one row of a group greedily); set it or turn this off"))
        if self.soft_overlong is not None and not 0 < self.soft_overlong <= self.max_completion_length:
            out.append((f"{prefix}.soft_overlong", f"expected 1..{prefix}.max_completion_length "
                                                   f"({self.max_completion_length}) tokens, or null for none"))
        return out

    def length_rewards(self) -> list:
        """The reward functions that shape length alone (soft_overlong), added to the source's by TRL."""
        if self.soft_overlong is None:
            return []
        from trl.rewards import get_soft_overlong_punishment

        return [get_soft_overlong_punishment(self.max_completion_length, self.soft_overlong)]

    def peft_problems(self, peft, prefix: str = "peft") -> list[tuple[str, str]]:
        """What TRL's group trainers cannot train (checked against the stage's PeftSpec)."""
        targets = [peft.target_modules] if isinstance(peft.target_modules, str) else (peft.target_modules or [])
        if peft.method in ("lora", "qlora", "ia3") and "lm_head" in targets:
            return [(f"{prefix}.target_modules", "GRPO/RLOO compute log-probs from lm_head.weight directly (TRL), "
                                                 "so an adapter on lm_head would never train; remove 'lm_head'")]
        if peft.method in ("prefix", "prompt", "ptuning", "qlora"):
            return [(f"{prefix}.method", f"GRPO/RLOO train lora (use_dora/use_rslora), ia3, bitfit, freeze or full "
                                         f"on the merged SFT policy, not '{peft.method}'")]
        return []

    def trl_kwargs(self) -> dict:
        return dict(num_generations=self.num_generations, beta=self.beta, epsilon=self.epsilon,
                    epsilon_high=self.epsilon_high, num_iterations=self.num_iterations, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, max_completion_length=self.max_completion_length,
                    mask_truncated_completions=self.mask_truncated_completions, log_completions=self.log_completions)


class GRPO(Section):
    """GRPO (Shao et al., 2024): the group-normalised advantage inside PPO's clipped loss, KL to the reference in
    the loss. `algorithm: grpo` is short for `algorithm: {name: grpo}`."""

    name: Literal["grpo"] = "grpo"
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "vespo"] = "dapo"
    """How token losses are aggregated. grpo: per-sequence mean (length-biased); dapo (TRL's default): over all
    active tokens of the accumulated batch (Yu et al., 2025); dr_grpo: over a constant (Liu et al., 2025); see
    TRL's GRPOConfig for the rest."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group std (group, the paper), the batch std (batch), or not at all (none: Dr. GRPO
    argues the std adds a question-difficulty bias)."""

    chosen_nll: float = Field(default=0.0, ge=0)
    """Weight of an NLL (SFT) term on each group's best completion, the `sft` term online DPO-RLVR adds to its
    pairs' chosen answers (RPO, Pang et al., 2024): every completion with its group's highest reward, in a group
    whose rewards are not all equal, gets `chosen_nll` added to its advantage. At ratio 1 the policy-gradient
    loss -A x log p then carries exactly that NLL's gradient (aggregated as `loss_type` aggregates tokens); the
    clip and the KL to the reference bound it like the rest of the update. 0: plain GRPO. Measured on SmolLM2's
    gold check: docs/algorithms.md."""

    chosen_min_score: float | None = None
    """chosen_nll: the lowest reward (summed over the reward functions, before any scaling) a group's best
    completion needs to get the bonus; PPO's `chosen_min_score`, e.g. 1.0 with the gold check as reward: only fully
    correct answers are imitated, not the best of a group that is all partly wrong. None: each group's best."""

    def problems(self, prefix: str = "algorithm") -> list[tuple[str, str]]:
        if self.chosen_min_score is not None and not self.chosen_nll:
            return [(f"{prefix}.chosen_min_score", "only chooses which completions the NLL term imitates: set "
                                                   f"{prefix}.chosen_nll (e.g. 1.0) or remove chosen_min_score")]
        return []

    def trl_kwargs(self) -> dict:
        return dict(loss_type=self.loss_type, scale_rewards=self.scale_rewards)


class RLOO(Section):
    """RLOO (Ahmadian et al., 2024): the leave-one-out baseline; TRL folds beta x KL into the reward.
    `algorithm: rloo` is short for `algorithm: {name: rloo}`."""

    name: Literal["rloo"] = "rloo"
    normalize_advantages: bool = False
    """Whiten the leave-one-out advantages over the batch."""

    def problems(self, prefix: str = "algorithm") -> list[tuple[str, str]]:
        return []

    def trl_kwargs(self) -> dict:
        return dict(normalize_advantages=self.normalize_advantages)


def _algorithm_tag(value) -> str | None:
    # Tags in brackets: alignment.config drops bracketed parts from error paths, so a misplaced key reads
    # `algorithm.loss_type: unknown key`, not `algorithm.rloo.loss_type`.
    name = value.get("name", "grpo") if isinstance(value, dict) else getattr(value, "name", value)
    return f"[{name}]" if name in ("grpo", "rloo") else None


Algorithm = Annotated[Union[Annotated[GRPO, Tag("[grpo]")], Annotated[RLOO, Tag("[rloo]")]],
                      Discriminator(_algorithm_tag, custom_error_type="algorithm",
                                    custom_error_message="expected name grpo or rloo")]
"""The `algorithm:` section: GRPO or RLOO, each with only the settings it has (no "applies to" rules)."""


# -- the reward: our text-level scorer in TRL's reward-function signature ----------------------------------------
def trl_reward_func(score, records: list[dict], name: str = "reward", *, truncated_reward: float | None = None,
                    eos_ids: set[int] | None = None):
    """Wrap `score(prompts, completions, **fields) -> list[float]` (alignment.reward_sources) for TRL.

    TRL calls reward functions with keywords: `prompts` (chat message lists, conversational data),
    `completions` (for conversational data a one-message list [{"role": "assistant", "content": text}]),
    `completion_ids`, every other dataset column as a list (here `prompt_index`), and `trainer_state` etc.
    Our scorers take the prompt messages, the completion *text* and the per-prompt fields (`constraints`,
    `reference`), which are looked up in `records` by `prompt_index` rather than stored as dataset columns:
    constraint dicts of different types would come back from Arrow with every other type's keys set to None.
    TRL logs the function under its `__name__` (`rewards/<name>/mean`). `truncated_reward` (with `eos_ids`)
    replaces the score of each completion whose ids (TRL's `completion_ids`, through the first EOS) do not end in
    an EOS, i.e. that hit the length limit.
    """
    from alignment.reward_sources import FIELDS

    if truncated_reward is not None and not eos_ids:
        raise ValueError("trl_reward_func: truncated_reward needs the eos_ids that end a finished completion")

    def reward(prompts, completions, prompt_index, completion_ids=None, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rows = [records[i] for i in prompt_index]
        fields = {f: [r.get(f) for r in rows] for f in FIELDS if any(f in r for r in rows)}
        scores = [float(x) for x in score(prompts, texts, **fields)]
        bad = next((i for i, s in enumerate(scores) if math.isinf(s)), None)
        if bad is not None:  # TRL would train on nothing (an infinite group mean leaves no advantage) and publish
            raise AlignError(f"reward {name}: completion {bad} scored {scores[bad]}; rewards must be finite "
                             "(NaN marks a completion the reward cannot score)")
        if truncated_reward is None:
            return scores
        return [s if ids and ids[-1] in eos_ids else float(truncated_reward)
                for s, ids in zip(scores, completion_ids, strict=True)]

    reward.__name__ = name
    return reward


def chosen_bonus(rewards, num_generations: int, weight: float, min_score: float | None = None):
    """`weight` for each completion that has its group's highest reward in a group whose rewards differ, and, with
    `min_score`, a reward of at least that; else 0.

    `rewards` is TRL's flat reward vector, each prompt's group `num_generations` consecutive rows; a NaN reward
    (unscorable) is never chosen, and a group with fewer than two scored rows has no best one.
    """
    import torch

    groups = rewards.view(-1, num_generations)
    scored = ~torch.isnan(groups)
    best = torch.where(scored, groups, torch.full_like(groups, -torch.inf)).amax(dim=1, keepdim=True)
    worst = torch.where(scored, groups, torch.full_like(groups, torch.inf)).amin(dim=1, keepdim=True)
    chosen = scored & (groups == best) & (best > worst)
    if min_score is not None:
        chosen &= groups >= min_score
    return (chosen.to(rewards.dtype) * weight).view(-1)


def with_chosen_nll(trainer_cls, weight: float, min_score: float | None = None):
    """`trainer_cls` (TRL's GRPOTrainer) that adds `chosen_bonus(..., weight, min_score)` to the advantages of its
    training batches. TRL computes the rewards (gathered over processes) and the advantages in one method; the
    rewards are kept from its `_calculate_rewards` call and the bonus added to what it returns."""

    class Trainer(trainer_cls):
        chosen_nll, chosen_min_score = weight, min_score

        def _calculate_rewards(self, *args, **kwargs):
            self._rewards_per_func = super()._calculate_rewards(*args, **kwargs)
            return self._rewards_per_func

        def _generate_and_score_completions(self, inputs):
            import torch

            out = super()._generate_and_score_completions(inputs)
            if not self.model.training:  # TRL's eval batches keep their plain advantages
                return out
            # TRL's summed reward, unscorable rows (every function returned None) NaN as in its advantages
            per_func = self._rewards_per_func
            rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
            rewards[torch.isnan(per_func).all(dim=1)] = float("nan")
            bonus = chosen_bonus(rewards, self.num_generations, self.chosen_nll, self.chosen_min_score)
            n = len(out["advantages"])
            local = bonus[self.accelerator.process_index * n:(self.accelerator.process_index + 1) * n]
            out["advantages"] = out["advantages"] + local.to(out["advantages"])
            self._metrics["train"]["chosen_nll/frac"].append((bonus > 0).float().mean().item())
            return out

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def eos_ids(model, tok) -> set[int]:
    """The ids TRL ends a completion at: the generation config's eos_token_id (an int or a list) and the
    tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return set(ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def prompt_dataset(records: list[dict]):
    """TRL's conversational prompt-only format: `prompt` (message lists) + `prompt_index` into `records`."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "prompt_index": i} for i, r in enumerate(records)])


def trainer_class(name: str, sampler: str = "engine", chosen_nll: float = 0.0, chosen_min_score: float | None = None):
    """(TRL's config class, TRL's trainer, sampling through alignment.generation unless `sampler` is "trl", with
    GRPO's `chosen_nll` bonus when it is set) for `grpo` or `rloo`."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if name == "grpo" else (RLOOConfig, RLOOTrainer)
    if chosen_nll:
        trainer_cls = with_chosen_nll(trainer_cls, chosen_nll, chosen_min_score)
    return config_cls, with_engine(trainer_cls) if sampler == "engine" else trainer_cls


def with_engine(trainer_cls):
    """`trainer_cls` whose plain-transformers sampling goes through `alignment.generation.generate`: LoRA merged
    into the weights while sampling (`merged_lora`, in place with a `WeightStash` on CPU; bench/grpo_sampler.py:
    1.77x per GRPO step on SmolLM2),
    ended rows leaving the batch (`retire_every`), bf16 autocast when the run is bf16, and one random stream per
    row seeded from the run's seed and step (not TRL's global RNG). TRL's own path stays for what this one does not
    cover: vLLM, continuous batching, DeepSpeed / FSDP, images, min_p / repetition penalties / extra generation
    kwargs, several EOS ids. TRL recomputes every log-prob with its training forward, so the loss does not depend
    on who sampled."""

    class Trainer(trainer_cls):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
            if not self._engine_can_sample(images, multimodal_fields):
                if getattr(self, "greedy_member", False):
                    raise ConfigError(["group.greedy_member: this run samples through TRL's own generate (vLLM, "
                                       "continuous batching or a sampling option the engine lacks); turn it off"])
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            ids = engine_completions(self, prompt_ids)
            return (ids, None) if trainer_cls.__name__ == "GRPOTrainer" else ids

        def _engine_can_sample(self, images, multimodal_fields) -> bool:
            a = self.args
            # sharded weights (DeepSpeed ZeRO-3, FSDP) need TRL's gather around generate
            has_images = images is not None and any(x is not None for x in images)
            return not (self.use_vllm or self.use_transformers_continuous_batching or self.is_deepspeed_enabled
                        or self.is_fsdp_enabled or has_images or multimodal_fields or getattr(self, "_is_vlm", False)
                        or a.min_p or a.repetition_penalty != 1.0 or a.generation_kwargs
                        or set(self.eos_token_ids) != {self.processing_class.eos_token_id})

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def engine_completions(trainer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Sampled completion ids of each (already chat-templated) prompt row, through the first EOS, as TRL returns
    them; the batch is every row TRL asked for in one call, with the policy's LoRA merged while it samples."""
    from alignment.generation import GenerationSpec, WeightStash, generate, merged_lora

    model = trainer.accelerator.unwrap_model(trainer.model)
    # bf16 autocast only when the run trains in bf16 (precision fp32 samples in fp32)
    spec = GenerationSpec(max_new_tokens=trainer.max_completion_length, do_sample=True,
                          temperature=trainer.temperature, top_p=trainer.top_p, top_k=trainer.top_k or 0,
                          batch_size=len(prompt_ids), autocast="auto" if trainer.args.bf16 else "off")
    # A fresh stream per row, from the run's seed, the optimizer step and the call within it (TRL's own RNG is
    # untouched, so whatever else draws from it does not shift the samples).
    step = trainer.state.global_step
    calls = trainer._engine_calls[1] + 1 if getattr(trainer, "_engine_calls", (None,))[0] == step else 0
    trainer._engine_calls = (step, calls)
    seed = (trainer.args.seed * 1_000_003 + step * 10_007 + calls) % 2**31
    adapter = getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
    # merged in place, the base read back from a stash on disk afterwards (no second copy of the weights in memory)
    stash = trainer.__dict__.setdefault("_weight_stash", WeightStash())
    # TRL lays each prompt's group out as num_generations consecutive rows (its advantages are rewards.view(-1, G))
    greedy = range(0, len(prompt_ids), trainer.num_generations) if getattr(trainer, "greedy_member", False) else ()
    with merged_lora(model, adapter, stash=stash) if isinstance(adapter, str) else contextlib.nullcontext():
        ro = generate(model, trainer.processing_class, [None] * len(prompt_ids), spec, seed=seed,
                      prompt_ids=prompt_ids, greedy_rows=greedy)
    return ro.token_lists


# -- the run -------------------------------------------------------------------------------------------------------
def build_trainer(cfg, sft, prompts: list[dict], score, checkpoints_dir):
    """TRL's GRPOTrainer / RLOOTrainer on base + SFT merged, whose reference is that same SFT model."""
    from alignment.models import load_tokenizer
    from alignment.peft_methods import METHODS, peft_config, select_trainable
    from alignment.policy import load_policy
    from alignment.training import callbacks, trainer_args

    group, adapter = cfg.group, METHODS[cfg.peft.method].adapter
    tok = load_tokenizer(sft.model_dir)
    policy = load_policy(sft, cfg.precision)  # one copy; with an adapter, adapter-off is the reference
    if not adapter:
        select_trainable(policy, cfg.peft)
    config_cls, trainer_cls = trainer_class(cfg.algorithm.name, group.sampler,  # GRPO's NLL term; RLOO has none
                                            getattr(cfg.algorithm, "chosen_nll", 0.0),
                                            getattr(cfg.algorithm, "chosen_min_score", None))
    args = config_cls(**trainer_args(cfg.train, out_dir=checkpoints_dir, seed=cfg.seed, precision=cfg.precision,
                                     report_to=cfg.report_to),
                      **group.trl_kwargs(), **cfg.algorithm.trl_kwargs())
    # Without an adapter to switch off, TRL builds the reference by reloading `config._name_or_path`: the raw
    # base folder, i.e. base *without* SFT. Point it at a temporary copy of base + SFT merged instead (TRL reads
    # it while the trainer is constructed; the copy is then deleted).
    with tempfile.TemporaryDirectory(prefix="grpo-ref-") as ref_dir:
        name_or_path = policy.config._name_or_path
        if not adapter and group.beta:
            policy.save_pretrained(ref_dir, safe_serialization=True)
            policy.config._name_or_path = ref_dir
        reward = trl_reward_func(score, prompts, f"{cfg.reward.kind}_reward", truncated_reward=group.truncated_reward,
                                 eos_ids=eos_ids(policy, tok))
        try:
            trainer = trainer_cls(model=policy, reward_funcs=[reward, *group.length_rewards()], args=args,
                                  train_dataset=prompt_dataset(prompts),
                                  processing_class=tok, peft_config=peft_config(cfg.peft),
                                  callbacks=callbacks() + [health_callback(cfg.health)])
        finally:
            policy.config._name_or_path = name_or_path
    use_kernel(trainer.model, cfg.peft)
    trainer.greedy_member = group.greedy_member  # read by engine_completions
    if trainer.ref_model is not None:
        trainer.ref_model.requires_grad_(False)  # TRL only runs it under no_grad; frozen says so
    return trainer, tok


TRL_HEALTH_KEYS = {"completions/clipped_ratio": "ppo/missing_eos_rate", "completions/mean_length": "ppo/response_length",
                   "entropy": "ppo/entropy", "loss": "train/loss", "grad_norm": "train/grad_norm"}
"""TRL's logged GRPO/RLOO statistics -> the health monitor's names (TRL's KL is k3 per token, never negative, and
there is no in-run held-out evaluation: those two checks do not apply). A NaN loss or gradient norm, or a null
entropy, stops the run at that row (`Diverged`)."""


def health_callback(spec):
    """The PPO stage's guardrails (`health:`, alignment/ppo_callbacks.py) on TRL's logged rows: warnings into the
    log, and a stop limit held for `patience` logged rows raises HealthStop (one line, exit 2). The first-row
    reference (length drift, entropy) is the run's first logged row, also after a resume (TRL's log_history is
    restored from the checkpoint); the consecutive-strike counts start again after a resume."""
    from transformers import TrainerCallback

    from alignment.ppo_callbacks import HealthMonitor

    def health_row(logs: dict, step: int) -> dict:
        return {"step": step, **{ours: logs[trl] for trl, ours in TRL_HEALTH_KEYS.items() if trl in logs}}

    class Health(TrainerCallback):
        def __init__(self):
            self.monitor = HealthMonitor(spec, stage="grpo")

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = health_row(logs or {}, state.global_step)
            if len(row) == 1:  # not a training row (e.g. the final summary)
                return
            if not self.monitor.first and state.log_history:  # after a resume: the run's first row, not this one
                self.monitor.first.update({k: v for k, v in health_row(state.log_history[0], 0).items() if k != "step"})
            for warning in self.monitor.check(row):
                log.warning("[grpo] step %d: %s", state.global_step, warning)

    return Health()


def curve_summary(log_history: list[dict]) -> dict:
    """First/last/max mean reward and last/max KL of TRL's logged steps (keys `reward`, `kl`)."""
    rows = [r for r in log_history if "reward" in r]
    out: dict = {}
    if rows:
        rewards = [r["reward"] for r in rows]
        out.update(reward_first=rewards[0], reward_last=rewards[-1], reward_max=max(rewards))
    kls = [r["kl"] for r in rows if "kl" in r]
    if kls:
        out.update(kl_last=kls[-1], kl_max=max(kls))
    lengths = [r["completions/mean_length"] for r in rows if "completions/mean_length" in r]
    if lengths:
        out.update(completion_length_first=lengths[0], completion_length_last=lengths[-1])
    return out
