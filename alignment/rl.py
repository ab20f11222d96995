"""The mathematics of RLHF with PPO, as pure functions of tensors (no models, no configs).

Notation, per rollout row and response token t (T tokens, `mask` 1 on the real response, 0 on padding):

- log pi(a_t | s_t) = `logprobs`, the policy; log pi_ref = `ref_logprobs`, the reference (the SFT model);
- per-token KL estimators (Schulman, 2020, "Approximating KL divergence"), with log r = log pi_ref - log pi
  on tokens sampled from pi:  k1 = -log r  (unbiased, can be negative),  k3 = (r - 1) - log r  (unbiased, >= 0);
- reward shaping (Ziegler et al., 2019; Stiennon et al., 2020; Ouyang et al., 2022):
  r_t = -kl_coef * kl_t, plus the reward model's score on the last real token (the EOS);
- GAE (Schulman et al., 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l},
  returns R_t = A_t + V_t; nothing flows in from beyond the last real token;
- PPO-clip (Schulman et al., 2017): L = E[max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))], ratio = pi / pi_old;
- the clipped value loss of the OpenAI baselines: 0.5 E[max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)];
- the adaptive KL controller (Ziegler et al., 2019): kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) n / horizon.

Masked statistics follow the "N implementation details of RLHF with PPO" write-up (Huang et al., 2024):
means and variances over the real response tokens only; advantages are whitened, rewards are not shifted.
Every function is tested against numbers worked by hand in tests/test_rl_math.py.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# -- masked statistics ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions; `unbiased` applies Bessel's correction n / (n - 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return var  # one value: no spread to correct
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; shift_mean=False keeps the mean (only rescales).

    Positions outside the mask come out as 0, so padding never carries a value into a loss.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * (var + eps).rsqrt()
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


# -- log-probabilities and entropy ---------------------------------------------------------------------------------


def logprobs_of_taken_tokens(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] at each position: (batch, T, vocab), (batch, T) -> (batch, T).

    `logits[:, t]` must already be the logits that predicted `tokens[:, t]` (the caller does the causal shift).
    The temperature is the one the responses were sampled with, so these are the probabilities of the
    distribution that produced them (the "N details" write-up, detail 6).
    """
    import torch

    logits = logits.float() / temperature
    taken = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    # logsumexp instead of a full log_softmax: one (batch, T) result instead of a second (batch, T, vocab) tensor.
    return taken - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position, in nats: (..., vocab) -> (...)."""
    import torch

    logits = logits.float() / temperature
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def head_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                              temperature: float = 1.0, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(`logprobs_of_taken_tokens`, `entropy_from_logits`) of the logits `hidden @ weight.T` (a bias-free LM head),
    `chunk` positions at a time: (batch, T, d), (vocab, d), (batch, T) -> (batch, T), (batch, T).

    Same numbers as the head followed by the two functions above, without ever holding the (batch, T, vocab)
    logits, their float copies, the softmax and its product with the logits, which autograd would keep for the
    backward: for 8 x 128 positions through SmolLM2's 49k-token head, a forward + backward peaks 1.6 GB above its
    start that way and 0.18 GB this way, for 1.76x less CPU (bench/head_logprobs.py). The backward recomputes each
    chunk's logits from `hidden` (one more head matmul) and keeps only the (batch, T) log-normalisers and entropies. The head runs in the autocast dtype when
    autocast is on, as the model's own forward would. With u = logits / temperature, p = softmax(u), E = sum p u:
    d logprob / du = onehot(token) - p,  d entropy / du = -p (u - E),  d / dlogits = d / du / temperature.
    """
    return _head_logprob_entropy().apply(hidden, weight, tokens, float(temperature), int(chunk))


@functools.cache
def _head_logprob_entropy():  # built at first use: this module imports without torch
    import torch

    def compute_dtype(x):
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    class HeadLogprobEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, tokens, temperature, chunk):
            dt = compute_dtype(hidden)
            h, w, y = hidden.reshape(-1, hidden.shape[-1]), weight.to(dt), tokens.reshape(-1)
            lp, ent, lse = (h.new_empty(y.shape, dtype=torch.float32) for _ in range(3))
            for c in (slice(i, i + chunk) for i in range(0, y.shape[0], chunk)):
                u = torch.nn.functional.linear(h[c].to(dt), w).float() / temperature
                lse[c] = torch.logsumexp(u, dim=-1)
                lp[c] = u.gather(-1, y[c, None]).squeeze(-1) - lse[c]
                ent[c] = lse[c] - (torch.exp(u - lse[c, None]) * u).sum(-1)
            ctx.save_for_backward(hidden, weight, tokens, lse, ent)
            ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dt
            return lp.view(tokens.shape), ent.view(tokens.shape)

        @staticmethod
        def backward(ctx, g_lp, g_ent):
            hidden, weight, tokens, lse, ent = ctx.saved_tensors
            T, dt = ctx.temperature, ctx.dtype
            h, w, y = hidden.reshape(-1, hidden.shape[-1]), weight.to(dt), tokens.reshape(-1)
            g_lp = g_lp.reshape(-1).float() if g_lp is not None else torch.zeros_like(lse)
            g_ent = g_ent.reshape(-1).float() if g_ent is not None else torch.zeros_like(lse)
            g_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            g_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for c in (slice(i, i + ctx.chunk) for i in range(0, y.shape[0], ctx.chunk)):
                hc = h[c].to(dt)
                u = torch.nn.functional.linear(hc, w).float() / T
                p = torch.exp(u - lse[c, None])
                e = (lse[c] - ent[c])[:, None]  # E = sum p u
                g = -p * (g_lp[c, None] + g_ent[c, None] * (u - e))
                g = (g.scatter_add_(-1, y[c, None], g_lp[c, None]) / T).to(dt)
                if g_h is not None:
                    g_h[c] = g @ w
                if g_w is not None:
                    g_w += (g.t() @ hc).float()
            g_h = g_h.view(hidden.shape) if g_h is not None else None
            return g_h, g_w.to(weight.dtype) if g_w is not None else None, None, None, None

    return HeadLogprobEntropy


