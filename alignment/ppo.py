"""PPO for RLHF on one base model: the policy, the reference and the value model are adapters on the same weights.

Roles (Ouyang et al., 2022; "The N implementation details of RLHF with PPO", Huang et al., 2024):

| role      | what it is here                                              | trains |
|-----------|--------------------------------------------------------------|--------|
| policy    | LoRA adapter `default` on the given model (base + SFT merged) | yes    |
| reference | the same model with every adapter disabled (= the SFT model)  | no     |
| value     | a linear value head on the policy's last hidden states        | yes    |
|           | (`value_model: shared`, the default), or on those of its own |        |
|           | LoRA adapter `value` (`value_model: separate`)                |        |
| reward    | a `reward_sources` scorer (RM, function or judge)             | no     |

A fresh LoRA adapter adds exactly zero (its B matrix starts at 0), so at update 0 the policy *is* the
reference and the KL is exactly 0: the same argument as DPO's adapter-off reference (tests check it against a
separately loaded SFT model, on left-padded prompts of different lengths). Only one copy of the weights is in
memory; an RM artifact is a separate model (its weights are a merged fine-tune, not an adapter), whose size is
logged.

`PPOTrainer` takes a plain causal LM + tokenizer + a reward scorer and knows nothing of the artifact store, so
benchmarks drive it directly; `stages/ppo.py` adds data, checkpoints, health checks and publishing.
One `step` (the numbered steps are the ones in `PPOTrainer.step`):

1. rollout: sample responses to left-padded prompts with the policy (KV-cache generation); cut them at the EOS;
2. score them (the RM reads its score at the EOS; a response without EOS loses `missing_eos_penalty`);
3. log-probs of the responses under the policy (the "old" policy) and the reference, values under the critic
   (shared trunk: one pass gives both; with one minibatch of the whole batch that pass is also the first
   optimisation forward, kept with its graph);
4. per-token rewards: -kl_coef * KL on every token + the score on the last one; GAE advantages and returns;
5. `ppo_epochs` passes of shuffled minibatches: clipped policy loss and clipped value loss, one optimiser step each;
6. statistics, and the adaptive KL controller's update.

Dropout stays off throughout (the model is in eval mode even while training): with dropout the log-probs of
the optimisation pass would differ from those of the rollout for the same weights, and the ratio would not
start at 1.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from alignment import rl
from alignment.config import Section
from alignment.errors import AlignError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("align")
POLICY, VALUE = "default", "value"
"""Adapter names. The policy is peft's `default`, so `save_pretrained` writes it at the folder's root, where
`alignment.policy.load_policy` expects an adapter."""


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
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a response that hit max_new_tokens without an EOS (None: no penalty)."""
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
    minibatch, on the same gradient up to rounding). Smaller cuts the activation memory; None: the whole minibatch."""
    release_memory: Literal["none", "trim", "mmap"] = "trim"
    """Give freed activation memory back to the OS (glibc only; a no-op elsewhere). glibc raises its mmap threshold
    after the first large frees, so later activations come from its heaps, which keep their high-water mark.
    trim: malloc_trim after each phase (rollout, no-grad forwards, each optimiser step). mmap: also fix the
    process's mmap threshold at 128 KiB at trainer start (mallopt M_MMAP_THRESHOLD, process-wide, like
    MALLOC_MMAP_THRESHOLD_=131072): every large tensor is then its own mapping, returned on free, at the cost of
    page faults. See docs/ppo_bench.md for the measured peaks."""

    def problems(self, prefix: str = "ppo") -> list[tuple[str, str]]:
        out = []
        for key in ("updates", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, key) < 1:
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
        return out


@dataclass
class Rollout:
    """One batch of episodes. Queries are left-padded, responses right-padded; masks are 1 on real tokens."""

    prompts: list[list[dict]]
    query_ids: "torch.Tensor"
    query_mask: "torch.Tensor"
    response_ids: "torch.Tensor"
    response_mask: "torch.Tensor"
    has_eos: "torch.Tensor"
    completions: list[str]
    scores: "torch.Tensor | None" = None
    """Reward of each response after the missing-EOS penalty (what the policy is trained on)."""
    raw_scores: "torch.Tensor | None" = None
    """The reward source's scores before the penalty."""


class HealthStop(AlignError):
    """Training went wrong in a way that makes going on pointless (the message says what and which limit)."""


