"""PPO for RLHF on one base model: the policy, the reference, the value model and the reward model are roles
of the same weights.

Roles (Ouyang et al., 2022; "The N implementation details of RLHF with PPO", Huang et al., 2024):

| role      | what it is here                                               | trains |
|-----------|---------------------------------------------------------------|--------|
| policy    | LoRA adapter `default` on the given model (base + SFT merged)  | yes    |
| reference | the same model with every adapter disabled (= the SFT model)   | no     |
| value     | a linear value head on the policy's last hidden states         | yes    |
|           | (`value_model: shared`, the default), or on those of its own  |        |
|           | LoRA adapter `value` (`value_model: separate`)                 |        |
| reward    | the reward stage's LoRA adapter `reward` + its score head on   | no     |
|           | the same base (`reward_sources.AdapterReward`), or any other  |        |
|           | `reward_sources` scorer (merged RM, function, judge)          |        |

A fresh LoRA adapter adds exactly zero (its B matrix starts at 0), so at update 0 the policy *is* the
reference and the KL is exactly 0: the same argument as DPO's adapter-off reference (tests check it against a
separately loaded SFT model, on left-padded prompts of different lengths). Only one copy of the weights is in
memory.

`PPOTrainer` takes a plain causal LM + tokenizer + a reward scorer and knows nothing of the artifact store, so
benchmarks drive it directly. `train` is the loop (learning-rate schedule, held-out evaluation, callbacks such
as the health guardrails, checkpoints that resume exactly); `step` is one update, in named phases:

1. `rollout`: sample responses to left-padded prompts with the policy (`alignment.generation.generate`, the one
   generation path); cut them after the EOS;
2. `score`: the reward of each response (the RM reads its score at the EOS; a response without EOS loses
   `missing_eos_penalty`, or with `missing_eos: replace` scores -missing_eos_penalty);
3. `forward`: log-probs of the responses under the policy (the "old" policy) and the reference, values under
   the critic (shared trunk: one pass gives both; with one minibatch of the whole batch that pass is also the
   first optimisation forward, kept with its graph);
4. `advantages`: per-token rewards -kl_coef * KL on every token + the score on the last one; GAE;
5. `optimise`: `ppo_epochs` passes of shuffled minibatches, clipped policy loss and clipped value loss, one
   optimiser step each;
6. `statistics`, and the adaptive KL controller's update.

Dropout stays off throughout (the model is in eval mode even while training): with dropout the log-probs of
the optimisation pass would differ from those of the rollout for the same weights, and the ratio would not
start at 1.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alignment import ppo_state, rl
from alignment.allocator import fix_mmap_threshold, release_freed_memory
from alignment.errors import ArtifactError
from alignment.fused_lora import fuse_lora_layers
from alignment.generation import Rollout
from alignment.packing import pack_sequences
from alignment.ppo_config import EvalSpec, PPOSpec
from alignment.ppo_callbacks import (Control, Diverged, GoldCheck, HealthCallback, HealthMonitor,  # noqa: F401
                                     HealthSpec, HealthStop, JsonlLog, LiveTracking, PPOCallback, ProgressBar,
                                     StopOnPreemption)
from alignment.recompute import recompute_cheap_parts, register_recomputed_eager

if TYPE_CHECKING:
    import torch

log = logging.getLogger("align")
POLICY, VALUE, REWARD = "default", "value", "reward"
"""Adapter names. The policy is peft's `default`, so `save_pretrained` writes it at the folder's root, where
`alignment.policy.load_policy` expects an adapter."""


@dataclass
class Checkpoints:
    """Where and how often `PPOTrainer.train` saves (format: alignment/ppo_state.py)."""

    folder: Path
    every: int = 10
    keep: int = 2


@dataclass
class TrainResult:
    history: list[dict]
    """Every log row, step 0 (the evaluation before training) included; resumed runs include the earlier rows."""
    start_update: int
    """The update the loop started from (> 0 after a resume)."""
    seconds: float
    cpu_seconds: float
    """user + system CPU time of the process over the loop."""


@dataclass
class Experience:
    """The rollout seen by the old policy, the reference and the critic, and what GAE makes of it (no graph,
    except `first`: the kept first optimisation forward, see `PPOTrainer.forward`)."""

    old_logprobs: "torch.Tensor"
    ref_logprobs: "torch.Tensor"
    values: "torch.Tensor"
    mask: "torch.Tensor"
    kl: "torch.Tensor | None" = None
    advantages: "torch.Tensor | None" = None
    returns: "torch.Tensor | None" = None
    first: tuple | None = None


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


def as_row(prompt) -> dict:
    """A prompt row ({"prompt": messages, "constraints": ..., ...}) from a row or a bare message list."""
    return prompt if isinstance(prompt, dict) and "prompt" in prompt else {"prompt": list(prompt)}


def fields_of(rows: list[dict]) -> dict:
    """Per-prompt fields a reward function may take (None when no row has the field)."""
    from alignment.reward_sources import FIELDS

    return {k: ([r.get(k) for r in rows] if any(k in r for r in rows) else None) for k in FIELDS}


class PPOTrainer:
    """PPO on a plain causal LM (see the module docstring). `reward` is a `reward_sources` scorer: called as
    reward(prompts, completions, **fields), or, when it has `score_ids`, given the token ids directly; one with
    `attach` (the reward model's adapter) becomes a role on this trainer's base."""

    def __init__(self, model, tok, reward, spec: PPOSpec, lora_config, *, value_head_init=None, seed: int = 0,
                 fused_lora: bool = True):
        """`lora_config` None trains the full model instead (for comparisons): the reference is then a frozen
        copy (nothing to switch off) and the critic a value head on the policy's own trunk (shared actor-critic),
        so there are two copies of the weights, not four as in TRL's former PPOTrainer. `fused_lora` (the stage's
        `peft.kernel: fused`): plain LoRA layers add their update with one addmm (alignment.fused_lora)."""
        import torch

        if not hasattr(reward, "score_ids"):
            from alignment.reward_sources import with_fields

            reward = with_fields(reward)  # a plain fn(prompts, completions[, constraints=, reference=])
        self.spec, self.tok, self.reward, self.seed = spec, tok, reward, seed
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise ValueError("PPO needs a pad token distinct from eos: with pad == eos the response end and the "
                             "padding cannot be told apart (alignment.models.ensure_pad_token)")
        torch.manual_seed(seed)
        if spec.release_memory == "mmap":
            fix_mmap_threshold()
        if spec.release_memory != "none":
            release_freed_memory()  # the loading's temporaries
        self._build_roles(model, lora_config)
        if spec.recompute == "cheap":
            recompute_cheap_parts(self.base)
        if fused_lora and not self.full:  # peft.kernel (alignment.fused_lora)
            fuse_lora_layers(self.model)
        self.value_head = self._value_head(value_head_init)
        self._value_predicts_scores = value_head_init is not None  # a copied score head: in the scores' units
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
        self.score_shift, self.score_scale = 0.0, 1.0  # ppo.score_norm: set by calibrate_scores
        self.length_slope = 0.0  # ppo.length_debias: reward per response token, also set by calibrate_scores
        self._stash = None  # rollout_weights merged_in_place: the base weights' bytes on disk (generation.WeightStash)
        # A bf16 base trains its fp32 adapters under autocast (mixed precision): peft would otherwise keep an fp32
        # copy of every adapted layer's input for the backward pass (~0.6 GB for SmolLM2 at 8 x 100 tokens).
        # Every forward of every role runs under it, so the sampler, the old and the new log-probs agree.
        base_dtype = self.base.dtype
        self.autocast_dtype = base_dtype if base_dtype in (torch.bfloat16, torch.float16) else None
        self._use(POLICY)
        if hasattr(reward, "attach"):
            reward.attach(self)  # the reward model's adapter joins the roles on this base
        if self.autocast_dtype is not None and not self.full:
            # peft casts each adapter's input to the adapter's fp32 before its matmul, and autocast casts it straight
            # back: the same bf16 values (exact), at the cost of two copies per adapter, one of which the backward
            # keeps. Every pass runs under autocast, so the casts can go.
            for module in self.model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False

    def _build_roles(self, model, lora_config) -> None:
        """0. the roles: one base, the policy adapter (+ the value adapter), the reference = adapters off."""
        import copy

        from peft import get_peft_model

        self.full = lora_config is None
        # The attention kernel of the passes with a graph (and of every pass that must agree with them) vs sampling's
        own = model.config._attn_implementation
        cpu = next(model.parameters()).device.type == "cpu"
        self.attention = {"train": "eager" if self.spec.attention == "eager" or (self.spec.attention == "auto" and cpu)
                          else own, "sample": "eager" if self.spec.attention == "eager" else own}
        if self.attention["train"] == "eager" and self.spec.recompute == "cheap":
            self.attention["train"] = register_recomputed_eager()
            if self.attention["sample"] == "eager":
                self.attention["sample"] = self.attention["train"]
        if self.attention["train"] != own:
            model.set_attn_implementation(self.attention["train"])  # before the reference copy of full fine-tuning
        head = model.get_output_embeddings()
        if head is not None:  # generate's last-position slice is strided: as is, it would run on 8 copies of the head
            head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
        # shared: the critic is the value head on the policy's own trunk (no value adapter, no extra pass)
        self.shared = self.full or self.spec.value_model == "shared"
        if self.full:
            self.model, self.ref_model = model.requires_grad_(True), copy.deepcopy(model).requires_grad_(False).eval()
            self.base = model
        else:
            self.model = get_peft_model(model, lora_config, adapter_name=POLICY)
            if not self.shared:
                self.model.add_adapter(VALUE, lora_config)
            self.base = self.model.get_base_model()
        self.model.eval()  # no dropout, ever (see the module docstring)
        self.device = next(self.model.parameters()).device

    def _value_head(self, init):
        import torch

        hidden = self.base.config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1).to(device=self.device, dtype=torch.float32)
        with torch.no_grad():
            weight, bias = init if init is not None else (torch.zeros(hidden), 0.0)
            head.weight.copy_(weight.reshape(1, hidden).float())
            head.bias.fill_(float(bias))
        return head

    @property
    def adapters(self) -> tuple[str, ...]:
        """The trained adapters (the reward adapter, when there is one, is frozen and not listed)."""
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
        """Make `adapter` the active one. peft's set_adapter also freezes the other adapters' weights; the
        trained adapters and the head always train, so their requires_grad is restored."""
        if self.full:
            return
        self.model.set_adapter(adapter)
        for p in self._trainable:
            p.requires_grad_(True)

    def add_frozen_adapter(self, name: str, config, weights: dict) -> None:
        """Another role on the same base: a frozen LoRA adapter (the reward model's), from peft-format weights."""
        from peft import set_peft_model_state_dict

        if self.full:
            raise ValueError("a frozen adapter role needs LoRA training (lora_config), not full fine-tuning")
        self.model.add_adapter(name, config)
        res = set_peft_model_state_dict(self.model, weights, adapter_name=name)
        unexpected = getattr(res, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter '{name}' does not fit this model: {unexpected[:3]}")
        self._use(POLICY)
        for n, p in self.model.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(False)

    def role_hidden(self, role: str, input_ids, attention_mask):
        """Last hidden states (no LM head, no gradient) at the last column of a left-padded batch under the adapter
        `role`: (batch, 1, hidden), which is all a scorer reads."""
        import torch

        self._use(role)
        try:
            with torch.no_grad(), self._amp():
                return self._backbone(self.base, input_ids, attention_mask, slice(-1, None))
        finally:
            self._use(POLICY)

    def _backbone(self, base, ids, attn, cols: slice):
        """Last hidden states of `base`'s backbone at the columns `cols` of a batch whose real tokens are where `attn`
        is 1 (each row one sequence; what is at the columns where `attn` is 0 is finite and meaningless).

        With `pack` > 1 the sequences are packed, several to a row, without padding between them: each starts at
        position 0 and attends only to itself (transformers builds the block-diagonal causal mask from the position
        ids), so it computes what it would alone, on fewer tokens than a left-padded batch. With pack 1 the batch runs
        left-padded, positions counted from each row's first real token (exact too: generate does the same)."""
        import torch

        backbone = getattr(base, base.base_model_prefix)
        if self.spec.pack <= 1:
            n = ids.shape[1]
            extra = -n % self.spec.pad_to_multiple_of
            if extra:
                pad = ids.new_full((ids.shape[0], extra), self.tok.pad_token_id)
                ids, attn = torch.cat([pad, ids], dim=1), torch.cat([torch.zeros_like(pad), attn], dim=1)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            hidden = backbone(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
            return hidden[:, -n:][:, cols]
        rows = -(-ids.shape[0] // self.spec.pack)
        packed, pos, index = pack_sequences(ids, attn, rows, self.spec.pad_to_multiple_of, self.tok.pad_token_id)
        hidden = backbone(input_ids=packed, position_ids=pos, use_cache=False).last_hidden_state
        flat = torch.cat([hidden.flatten(0, 1), hidden.new_zeros(1, hidden.shape[-1])])
        return flat[index[:, cols]]

    def _hidden(self, query_ids, query_mask, response_ids, response_mask, *, reference: bool = False):
        """(base model, last hidden states at the positions that predict each response token) of the active role,
        or of the reference. The backbone runs without its LM head: the logits are only needed at the response
        positions (the head is the largest matmul of a small model with a big vocabulary), the values not at all."""
        import contextlib

        import torch

        ids, attn = torch.cat([query_ids, response_ids], dim=1), torch.cat([query_mask, response_mask], dim=1)
        base = self.ref_model if reference and self.full else self.base
        off = self.model.disable_adapter() if reference and not self.full else contextlib.nullcontext()
        Q, R = query_ids.shape[1], response_ids.shape[1]
        with off, self._amp():
            return base, self._backbone(base, ids, attn, slice(Q - 1, Q + R - 1))

    def _logits(self, base, hidden):
        """The causal LM's head on `hidden` (what its forward does after the backbone, softcapping included)."""
        with self._amp():  # contiguous: a strided 3D input would run as a batched matmul on 8 copies of the head
            logits = base.get_output_embeddings()(hidden.contiguous())
        cap = _softcap(base)
        return logits if not cap else cap * (logits / cap).tanh()

    def _taken(self, base, hidden, response_ids):
        """(log-probs of the response tokens, entropies) from the last hidden states, through the LM head a chunk of
        positions at a time (`rl.head_logprobs_and_entropy`: the full logits are never held, the largest tensors
        of a training pass); a head with a bias or softcapping goes through the full logits."""
        import torch

        head, t = base.get_output_embeddings(), self.spec.temperature
        if isinstance(head, torch.nn.Linear) and head.bias is None and not _softcap(base):
            with self._amp():
                return rl.head_logprobs_and_entropy(hidden, head.weight, response_ids, t)
        logits = self._logits(base, hidden)
        return rl.logprobs_of_taken_tokens(logits, response_ids, t), rl.entropy_from_logits(logits, t)

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
        base, hidden = self._hidden(query_ids, query_mask, response_ids, response_mask, reference=reference)
        lp, entropy = self._taken(base, hidden, response_ids)
        return (lp, entropy) if with_entropy else lp

    def policy_and_values(self, query_ids, query_mask, response_ids, response_mask, *, with_entropy: bool = False):
        """Shared trunk only: (log-probs, values[, entropy]) of the policy from one backbone pass."""
        assert self.shared
        base, hidden = self._hidden(query_ids, query_mask, response_ids, response_mask)
        lp, entropy = self._taken(base, hidden, response_ids)
        return (lp, self._values_of(hidden), entropy) if with_entropy else (lp, self._values_of(hidden))

    # -- 1. rollout ----------------------------------------------------------------------------------------------
    def generation_spec(self, batch_size: int | None = None):
        """Pure sampling at the PPO temperature (no top-k/top-p: the log-probs must describe the sampler)."""
        from alignment.generation import GenerationSpec

        return GenerationSpec(max_new_tokens=self.spec.max_new_tokens, do_sample=True,
                              temperature=self.spec.temperature, top_p=1.0, top_k=0,
                              batch_size=batch_size or self.spec.generation_batch_size or self.spec.batch_size)

    def rollout(self, prompts: list[list[dict]], *, greedy: bool = False, max_new_tokens: int | None = None,
                seed: int | None = None, batch_size: int | None = None) -> Rollout:
        """Responses of the policy (alignment.generation: left-padded prompts, cut after the first EOS)."""
        import contextlib

        from alignment.generation import generate

        self._use(POLICY)
        merged = contextlib.nullcontext() if self.spec.rollout_weights == "adapter" else self.merged_policy()
        with merged, self._attention_for("sample"):
            return generate(self.model, self.tok, prompts, self.generation_spec(batch_size), seed=seed,
                            max_new_tokens=max_new_tokens, greedy=greedy, autocast_dtype=self.autocast_dtype)

    @contextmanager
    def _attention_for(self, passes: str):
        """The model's attention implementation for `passes` (sample or train) inside, the training one after."""
        switch = self.attention[passes] != self.attention["train"]
        if switch:
            self.base.set_attn_implementation(self.attention[passes])
        try:
            yield
        finally:
            if switch:
                self.base.set_attn_implementation(self.attention["train"])

    @contextmanager
    def merged_policy(self):
        """Inside: the policy adapter merged into the adapted weights, the adapters off (`alignment.generation.
        merged_lora`: temporary copies, or in place with `rollout_weights: merged_in_place`); after it the base
        tensors, i.e. the reference, are bit for bit what they were. A no-op for full fine-tuning and for adapter
        variants (DoRA) whose merge is not base + B A."""
        from alignment.generation import WeightStash, merged_lora

        if self.full:
            yield
            return
        if self.spec.rollout_weights == "merged_in_place" and self._stash is None:
            self._stash = WeightStash()
        try:
            with merged_lora(self.model, POLICY, stash=self._stash):  # None (copies) unless merged_in_place
                yield
        finally:
            self._use(POLICY)

    # -- 2. score ------------------------------------------------------------------------------------------------
    def score(self, ro: Rollout, fields: dict | None = None) -> Rollout:
        """The reward of each response; `scores` has the missing-EOS penalty, `raw_scores` not."""
        import torch

        if hasattr(self.reward, "score_ids"):
            raw = self.reward.score_ids(ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask, ro.has_eos)
        else:
            given = {k: v for k, v in (fields or {}).items() if v is not None}  # fields no prompt row has
            raw = torch.tensor(self.reward(ro.prompts, ro.completions, **given), dtype=torch.float32)
        ro.chosen = rl.chosen_responses(raw, ro.has_eos, self.spec.chosen_min_score if self.spec.chosen_nll else None)
        raw = raw.float().cpu() - self.length_slope * ro.response_mask.sum(-1).float().cpu()
        ro.raw_scores = (raw - self.score_shift) / self.score_scale
        ro.scores = rl.apply_missing_eos_penalty(ro.raw_scores, ro.has_eos.cpu(), self.spec.missing_eos_penalty,
                                                 replace=self.spec.missing_eos == "replace")
        return ro

    def calibrate_scores(self, rows: list[dict]) -> dict:
        """`ppo.score_norm: sft_rollouts`: the mean and std of the current policy's scores on sampled responses to
        `rows` become the normalisation of every later score. Returns the statistics (for the log)."""
        self.score_shift, self.score_scale, self.length_slope = 0.0, 1.0, 0.0
        ro = self.score(self.rollout([r["prompt"] for r in rows], seed=self.seed * 1_000_003 - 1), fields_of(rows))
        if self.spec.length_debias:
            lengths = ro.response_mask.sum(-1).float().cpu()
            self.length_slope = rl.length_slope(ro.raw_scores, lengths)
            ro.raw_scores = ro.raw_scores - self.length_slope * lengths
        mean, std = float(ro.raw_scores.mean()), float(ro.raw_scores.std(unbiased=False))
        self.score_shift, self.score_scale = mean, max(std, 1e-6)
        if self._value_predicts_scores:  # keep predicting the same scores, now in the new units
            import torch

            with torch.no_grad():
                self.value_head.weight.div_(self.score_scale)
                self.value_head.bias.sub_(mean).div_(self.score_scale)
        log.info("[ppo] score normalisation from %d SFT rollouts: mean %.4f, std %.4f, length slope %.4f / token",
                 len(rows), mean, std, self.length_slope)
        return {"calibration/score_mean": mean, "calibration/score_std": std,
                "calibration/length_slope": self.length_slope,
                "calibration/missing_eos_rate": float((~ro.has_eos).float().mean())}

    # -- 3. the old policy, the reference and the critic on the rollout --------------------------------------------
    def _chunks(self, n: int, size: int, start: int = 0):
        return [slice(i, min(i + size, n)) for i in range(start, n, size)]

    def forward(self, ro: Rollout) -> Experience:
        """Log-probs under the sampling policy and the reference, values under the critic (no gradient).

        Shared trunk with one minibatch of the whole batch: the first optimisation forward (of the first
        micro-batch) runs on the rollout's weights, so it *is* the old forward of those rows; its graph is kept for
        the first step instead of running it twice (exact: the first ratio is exactly 1)."""
        import torch

        s, (q, qm, r, rm) = self.spec, (ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
        B, size = q.shape[0], s.forward_batch_size or s.mini_batch_size
        with torch.no_grad():  # the reference first: its temporaries come and go before the kept graph is built
            ref_lp = [self.logprobs(q[c], qm[c], r[c], rm[c], reference=True) for c in self._chunks(B, size)]
        self._trim()
        first, old_lp, values = None, [], []
        if self.shared and s.mini_batch_size == B:
            self._use(POLICY)
            m = slice(0, s.micro_batch_size or B)
            first = self.policy_and_values(q[m], qm[m], r[m], rm[m], with_entropy=True)
            old_lp, values = [first[0].detach()], [first[1].detach()]
        with torch.no_grad():
            for c in self._chunks(B, size, start=0 if first is None else first[0].shape[0]):
                if self.shared:  # one pass gives both
                    lp, v = self.policy_and_values(q[c], qm[c], r[c], rm[c])
                else:
                    lp, v = self.logprobs(q[c], qm[c], r[c], rm[c]), self.values(q[c], qm[c], r[c], rm[c])
                old_lp.append(lp)
                values.append(v)
        self._trim()
        return Experience(torch.cat(old_lp), torch.cat(ref_lp), torch.cat(values), rm.float(), first=first)

    # -- 4. advantages -----------------------------------------------------------------------------------------------
    def advantages(self, ro: Rollout, exp: Experience) -> Experience:
        """Per-token rewards (-kl_coef * KL on every token + the score on the last one), then GAE."""
        import torch

        s, mask = self.spec, exp.mask
        with torch.no_grad():
            exp.kl = rl.KL_ESTIMATORS[s.kl_estimator](exp.old_logprobs, exp.ref_logprobs) * mask
            rewards = rl.shape_rewards(ro.scores.to(self.device), exp.kl, mask, self.kl_ctl.value)
            if s.whiten_rewards:
                rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
            gae = rl.gae_vectorised if s.gae == "vectorised" else rl.gae_loop
            exp.advantages, exp.returns = gae(rewards, exp.values, mask, s.gamma, s.lam)
            if s.whiten_advantages:
                exp.advantages = rl.masked_whiten(exp.advantages, mask)
            if s.chosen_nll:  # after whitening, so the weight is in the units the NLL term has in GRPO and RPO
                exp.advantages = rl.add_chosen_bonus(exp.advantages, ro.chosen, mask, s.chosen_nll)
        return exp

    # -- 5. optimise --------------------------------------------------------------------------------------------------
    def optimise(self, ro: Rollout, exp: Experience) -> dict[str, list[float]]:
        """`ppo_epochs` passes over shuffled minibatches, one optimiser step each; the per-step statistics."""
        import torch

        s, B = self.spec, ro.query_ids.shape[0]
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clipfrac",
                                                         "approxkl", "vf_clipfrac", "ratio", "grad_norm")}
        for _ in range(s.ppo_epochs):
            # the kept first graph is in rollout order (a minibatch's loss does not depend on the order)
            order = (torch.arange(B, device=self.device) if exp.first is not None
                     else torch.randperm(B, device=self.device))
            for i in range(0, B, s.mini_batch_size):
                for k, v in self._minibatch(ro, exp, order[i: i + s.mini_batch_size]).items():
                    stats[k].append(v)
        return stats

    def _minibatch(self, ro: Rollout, exp: Experience, idx) -> dict[str, float]:
        """One optimiser step. Micro-batches accumulate the minibatch's gradient: each loss is a masked mean over
        its own tokens, so weighting it by its share of the minibatch's tokens sums to the minibatch's loss."""
        import torch

        s = self.spec
        self.optimizer.zero_grad(set_to_none=True)
        tokens = exp.mask[idx].sum().clamp(min=1)
        acc: dict[str, float] = {}
        for c in self._chunks(len(idx), s.micro_batch_size or s.mini_batch_size):
            j = idx[c]
            mb, m = (ro.query_ids[j], ro.query_mask[j], ro.response_ids[j], ro.response_mask[j]), exp.mask[j]
            w = m.sum() / tokens
            self._use(POLICY)
            if exp.first is not None:
                (new_lp, new_values, entropy), exp.first = exp.first, None
            elif self.shared:
                new_lp, new_values, entropy = self.policy_and_values(*mb, with_entropy=True)
            else:
                new_lp, entropy = self.logprobs(*mb, with_entropy=True)
            pg_loss, pg_stats = rl.policy_loss(new_lp, exp.old_logprobs[j], exp.advantages[j], m, s.cliprange)
            ent = rl.masked_mean(entropy, m)
            if self.shared:  # one graph: policy and value losses backpropagate through the same trunk
                vf_loss, vf_stats = rl.value_loss(new_values, exp.values[j], exp.returns[j], m, s.cliprange_value)
                (w * (pg_loss - s.ent_coef * ent + s.vf_coef * vf_loss)).backward()
            else:
                (w * (pg_loss - s.ent_coef * ent)).backward()
                del new_lp, entropy  # the policy's graph is gone; free its activations before the critic's
                vf_loss, vf_stats = rl.value_loss(self.values(*mb), exp.values[j], exp.returns[j], m,
                                                  s.cliprange_value)
                (w * s.vf_coef * vf_loss).backward()
            for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": ent, **pg_stats,
                         **vf_stats}.items():
                acc[k] = acc.get(k, 0.0) + float(w) * float(v.detach())
        acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self._trainable, s.max_grad_norm))
        self.optimizer.step()
        self._trim()
        return acc

    # -- one update -------------------------------------------------------------------------------------------------
    def step(self, prompts: list[list[dict]], fields: dict | None = None) -> dict:
        """One PPO update on a batch of prompts (InstructGPT's recipe); returns the statistics of the log row."""
        clock = _Clock()
        with clock("generate"):  # 1. sample; a seed per update makes a resumed run sample the same
            ro = self.rollout(prompts, seed=self.seed * 1_000_003 + self.update)
            self._trim()
        with clock("score"):  # 2. score each response (at its EOS), minus the penalty for responses without one
            self.score(ro, fields)
            self._trim()
        with clock("forward"):  # 3. old log-probs, reference log-probs, values; 4. KL-shaped rewards, GAE
            exp = self.advantages(ro, self.forward(ro))
        with clock("optimise"):  # 5. K epochs of clipped policy + value losses
            stats = self.optimise(ro, exp)
        out = self.statistics(ro, exp, stats)  # 6. statistics; the KL controller sees this rollout's KL
        out.update({f"time/{k}_s": round(v, 3) for k, v in clock.seconds.items()})
        out["time/update_s"] = round(sum(clock.seconds.values()), 3)
        self.kl_ctl.update(out["ppo/kl"], len(ro.prompts))
        self.update += 1
        return out

    def statistics(self, ro: Rollout, exp: Experience, stats: dict[str, list[float]]) -> dict:
        mask, kl_seq = exp.mask, exp.kl.sum(-1)
        return {
            "ppo/kl": float(kl_seq.mean()),
            "ppo/kl_k3": float((rl.kl_k3(exp.old_logprobs, exp.ref_logprobs) * mask).sum(-1).mean()),
            "objective/scores": float(ro.raw_scores.mean()),
            "objective/rlhf_reward": float((ro.scores.to(kl_seq.device) - self.kl_ctl.value * kl_seq).mean()),
            "ppo/kl_coef": self.kl_ctl.value,
            "ppo/missing_eos_rate": float((~ro.has_eos).float().mean()),
            **({"ppo/chosen_frac": float(ro.chosen.float().mean())} if self.spec.chosen_nll else {}),
            "ppo/response_length": float(mask.sum(-1).mean()),
            "ppo/advantages_mean": float(rl.masked_mean(exp.advantages, mask)),
            "ppo/returns_mean": float(rl.masked_mean(exp.returns, mask)),
            "ppo/values_mean": float(rl.masked_mean(exp.values, mask)),
            **{f"ppo/{k}": sum(v) / len(v) for k, v in stats.items()},
        }

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def lr_at(self, update: int) -> float:
        """The learning rate of update `update` (0-based): constant, or linear decay to 0 over the run."""
        s = self.spec
        return s.lr * (1.0 - update / s.updates) if s.lr_schedule == "linear" else s.lr

    # -- the loop ---------------------------------------------------------------------------------------------------
    def train(self, prompts: list, eval_prompts: list = (), callbacks: list = (), *,
              eval_spec: EvalSpec | None = None, checkpoints: Checkpoints | None = None,
              resume_from: Path | None = None) -> TrainResult:
        """`spec.updates` updates on `prompts` (rows {"prompt", "constraints", ...} or bare message lists):
        held-out evaluation before the first update, every `eval_spec.every` and after the last; callbacks after
        each update (alignment/ppo_callbacks.py); checkpoints every `checkpoints.every` updates and whenever a
        callback asks (resume with `resume_from`). Stops early when a callback says so (preemption)."""
        rows, eval_rows = [as_row(p) for p in prompts], [as_row(p) for p in eval_prompts]
        ev = eval_spec or EvalSpec()
        history = self.load_checkpoint(resume_from, callbacks) if resume_from else []
        start, schedule = self.update, PromptSchedule(len(rows), self.spec.batch_size, self.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        for cb in callbacks:
            cb.on_train_begin(self, history)
        try:
            if self.update == 0 and not history:
                row = {"step": 0}
                if self.spec.score_norm == "sft_rollouts":
                    n = min(self.spec.score_norm_prompts, len(rows))
                    order = PromptSchedule(len(rows), n, self.seed).indices(0)
                    row.update(self.calibrate_scores([rows[i] for i in order]))
                self._evaluate_into(row, eval_rows, ev, callbacks)  # the SFT policy's held-out reward
                self._end_update(row, history, callbacks, checkpoints)
            while self.update < self.spec.updates:
                u = self.update
                self.set_lr(self.lr_at(u))
                batch = [rows[i] for i in schedule.indices(u)]
                row = {"step": u + 1, "episodes": (u + 1) * self.spec.batch_size,
                       **self.step([r["prompt"] for r in batch], fields_of(batch))}
                if ev.due(u + 1, self.spec.updates):
                    self._evaluate_into(row, eval_rows, ev, callbacks)
                control = self._end_update(row, history, callbacks, checkpoints)
                if checkpoints and (control.save or (u + 1) % checkpoints.every == 0):
                    self.save_checkpoint(checkpoints, history, callbacks)
                if control.stop:
                    break
        finally:
            for cb in callbacks:
                cb.on_train_end(self)
        return TrainResult(history, start, time.perf_counter() - t0, time.process_time() - c0)

    def _evaluate_into(self, row: dict, rows: list[dict], ev: EvalSpec, callbacks) -> None:
        if not rows:
            return
        metrics, texts = self.evaluate([r["prompt"] for r in rows], fields_of(rows), batch_size=ev.batch_size,
                                       greedy=ev.greedy, max_new_tokens=ev.max_new_tokens)
        row.update(metrics)
        for cb in callbacks:
            cb.on_evaluate(self, row, rows, texts)
        row["eval/sample"] = texts[0][:200]

    def _end_update(self, row: dict, history: list, callbacks, checkpoints) -> "Control":
        """The callbacks' verdict on a finished row, then the row into the history. A guardrail's HealthStop
        keeps the row and a checkpoint (the run can go on from there with other limits) before it propagates; a
        divergence keeps the row and only the checkpoints from before it."""
        control = Control()
        try:
            for cb in callbacks:
                cb.on_update_end(self, row, control)
        except HealthStop as stop:
            self._record(row, history, callbacks)
            if checkpoints and not isinstance(stop, Diverged):  # NaN weights would poison every resume
                self.save_checkpoint(checkpoints, history, callbacks)
            raise
        self._record(row, history, callbacks)
        return control

    def _record(self, row: dict, history: list, callbacks) -> None:
        history.append(row)
        for cb in callbacks:
            cb.on_log(self, row)

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, prompts: list[list[dict]], fields: dict | None = None, *, batch_size: int = 16,
                 greedy: bool = True, max_new_tokens: int | None = None, seed: int = 0) -> tuple[dict, list[str]]:
        """Mean reward (before the EOS penalty) of responses to held-out prompts, greedy by default (no sampling
        noise in the curve); the missing-EOS rate and length too. Returns (metrics, completions)."""
        import torch

        scores, eos, lengths, texts = [], [], [], []
        for c in self._chunks(len(prompts), batch_size):
            sub = {k: v[c] for k, v in (fields or {}).items() if v is not None}
            ro = self.score(self.rollout(prompts[c], greedy=greedy, max_new_tokens=max_new_tokens, seed=seed,
                                         batch_size=batch_size), sub)
            scores.append(ro.raw_scores)
            eos.append(ro.has_eos.cpu())
            lengths.append(ro.response_mask.sum(-1).float().cpu())
            texts += ro.completions
        scores, eos, lengths = torch.cat(scores), torch.cat(eos), torch.cat(lengths)
        return {"eval/reward": float(scores.mean()), "eval/missing_eos_rate": float((~eos).float().mean()),
                "eval/response_length": float(lengths.mean())}, texts

    # -- checkpoints (alignment/ppo_state.py: safetensors + JSON, nothing that unpickles) ---------------------------
    def save_checkpoint(self, where: Checkpoints, history: list[dict], callbacks=()) -> Path:
        from peft import get_peft_model_state_dict

        if self.full:
            tensors = {f"model/{k}": v for k, v in ppo_state.unique_state(self.model).items()}
        else:  # save_embedding_layers=False: a LoRA on a tied lm_head would otherwise copy the embeddings
            tensors = {f"adapter/{name}/{k}": v for name in self.adapters for k, v in
                       get_peft_model_state_dict(self.model, adapter_name=name, save_embedding_layers=False).items()}
        tensors.update({f"value_head/{k}": v for k, v in self.value_head.state_dict().items()})
        opt_tensors, opt_state = ppo_state.optimizer_split(self.optimizer)
        states = {cb.name: cb.state_dict() for cb in callbacks if cb.state_dict()}
        folder = where.folder / f"checkpoint-{self.update}"
        ppo_state.save(folder, {**tensors, **opt_tensors}, {
            "update": self.update, "adapters": list(self.adapters), "full": self.full,
            "kl_ctl": self.kl_ctl.state_dict(), "optimizer": opt_state, "rng": ppo_state.rng_state(),
            "score_norm": [self.score_shift, self.score_scale], "length_slope": self.length_slope,
            "history": history, "callbacks": states})
        ppo_state.rotate(where.folder, where.keep)
        return folder

    def load_checkpoint(self, folder: Path, callbacks=()) -> list[dict]:
        """Restore a checkpoint written by `save_checkpoint`; returns its log history."""
        tensors, state = ppo_state.load(Path(folder))
        if state.get("adapters") != list(self.adapters) or state.get("full") != self.full:
            raise ArtifactError(f"{folder}: saved with adapters {state.get('adapters')}, this trainer has "
                                f"{list(self.adapters)} (another ppo.value_model?); delete it to start over")
        try:
            self._load_weights(tensors)
            self.value_head.load_state_dict(ppo_state.take(tensors, "value_head"))
            ppo_state.optimizer_restore(self.optimizer, tensors, state["optimizer"])
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.score_shift, self.score_scale = (float(x) for x in state["score_norm"])
            self.length_slope = float(state.get("length_slope", 0.0))  # checkpoints from before length_debias
            ppo_state.rng_restore(state["rng"])
            for cb in callbacks:
                if cb.name in state["callbacks"]:
                    cb.load_state_dict(state["callbacks"][cb.name])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ArtifactError(f"{folder}: the checkpoint does not fit this trainer ({str(e)[:200]}); "
                                "delete it to start over") from None
        self.update = int(state["update"])
        self._use(POLICY)
        return list(state["history"])

    def _load_weights(self, tensors: dict) -> None:
        from peft import set_peft_model_state_dict

        if self.full:
            self.model.load_state_dict(ppo_state.take(tensors, "model"), strict=False)
            return
        for name in self.adapters:
            res = set_peft_model_state_dict(self.model, ppo_state.take(tensors, f"adapter/{name}"), adapter_name=name)
            unexpected = getattr(res, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"adapter '{name}' has keys this model lacks: {unexpected[:3]}")

    def save_policy(self, folder) -> None:
        """The policy adapter only (peft layout, at the folder's root); full weights when training the full model."""
        if self.full:
            self.model.save_pretrained(str(folder), safe_serialization=True)
            return
        self.model.save_pretrained(str(folder), selected_adapters=[POLICY], safe_serialization=True,
                                   save_embedding_layers=False)


def _softcap(base) -> float | None:
    """The causal LM's final logit softcapping (Gemma 2's), None for most models."""
    return getattr(base.config.get_text_config(), "final_logit_softcapping", None)


class _Clock:
    """Wall seconds per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


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
