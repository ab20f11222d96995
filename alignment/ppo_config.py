"""The PPO stage's hyperparameters (`ppo:`) and in-run evaluation (`eval:`), one docstring per field as in
CleanRL's ppo.py. Kept apart from the trainer (alignment/ppo.py) so the knobs read in one place."""

from __future__ import annotations

from typing import Literal

from alignment.config import Section


class PPOSpec(Section):
    """PPO hyperparameters (the `ppo:` section). Names follow the papers and TRL's former PPOConfig."""

    updates: int = 40
    """PPO updates (rollout + optimisation rounds) in the run."""
    batch_size: int = 8
    """Prompts per rollout: episodes per update."""
    mini_batch_size: int = 4
    """Episodes per optimiser step; batch_size must be a multiple of it."""
    ppo_epochs: int = 2
    """Optimisation passes over each rollout (K in the PPO paper)."""
    lr: float = 1.0e-4
    """AdamW learning rate of the policy and value adapters and the value head."""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """linear: decay to 0 over `updates` (the N-details recipe anneals the learning rate)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of each optimiser step."""
    max_new_tokens: int = 32
    """Tokens sampled per response; a response cut at this length has no EOS."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; log-probs are computed at the same temperature (no top-k/top-p: the
    log-probs must be those of the distribution that sampled the tokens)."""
    score_norm: Literal["none", "sft_rollouts"] = "none"
    """sft_rollouts (the N+ details' reward normalisation): before the first update, sample responses of the
    starting (SFT) policy to `score_norm_prompts` training prompts, and from then on use (score - mean) / std of
    their scores, so 0 is the SFT policy's average response and one unit its spread (on top of the RM's own
    `reward.normalize`, which uses the RM's training responses). Saved in checkpoints; the statistics are logged
    on the step-0 row (`calibration/*`)."""
    score_norm_prompts: int = 64
    """sft_rollouts: training prompts sampled for the statistics (the first of the seeded prompt order)."""
    length_debias: bool = False
    """With score_norm sft_rollouts: also fit score = a + b * tokens (least squares) on those SFT rollouts and
    subtract b * tokens from every later score before normalising (the std is then the residual's). A reward model
    that prefers longer answers (docs/reward.md: length corr +0.2-0.5) then pays nothing for length as such, at the
    rate it paid on the policy's own starting answers (the length bias Singhal et al. 2023 find behind much of
    RLHF's gains). The slope is logged (`calibration/length_slope`) and saved in checkpoints."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a response that hit max_new_tokens without an EOS (None: no penalty); with
    `missing_eos: replace`, such a response scores -missing_eos_penalty instead."""
    missing_eos: Literal["subtract", "replace"] = "subtract"
    """subtract: a cut response keeps what the reward model gave it, minus the penalty (TRL's missing_eos_penalty,
    OpenRLHF). replace: its score *is* -missing_eos_penalty, whatever the reward model says (the N+ details' recipe,
    TRL's former penalty_reward_value): a reward model that rates longer answers ever higher can then not pay a
    policy for running past the budget, since a cut answer is worth less than an average finished one."""
    chosen_nll: float = 0.0
    """Weight of an NLL (SFT) term on the policy's own good responses: every response that ended by itself and
    scored at least `chosen_min_score` gets `chosen_nll` added to the advantage of each of its tokens (after
    whitening). At ratio 1 the clipped policy loss then carries exactly that NLL's gradient; the clip and the KL
    penalty bound it like the rest of the update. The same term as GRPO's `algorithm.chosen_nll` and online DPO's
    `sft` loss on its chosen answers (RPO, Pang et al., 2024), and close to self-imitation learning (Oh et al.,
    2018); PPO has one response per prompt, so a threshold picks the rows instead of a group's best. 0: none."""
    chosen_min_score: float | None = None
    """chosen_nll: the lowest raw reward (the reward's own units, before score_norm and the length debias) that
    makes a finished response chosen, e.g. 1.0 with the gold check as reward (every constraint met)."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty against the reference (the initial value when adaptive_kl)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL in the reward: k1 = log pi - log pi_ref (unbiased, the classic choice) or k3 (never negative)."""
    adaptive_kl: bool = False
    """Ziegler et al.'s controller: steer the KL per response towards kl_target."""
    kl_target: float = 6.0
    """adaptive_kl: target KL per response, in nats."""
    kl_horizon: int = 10000
    """adaptive_kl: episodes over which the coefficient may change by up to 20%."""
    gamma: float = 1.0
    """Discount; 1 (no discount) is the RLHF standard: the score only arrives at the end."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """epsilon of the clipped policy ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value update around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss (it has its own adapter, so it only scales the critic's gradient)."""
    ent_coef: float = 0.0
    """Entropy bonus weight (0: none, as in the RLHF papers; the KL penalty already keeps entropy up)."""
    whiten_advantages: bool = True
    """Normalise advantages per rollout (masked mean 0, std 1)."""
    whiten_rewards: bool = False
    """Rescale the shaped rewards per rollout (std only, the mean is kept) before GAE."""
    value_init: Literal["auto", "reward", "zero"] = "auto"
    """Value head start: the reward model's score head (the TRL/OpenAI choice; needs reward.kind model), zeros, or
    auto (reward when the reward is a model, else zero)."""
    gae: Literal["vectorised", "loop"] = "vectorised"
    """GAE implementation (they agree; the loop is the readable reference)."""
    generation_batch_size: int | None = None
    """Prompts per `generate` call in the rollout; None: the whole rollout (batch_size) in one call, which on CPU
    is the big lever (alignment/generation.py: 212 tok/s at batch 8, 470 at 64 on SmolLM2 bf16)."""
    forward_batch_size: int | None = None
    """Episodes per no-grad forward pass (reference, old log-probs, values, reward); None: mini_batch_size."""
    value_model: Literal["separate", "shared"] = "shared"
    """The critic. separate: its own LoRA adapter `value` on the base + the value head (the N-details recipe: the
    value loss never moves the policy). shared: the value head reads the *policy's* last hidden states (a shared
    actor-critic trunk, as TRL's former AutoModelForCausalLMWithValueHead and InstructGPT-era TRL did): one backbone
    pass gives log-probs and values, so each update runs one no-grad forward and one fwd+bwd per minibatch fewer
    (see docs/ppo_bench.md for the measured speed/memory), and the value loss, weighted by `vf_coef`, also trains
    the policy adapter. Full fine-tuning (no LoRA) always shares the trunk. The default is shared: on the 107M
    benchmark it does ~1.6x less work per episode with ~25% less peak memory, and learned as well on it and on the
    tiny model's tests; separate is the choice when the critic's gradient must not touch the policy."""
    micro_batch_size: int | None = None
    """Episodes per forward/backward inside a minibatch (gradient accumulation; the optimiser still steps once per
    minibatch, on the same gradient up to rounding). Smaller cuts the activation memory; None: the whole minibatch.
    With a shared trunk and one minibatch per update, the first micro-batch's training forward is also its old
    forward (kept from the forward phase); the other micro-batches pay one more no-grad forward there."""
    attention: Literal["auto", "model", "eager"] = "auto"
    """The attention kernel. eager: matmul + softmax everywhere; model: the model's own (usually sdpa) everywhere;
    auto: on CPU eager for the training and reward passes, where PyTorch's sdpa backward (its CPU flash-attention
    kernel) costs several times the eager one at PPO's sequence lengths, and the model's own for sampling (faster
    with a KV cache; docs/ppo_bench.md); elsewhere the model's own. The old log-probs come from the training pass,
    so the sampler's kernel does not enter the PPO ratio."""
    pack: int = 2
    """Sequences per row in the training passes (policy, reference, critic) and the reward adapter's: packed without
    padding, each sequence attending only to itself with positions from 0 (exact: it computes what it would alone),
    so the passes run on the real tokens instead of a batch padded to its longest prompt (-15% tokens on the PPO
    benchmark's prompts at 2). 1: one left-padded row per sequence."""
    pad_to_multiple_of: int = 8
    """Round the width of each training and reward-adapter pass up to a multiple of this many tokens (extra padding;
    1: none). oneDNN (PyTorch's CPU bf16 matmuls) caches a primitive of ~1 MB per matmul shape it meets and keeps it
    for the run: without rounding, every new batch width adds ~25 MB that stays."""
    recompute: Literal["none", "cheap"] = "cheap"
    """Activations recomputed in the backward instead of kept from the forward (torch.utils.checkpoint: the same
    kernels on the same inputs, so the gradients are bit for bit the same). cheap: the elementwise parts, which cost
    ~1% of the FLOPs and hold a large share of the kept activations: the attention probabilities (with the eager
    attention), the MLP's gated activation (Llama/Qwen/Mistral MLPs) and, with a plain LoRA on the down projection,
    its input (the widest activation, rebuilt from the gate and up outputs that are kept anyway), and the RMSNorms'
    fp32 copies. none: keep all. (The LM head's logits are never kept either way: `rl.head_logprobs_and_entropy`.)"""
    rollout_weights: Literal["adapter", "merged", "merged_in_place"] = "adapter"
    """The policy's weights while it samples the rollout. adapter: the base + the LoRA adapter's extra matmuls in
    every adapted layer, at every token. merged: a temporary bf16/fp32 copy of each adapted weight with the adapter
    merged in (base + B A, rounded once), the adapters off: no per-token LoRA work, at the cost of a copy of the
    adapted weights during the rollout. merged_in_place: the same weights written into the base tensors themselves,
    which are read back afterwards from a raw copy in a temporary file (TMPDIR, written at the first rollout): the
    same samples as merged without the second copy in memory (docs/ppo_bench.md). Either way the base weights are
    bit for bit the same after the rollout, so the reference stays exact; the old log-probs come from the training
    forward, so the sampler's rounding difference (merged vs unmerged) does not enter the PPO ratio. Full
    fine-tuning and DoRA always sample with their own weights."""
    release_memory: Literal["none", "trim", "mmap"] = "trim"
    """Give freed activation memory back to the OS (glibc only; a no-op elsewhere). glibc raises its mmap threshold
    after the first large frees, so later activations come from its heaps, which keep their high-water mark.
    trim: malloc_trim after each phase (rollout, no-grad forwards, each optimiser step). mmap: also fix the
    process's mmap threshold at 128 KiB at trainer start (mallopt M_MMAP_THRESHOLD, process-wide, like
    MALLOC_MMAP_THRESHOLD_=131072): every large tensor is then its own mapping, returned on free, at the cost of
    page faults. See docs/ppo_bench.md for the measured peaks."""

    def problems(self, prefix: str = "ppo") -> list[tuple[str, str]]:
        out = []
        for key in ("updates", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "pad_to_multiple_of", "pack",
                    "generation_batch_size", "forward_batch_size", "score_norm_prompts"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                out.append((f"{prefix}.{key}", "expected at least 1"))
        if self.mini_batch_size >= 1 and self.batch_size % self.mini_batch_size:
            out.append((f"{prefix}.mini_batch_size", f"batch_size ({self.batch_size}) must be a multiple of "
                                                     f"mini_batch_size ({self.mini_batch_size})"))
        if self.micro_batch_size is not None and (self.micro_batch_size < 1 or
                                                  self.mini_batch_size % self.micro_batch_size):
            out.append((f"{prefix}.micro_batch_size", f"expected a divisor of mini_batch_size "
                                                      f"({self.mini_batch_size}), got {self.micro_batch_size}"))
        if self.temperature <= 0:
            out.append((f"{prefix}.temperature", "expected a sampling temperature > 0"))
        if self.kl_coef < 0:
            out.append((f"{prefix}.kl_coef", "expected >= 0"))
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon < 1):
            out.append((f"{prefix}.kl_target", "adaptive_kl needs kl_target > 0 and kl_horizon >= 1"))
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            out.append((f"{prefix}.gamma", "gamma and lam must be in [0, 1]"))
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            out.append((f"{prefix}.cliprange", "cliprange and cliprange_value must be > 0"))
        if self.lr <= 0:
            out.append((f"{prefix}.lr", "expected a learning rate > 0"))
        if self.missing_eos == "replace" and self.missing_eos_penalty is None:
            out.append((f"{prefix}.missing_eos", f"replace sets a cut response's score to -missing_eos_penalty: set "
                                                 f"{prefix}.missing_eos_penalty (e.g. 1.0) or {prefix}.missing_eos=subtract"))
        if self.chosen_nll < 0:
            out.append((f"{prefix}.chosen_nll", "expected a weight >= 0"))
        if self.chosen_nll > 0 and self.chosen_min_score is None:
            out.append((f"{prefix}.chosen_nll", f"needs the score that makes a response chosen: set "
                                                f"{prefix}.chosen_min_score (e.g. 1.0 with the gold check as reward) "
                                                f"or {prefix}.chosen_nll=0"))
        if self.length_debias and self.score_norm != "sft_rollouts":
            out.append((f"{prefix}.length_debias", f"fits the length slope on the SFT rollouts of score_norm: "
                                                   f"set {prefix}.score_norm=sft_rollouts (now '{self.score_norm}') "
                                                   f"or {prefix}.length_debias=false"))
        return out


class EvalSpec(Section):
    """Held-out evaluation during the run: the reward curve (and the gold curve the health check watches)."""

    every: int = 5
    """Evaluate before the first update, every N updates, and after the last (0: only before and after)."""
    prompts: int = 32
    """Held-out prompts evaluated (the first N of data.eval)."""
    batch_size: int = 16
    """Prompts per generate call and per reward forward."""
    greedy: bool = True
    """Greedy responses: the curve shows the policy's change, not sampling noise."""
    max_new_tokens: int | None = None
    """None: ppo.max_new_tokens."""

    def problems(self, prefix: str = "eval") -> list[tuple[str, str]]:
        if self.every < 0 or self.prompts < 0 or self.batch_size < 1:
            return [(prefix, "every >= 0, prompts >= 0 and batch_size >= 1 expected")]
        return []

    def due(self, step: int, last: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == last