class PPOTrainer:
    """PPO on a plain causal LM (see the module docstring). `reward` is a `reward_sources` scorer: called as
    reward(prompts, completions, **fields), or, when it has `score_ids`, given the token ids directly."""

    def __init__(self, model, tok, reward, spec: PPOSpec, lora_config, *, value_head_init=None, seed: int = 0):
        """`lora_config` None trains the full model instead (for comparisons): the reference is then a frozen
        copy (nothing to switch off) and the critic a value head on the policy's own trunk (shared actor-critic),
        so there are two copies of the weights, not four as in TRL's former PPOTrainer."""
        import copy

        import torch
        from peft import get_peft_model

        self.spec, self.tok, self.reward, self.seed = spec, tok, reward, seed
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise ValueError("PPO needs a pad token distinct from eos: with pad == eos the response end and the "
                             "padding cannot be told apart (alignment.models.ensure_pad_token)")
        # 0. the roles: one base model, two adapters (policy = `default`, value), the reference = adapters off
        torch.manual_seed(seed)
        if spec.release_memory == "mmap":
            fix_mmap_threshold()
        if spec.release_memory != "none":
            release_freed_memory()  # the loading's temporaries
        self.full = lora_config is None
        # shared: the critic is the value head on the policy's own trunk (no value adapter, no extra pass)
        self.shared = self.full or spec.value_model == "shared"
        if self.full:
            self.model, self.ref_model = model.requires_grad_(True), copy.deepcopy(model).requires_grad_(False).eval()
            self.base = model
        else:
            self.model = get_peft_model(model, lora_config, adapter_name=POLICY)
            if not self.shared:
                self.model.add_adapter(VALUE, lora_config)
            self.base = self.model.get_base_model()
        self.model.eval()  # no dropout, ever (see the module docstring)
        hidden = self.base.config.get_text_config().hidden_size
        device = next(self.model.parameters()).device
        self.value_head = torch.nn.Linear(hidden, 1).to(device=device, dtype=torch.float32)
        with torch.no_grad():
            if value_head_init is not None:
                weight, bias = value_head_init
                self.value_head.weight.copy_(weight.reshape(1, hidden).float())
                self.value_head.bias.fill_(float(bias))
            else:
                self.value_head.weight.zero_()
                self.value_head.bias.zero_()
        if self.full:
            self.params = {POLICY: list(self.model.parameters())}
        else:
            self.params = {name: [p for n, p in self.model.named_parameters() if ".lora_" in n and f".{name}." in n]
                           for name in self.adapters}
        self.params["value_head"] = list(self.value_head.parameters())
        self._trainable = [p for group in self.params.values() for p in group]
        self.optimizer = torch.optim.AdamW(self._trainable, lr=spec.lr, eps=1e-5, weight_decay=0.0)
        self.kl_ctl = (rl.AdaptiveKLController(spec.kl_coef, spec.kl_target, spec.kl_horizon) if spec.adaptive_kl
                       else rl.FixedKLController(spec.kl_coef))
        self.update = 0
        self.device = device
        # A bf16 base trains its fp32 adapters under autocast (mixed precision): peft would otherwise keep an fp32
        # copy of every adapted layer's input for the backward pass (~0.6 GB for SmolLM2 at 8 x 100 tokens).
        # Every forward of every role runs under it, so the sampler, the old and the new log-probs agree.
        base_dtype = self.base.dtype
        self.autocast_dtype = base_dtype if base_dtype in (torch.bfloat16, torch.float16) else None
        self._use(POLICY)

    @property
    def adapters(self) -> tuple[str, ...]:
        return () if self.full else (POLICY,) if self.shared else (POLICY, VALUE)

    def _trim(self) -> None:
        if self.spec.release_memory != "none":
            release_freed_memory()

    # -- roles -------------------------------------------------------------------------------------------------
    def _amp(self):
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _use(self, adapter: str) -> None:
        """Make `adapter` the active one. peft's set_adapter also freezes the other adapter's weights; both
        adapters and the head always train, so their requires_grad is restored."""
        if self.full:
            return
        self.model.set_adapter(adapter)
        for p in self._trainable:
            p.requires_grad_(True)

    def _inputs(self, query_ids, query_mask, response_ids, response_mask):
        """Query + response as one left-padded sequence, with position ids counted from each row's first real
        token: a left-padded row computes exactly what it would alone (generate does the same)."""
        import torch

        ids = torch.cat([query_ids, response_ids], dim=1)
        attn = torch.cat([query_mask, response_mask], dim=1)
        return ids, attn, (attn.cumsum(-1) - 1).clamp(min=0)

    def _hidden(self, query_ids, query_mask, response_ids, response_mask, *, reference: bool = False):
        """(base model, last hidden states at the positions that predict each response token) of the active role,
        or of the reference. The backbone runs without its LM head: the logits are only needed at the response
        positions (the head is the largest matmul of a small model with a big vocabulary), the values not at all."""
        import contextlib

        ids, attn, pos = self._inputs(query_ids, query_mask, response_ids, response_mask)
        base = self.ref_model if reference and self.full else self.base
        off = self.model.disable_adapter() if reference and not self.full else contextlib.nullcontext()
        with off, self._amp():
            hidden = getattr(base, base.base_model_prefix)(input_ids=ids, attention_mask=attn, position_ids=pos,
                                                           use_cache=False).last_hidden_state
        Q, R = query_ids.shape[1], response_ids.shape[1]
        return base, hidden[:, Q - 1: Q + R - 1]

    def _logits(self, base, hidden):
        """The causal LM's head on `hidden` (what its forward does after the backbone, softcapping included)."""
        with self._amp():
            logits = base.get_output_embeddings()(hidden)
        cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        return logits if not cap else cap * (logits / cap).tanh()

    def response_logits(self, query_ids, query_mask, response_ids, response_mask, *, reference: bool = False):
        """Logits of the active role (or the reference) that predicted each response token: (batch, R, vocab)."""
        return self._logits(*self._hidden(query_ids, query_mask, response_ids, response_mask, reference=reference))

    def _values_of(self, hidden):
        return self.value_head(hidden.float()).squeeze(-1)

    def values(self, query_ids, query_mask, response_ids, response_mask):
        """V(s_t) for each response token t (the state before it): the critic's last hidden state (the value adapter's,
        or the policy's own when the trunk is shared), through the value head. No LM head."""
        if self.shared:
            return self._values_of(self._hidden(query_ids, query_mask, response_ids, response_mask)[1])
        self._use(VALUE)
        try:
            return self._values_of(self._hidden(query_ids, query_mask, response_ids, response_mask)[1])
        finally:
            self._use(POLICY)

    def logprobs(self, query_ids, query_mask, response_ids, response_mask, *, reference: bool = False,
                 with_entropy: bool = False):
        """Per-token log-probs of the responses under the policy (or the reference: adapters off)."""
        logits = self.response_logits(query_ids, query_mask, response_ids, response_mask, reference=reference)
        lp = rl.logprobs_of_taken_tokens(logits, response_ids, self.spec.temperature)
        if not with_entropy:
            return lp
        return lp, rl.entropy_from_logits(logits, self.spec.temperature)

    def policy_and_values(self, query_ids, query_mask, response_ids, response_mask, *, with_entropy: bool = False):
        """Shared trunk only: (log-probs, values[, entropy]) of the policy from one backbone pass."""
        assert self.shared
        base, hidden = self._hidden(query_ids, query_mask, response_ids, response_mask)
        logits = self._logits(base, hidden)
        out = (rl.logprobs_of_taken_tokens(logits, response_ids, self.spec.temperature), self._values_of(hidden))
        return (*out, rl.entropy_from_logits(logits, self.spec.temperature)) if with_entropy else out

    # -- 1. rollout ----------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[list[dict]]):
        """Chat-templated prompts, left-padded (generation appends on the right)."""
        import torch

        rows = [list(self.tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for p in prompts]
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    def generate(self, prompts: list[list[dict]], *, greedy: bool = False, max_new_tokens: int | None = None,
                 seed: int | None = None) -> Rollout:
        import torch
        from transformers import GenerationConfig

        query_ids, query_mask = self.encode_prompts(prompts)
        # A fresh config: the model's own generation_config may carry top_p/top_k/repetition penalties, which
        # would sample from a different distribution than the one the log-probs describe.
        gen = GenerationConfig(do_sample=not greedy, temperature=self.spec.temperature if not greedy else None,
                               top_k=0 if not greedy else None, top_p=1.0 if not greedy else None,
                               max_new_tokens=max_new_tokens or self.spec.max_new_tokens,
                               pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
                               use_cache=True)
        if seed is not None:
            torch.manual_seed(seed)
        self._use(POLICY)
        with torch.no_grad():
            with self._amp():
                out = self.model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen)
        response = out[:, query_ids.shape[1]:]
        # generate keeps stepping finished rows (filling pad) until the longest is done: cut after the first EOS.
        mask, has_eos = rl.response_mask_after_eos(response, self.tok.eos_token_id)
        response = response.masked_fill(mask == 0, self.tok.pad_token_id)
        completions = self.tok.batch_decode(response.masked_fill(response == self.tok.eos_token_id,
                                                                 self.tok.pad_token_id), skip_special_tokens=True)
        return Rollout(prompts, query_ids, query_mask, response, mask, has_eos, completions)

    # -- 2. score ------------------------------------------------------------------------------------------------
    def score(self, ro: Rollout, fields: dict | None = None) -> Rollout:
        import torch

        if hasattr(self.reward, "score_ids"):
            raw = self.reward.score_ids(ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask, ro.has_eos)
        else:
            raw = torch.tensor(self.reward(ro.prompts, ro.completions, **(fields or {})), dtype=torch.float32)
        ro.raw_scores = raw.float().cpu()
        ro.scores = rl.apply_missing_eos_penalty(ro.raw_scores, ro.has_eos.cpu(), self.spec.missing_eos_penalty)
        return ro

    # -- the update ----------------------------------------------------------------------------------------------
    def _chunks(self, n: int, size: int):
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def step(self, prompts: list[list[dict]], fields: dict | None = None) -> dict:
        """One PPO update on a batch of prompts; returns the statistics (the keys of the log rows)."""
        import torch

        s, t0 = self.spec, time.perf_counter()
        # 1. rollout: sample from the current policy; a seed per update makes a resumed run sample the same
        ro = self.generate(prompts, seed=self.seed * 1_000_003 + self.update)
        self._trim()
        t_gen = time.perf_counter() - t0
        # 2. score each response (at its EOS), minus the penalty for responses without one
        self.score(ro, fields)
        scores = ro.scores.to(self.device)
        q, qm, r, rm = ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask
        B = q.shape[0]
        # 3. log-probs under the sampling policy and the reference, values under the critic (no gradient).
        # Shared trunk with one minibatch of the whole batch: the first optimisation forward runs on the rollout's
        # weights, so it *is* the old forward; keep its graph for the first step instead of running it twice
        # (exact: the first ratio is exactly 1).
        first = None
        if self.shared and s.mini_batch_size == B and (s.micro_batch_size or B) == B:
            self._use(POLICY)
            first = self.policy_and_values(q, qm, r, rm, with_entropy=True)
        with torch.no_grad():
            old_lp, ref_lp, old_values = [], [], []
            for c in self._chunks(B, s.forward_batch_size or s.mini_batch_size):
                if first is not None:
                    lp, v = first[0][c].detach(), first[1][c].detach()
                elif self.shared:  # one pass gives both
                    lp, v = self.policy_and_values(q[c], qm[c], r[c], rm[c])
                else:
                    lp, v = self.logprobs(q[c], qm[c], r[c], rm[c]), self.values(q[c], qm[c], r[c], rm[c])
                old_lp.append(lp)
                old_values.append(v)
                ref_lp.append(self.logprobs(q[c], qm[c], r[c], rm[c], reference=True))
            old_lp, ref_lp, old_values = torch.cat(old_lp), torch.cat(ref_lp), torch.cat(old_values)
            mask = rm.float()
            # 4. rewards: -kl_coef * KL per token, + the score on the last real token; then GAE
            kl = rl.KL_ESTIMATORS[s.kl_estimator](old_lp, ref_lp) * mask
            rewards = rl.shape_rewards(scores, kl, mask, self.kl_ctl.value)
            if s.whiten_rewards:
                rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
            gae = rl.gae_vectorised if s.gae == "vectorised" else rl.gae_loop
            advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = rl.masked_whiten(advantages, mask)
        self._trim()
        t_fwd = time.perf_counter() - t0 - t_gen
        # 5. K epochs over shuffled minibatches
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clipfrac", "approxkl", "vf_clipfrac",
                                 "ratio", "grad_norm")}
        for _ in range(s.ppo_epochs):
            order = torch.randperm(B, device=self.device)
            if first is not None:  # the kept graph is in rollout order (the minibatch's loss does not see order)
                order = torch.arange(B, device=self.device)
            for i in range(0, B, s.mini_batch_size):
                idx = order[i: i + s.mini_batch_size]
                self.optimizer.zero_grad(set_to_none=True)
                # Micro-batches accumulate the minibatch's gradient: each loss is a masked mean over its own
                # tokens, so weighting it by its share of the minibatch's tokens sums to the minibatch's loss.
                tokens = mask[idx].sum().clamp(min=1)
                acc: dict[str, float] = {}
                for c in self._chunks(len(idx), s.micro_batch_size or s.mini_batch_size):
                    j = idx[c]
                    mb, m = (q[j], qm[j], r[j], rm[j]), mask[j]
                    w = m.sum() / tokens
                    self._use(POLICY)
                    if first is not None:
                        (new_lp, new_values, entropy), first = first, None
                    elif self.shared:
                        new_lp, new_values, entropy = self.policy_and_values(*mb, with_entropy=True)
                    else:
                        new_lp, entropy = self.logprobs(*mb, with_entropy=True)
                    pg_loss, pg_stats = rl.policy_loss(new_lp, old_lp[j], advantages[j], m, s.cliprange)
                    ent = rl.masked_mean(entropy, m)
                    if self.shared:  # one graph: policy and value losses backpropagate through the same trunk
                        vf_loss, vf_stats = rl.value_loss(new_values, old_values[j], returns[j], m, s.cliprange_value)
                        (w * (pg_loss - s.ent_coef * ent + s.vf_coef * vf_loss)).backward()
                    else:
                        (w * (pg_loss - s.ent_coef * ent)).backward()
                        del new_lp, entropy  # the policy's graph is gone; free its activations before the critic's
                        new_values = self.values(*mb)
                        vf_loss, vf_stats = rl.value_loss(new_values, old_values[j], returns[j], m, s.cliprange_value)
                        (w * s.vf_coef * vf_loss).backward()
                    for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": ent,
                                 **pg_stats, **vf_stats}.items():
                        acc[k] = acc.get(k, 0.0) + float(w) * float(v.detach())
                grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, s.max_grad_norm)
                self.optimizer.step()
                self._trim()
                for k, v in {**acc, "grad_norm": float(grad_norm)}.items():
                    stats[k].append(v)
        # 6. statistics; the KL controller sees this rollout's KL per response
        kl_seq = kl.sum(-1)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out = {
            "ppo/kl": float(kl_seq.mean()),
            "ppo/kl_k3": float((rl.kl_k3(old_lp, ref_lp) * mask).sum(-1).mean()),
            "objective/scores": float(ro.raw_scores.mean()),
            "objective/rlhf_reward": float((scores - self.kl_ctl.value * kl_seq).mean()),
            "ppo/kl_coef": self.kl_ctl.value,
            "ppo/missing_eos_rate": float((~ro.has_eos).float().mean()),
            "ppo/response_length": float(mask.sum(-1).mean()),
            "ppo/advantages_mean": float(rl.masked_mean(advantages, mask)),
            "ppo/returns_mean": float(rl.masked_mean(returns, mask)),
            "ppo/values_mean": float(rl.masked_mean(old_values, mask)),
            **{f"ppo/{k}": mean(v) for k, v in stats.items()},
            "time/generate_s": round(t_gen, 3), "time/forward_s": round(t_fwd, 3),
            "time/update_s": round(time.perf_counter() - t0, 3),
        }
        self.kl_ctl.update(out["ppo/kl"], B)
        self.update += 1
        return out

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, prompts: list[list[dict]], fields: dict | None = None, *, batch_size: int = 16,
                 greedy: bool = True, max_new_tokens: int | None = None, seed: int = 0) -> tuple[dict, list[str]]:
        """Mean reward (before the EOS penalty) of responses to held-out prompts, greedy by default (no sampling
        noise in the curve); the missing-EOS rate and length too. Returns (metrics, completions)."""
        import torch

        scores, eos, lengths, texts = [], [], [], []
        for c in self._chunks(len(prompts), batch_size):
            sub = {k: v[c] for k, v in (fields or {}).items() if v is not None}
            ro = self.score(self.generate(prompts[c], greedy=greedy, max_new_tokens=max_new_tokens, seed=seed), sub)
            scores.append(ro.raw_scores)
            eos.append(ro.has_eos.cpu())
            lengths.append(ro.response_mask.sum(-1).float().cpu())
            texts += ro.completions
        scores, eos, lengths = torch.cat(scores), torch.cat(eos), torch.cat(lengths)
        return {"eval/reward": float(scores.mean()), "eval/missing_eos_rate": float((~eos).float().mean()),
                "eval/response_length": float(lengths.mean())}, texts

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        # save_embedding_layers=False: a LoRA on a tied lm_head would otherwise copy the (unchanged) embeddings.
        weights = ({"model": self.model.state_dict()} if self.full else
                   {name: get_peft_model_state_dict(self.model, adapter_name=name, save_embedding_layers=False)
                    for name in self.adapters})
        return {"update": self.update, **weights,
                "value_head": self.value_head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        if self.full:
            self.model.load_state_dict(state["model"])
        missing = [name for name in self.adapters if name not in state]
        if missing:
            raise ValueError(f"checkpoint has no '{missing[0]}' adapter: it was saved with another ppo.value_model")
        for name in self.adapters:
            res = set_peft_model_state_dict(self.model, state[name], adapter_name=name)
            unexpected = getattr(res, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"checkpoint adapter '{name}' does not fit this model: {unexpected[:3]}")
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.update = state["update"]
        self._use(POLICY)

    def save_policy(self, folder) -> None:
        """The policy adapter only (peft layout, at the folder's root); full weights when training the full model."""
        if self.full:
            self.model.save_pretrained(str(folder), safe_serialization=True)
            return
        self.model.save_pretrained(str(folder), selected_adapters=[POLICY], safe_serialization=True,
                                   save_embedding_layers=False)


def _glibc(name: str):
    """A glibc function, or None where there is none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """glibc's malloc_trim(0): return the free memory of the malloc heaps to the OS."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = _glibc("malloc_trim") or False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Serve every allocation above `nbytes` by its own mmap (and stop glibc's dynamic threshold from rising): a
    freed activation tensor then goes straight back to the OS. Process-wide. False where there is no glibc."""
    mallopt = _glibc("mallopt")
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, nbytes))


def lora_config(peft_spec):
    """The LoRA config of both adapters, from the stage's PeftSpec (dropout is irrelevant: eval mode)."""
    from alignment.peft_methods import peft_config

    return peft_config(peft_spec, "CAUSAL_LM")