# -- KL estimators and reward shaping ------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref per sampled token: unbiased for KL(pi || pi_ref), negative on some tokens."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, never negative, lower variance when pi ~ pi_ref."""
    import torch

    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded response mask (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every real token, plus each row's score on its last real token.

    scores (batch,), kl and mask (batch, T) -> (batch, T), zero on padding. The last real token is the EOS
    when the response has one (the position whose hidden state the reward model read), else the token at
    the length limit.
    """
    import torch

    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(scores.shape[0], device=scores.device)
    has_token = mask.sum(-1) > 0
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype) * has_token.to(rewards.dtype)
    return rewards


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None,
                              replace: bool = False) -> torch.Tensor:
    """Subtract `penalty` from the score of each response that hit the length limit without an EOS, or with
    `replace` set that score to -penalty (the N+ details: a cut response is never worth more than that)."""
    import torch

    if penalty is None or (not penalty and not replace):
        return scores
    cut = ~has_eos.bool()
    if replace:
        return torch.where(cut, torch.full_like(scores, -penalty), scores)
    return scores - penalty * cut.to(scores.dtype)


def chosen_responses(scores: torch.Tensor, has_eos: torch.Tensor, min_score: float | None) -> torch.Tensor:
    """[B] bool: the responses PPO's `chosen_nll` imitates, those that ended by themselves and scored at least
    `min_score` in the reward's own units (all False when min_score is None)."""
    import torch

    if min_score is None:
        return torch.zeros(scores.shape[0], dtype=torch.bool)
    return has_eos.bool().cpu() & (scores.float().cpu() >= min_score)


def add_chosen_bonus(advantages: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor,
                     weight: float) -> torch.Tensor:
    """`weight` added to the advantage of every response token of each chosen row: at ratio 1 the clipped policy
    loss -A x ratio then carries `weight` x the NLL gradient of those tokens (an SFT term on them)."""
    return advantages + weight * chosen.to(advantages.device, advantages.dtype)[:, None] * mask.to(advantages.dtype)


def length_slope(scores: torch.Tensor, lengths: torch.Tensor) -> float:
    """Least-squares slope b of score = a + b * length: how much reward one more token earns on these responses
    (0 when every response has the same length). `length_debias` subtracts b * length from later scores."""
    x, y = lengths.double(), scores.double()
    var = ((x - x.mean()) ** 2).mean()
    return 0.0 if var == 0 else float(((x - x.mean()) * (y - y.mean())).mean() / var)


def normalise_scores(scores: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """(score - mean) / std with the reward model's statistics over its training responses (fixed, not per batch,
    so the same response gets the same reward throughout the run)."""
    return (scores - mean) / max(std, eps)


# -- generalised advantage estimation ------------------------------------------------------------------------------


def gae_loop(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
             lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by the backward recursion A_t = delta_t + gamma lam A_{t+1}; the reference version.

    Values and rewards past the last real token are treated as 0: the episode ends at the EOS.
    """
    import torch

    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    T = rewards.shape[-1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1) * m
    return advantages, (advantages + values) * m


def gae_vectorised(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `gae_loop` as one matrix product: A = delta @ W with W[j, t] = (gamma lam)^(j - t) for j >= t.

    O(T^2) memory for the (T, T) weights, which is nothing at RLHF response lengths, and no Python loop.
    """
    import torch

    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    T = rewards.shape[-1]
    idx = torch.arange(T, device=rewards.device)
    power = (idx[:, None] - idx[None, :]).to(values.dtype)  # [j, t] = j - t
    weights = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = (deltas @ weights) * m
    return advantages, (advantages + values) * m


# -- losses --------------------------------------------------------------------------------------------------------


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict]:
    """PPO-clip surrogate: masked mean of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)); and its statistics.

    stats: clipfrac (share of tokens where the clipped term is the larger), approxkl (k3 estimate of
    KL(pi_old || pi) on the minibatch, Schulman's recommendation), ratio (mean ratio).
    """
    import torch

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """0.5 * masked mean of max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2); and clipfrac."""
    import torch

    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((losses_clipped > losses).float(), mask)}
    return loss, stats


# -- KL coefficient controllers ------------------------------------------------------------------------------------


class FixedKLController:
    """A constant kl_coef."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. (2019), section 2.2: steer the observed KL towards `target`.

    After a batch of `n_steps` episodes with observed KL (nats per response), the error e = clip(KL / target - 1,
    -0.2, 0.2) scales the coefficient by (1 + e * n_steps / horizon): too much KL raises the penalty, too little
    lowers it, at most 20% per `horizon` episodes.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


# -- responses: where they end -------------------------------------------------------------------------------------


def response_mask_after_eos(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos) of generated responses: 1 up to and including the first EOS, 0 after it.

    `generate` keeps sampling rows that finished until the longest is done (filling them with pad); those
    tokens are not part of the response. A row without EOS hit the length limit: all of it counts.
    """
    import torch

    is_eos = response_ids == eos_token_id
    before_or_at_first = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) == 0
    return before_or_at_first.long(), is_eos.any(dim=1)