def value_head_from_reward_model(rm, mean: float = 0.0, std: float = 1.0):
    """(weight, bias) that make the value head start as the RM's score head, in the normalised reward's units.

    The RM reads the score from its own backbone's last hidden state and the critic from the value adapter's
    on the policy's backbone; both start from (nearly) the SFT weights, so the critic starts by predicting a
    reward-like value instead of 0, and the first updates are not spent fitting the critic's offset.
    """
    weight = rm.score.weight.detach().float().reshape(-1) / max(std, 1e-8)
    bias = ((rm.score.bias.detach().float().item() if getattr(rm.score, "bias", None) is not None else 0.0)
            - mean) / max(std, 1e-8)
    return weight, bias


# -- health guardrails ------------------------------------------------------------------------------------------


class HealthSpec(Section):
    """Guardrails: each check warns past its warn limit and stops the run (HealthStop) past its stop limit for
    `patience` consecutive updates. None switches a limit off."""

    negative_kl_warn: float | None = -0.5
    """Mean KL per response (k1, nats) below this: the policy's log-probs and the sampler disagree (a bug:
    padding, temperature, top-k) or the estimate is noise from tiny batches."""
    negative_kl_stop: float | None = -5.0
    missing_eos_warn: float | None = 0.5
    """Share of responses without an EOS above this."""
    missing_eos_stop: float | None = 0.95
    length_drift_warn: float | None = 2.0
    """Mean response length vs the first update's: above this factor, or below its inverse."""
    length_drift_stop: float | None = 4.0
    entropy_collapse_warn: float | None = 0.3
    """Mean token entropy vs the first update's: below this fraction."""
    entropy_collapse_stop: float | None = 0.05
    reward_hacking_warn: float | None = 0.05
    """Held-out gold score (alignment.gold on prompts with constraints) fallen by more than this since the first
    evaluation while the held-out reward rose: the policy optimises the RM, not the task."""
    reward_hacking_stop: float | None = 0.25
    patience: int = 3
    """Consecutive updates past a stop limit before stopping (single small batches are noisy)."""


class HealthMonitor:
    """Applies a HealthSpec to the stream of update statistics (pure: numbers in, warnings/stop out)."""

    def __init__(self, spec: HealthSpec):
        self.spec = spec
        self.first: dict = {}
        self.strikes: dict[str, int] = {}
        self.warnings: dict[str, int] = {}

    def state_dict(self) -> dict:
        return {"first": self.first, "strikes": self.strikes, "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.strikes, self.warnings = dict(state["first"]), dict(state["strikes"]), dict(state["warnings"])

    def check(self, row: dict) -> list[str]:
        """Warnings for this update's row; raises HealthStop when a check stays past its stop limit."""
        s, out = self.spec, []
        for key in ("ppo/response_length", "ppo/entropy", "eval/reward", "eval/gold"):
            if key in row and key not in self.first:
                self.first[key] = row[key]
        checks = []
        if "ppo/kl" in row:
            kl = row["ppo/kl"]
            checks.append(("negative_kl", _lt(kl, s.negative_kl_warn), _lt(kl, s.negative_kl_stop),
                           f"KL per response is {kl:.3f} nats, negative: the log-probs of the update disagree with "
                           "the sampler (padding/position ids, temperature, top-k/top-p?)", "negative_kl_stop"))
        if "ppo/missing_eos_rate" in row:
            r = row["ppo/missing_eos_rate"]
            checks.append(("missing_eos", _gt(r, s.missing_eos_warn), _gt(r, s.missing_eos_stop),
                           f"{r:.0%} of responses hit max_new_tokens without an EOS (raise ppo.max_new_tokens or "
                           "ppo.missing_eos_penalty)", "missing_eos_stop"))
        if "ppo/response_length" in row and self.first.get("ppo/response_length"):
            f = row["ppo/response_length"] / self.first["ppo/response_length"]
            drift = max(f, 1 / f) if f > 0 else float("inf")
            checks.append(("length_drift", _gt(drift, s.length_drift_warn), _gt(drift, s.length_drift_stop),
                           f"mean response length drifted {f:.2f}x from the first update's "
                           f"{self.first['ppo/response_length']:.1f} tokens (length hacking?)", "length_drift_stop"))
        if "ppo/entropy" in row and self.first.get("ppo/entropy"):
            f = row["ppo/entropy"] / self.first["ppo/entropy"]
            checks.append(("entropy_collapse", _lt(f, s.entropy_collapse_warn), _lt(f, s.entropy_collapse_stop),
                           f"token entropy fell to {f:.0%} of the first update's ({row['ppo/entropy']:.3f} nats): "
                           "the policy is collapsing (lower ppo.lr, raise ppo.kl_coef or ppo.ent_coef)",
                           "entropy_collapse_stop"))
        if "eval/gold" in row and "eval/reward" in row and "eval/gold" in self.first:
            gold_drop = self.first["eval/gold"] - row["eval/gold"]
            rose = row["eval/reward"] > self.first["eval/reward"]
            checks.append(("reward_hacking", rose and _gt(gold_drop, s.reward_hacking_warn),
                           rose and _gt(gold_drop, s.reward_hacking_stop),
                           f"held-out reward rose {self.first['eval/reward']:.3f} -> {row['eval/reward']:.3f} while "
                           f"the gold check fell {self.first['eval/gold']:.3f} -> {row['eval/gold']:.3f} "
                           "(reward hacking: raise ppo.kl_coef, improve the RM)", "reward_hacking_stop"))
        for name, warn, stop, message, limit in checks:
            if warn or stop:
                self.warnings[name] = self.warnings.get(name, 0) + 1
                out.append(message)
            self.strikes[name] = self.strikes.get(name, 0) + 1 if stop else 0
            if self.strikes[name] >= max(1, s.patience if name != "reward_hacking" else 1):
                raise HealthStop(f"ppo: stopped at update {row.get('step', '?')}: {message}; past "
                                 f"health.{limit}={getattr(s, limit)} for {self.strikes[name]} consecutive "
                                 f"check(s) (a checkpoint was saved; change the limit to go on)")
        return out


def _gt(x: float, limit: float | None) -> bool:
    return limit is not None and x > limit


def _lt(x: float, limit: float | None) -> bool:
    return limit is not None and x < limit
