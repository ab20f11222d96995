"""alignment.rl: every function against numbers worked by hand (the working is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from alignment import rl


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=0)


def test_masked_mean_var_whiten():
    x, m = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 1, 0, 1])
    # (1 + 2 + 4) / 3
    assert close(rl.masked_mean(x, m), 7 / 3)
    # deviations -4/3, -1/3, 5/3 -> squares sum 42/9; biased /3 = 14/9; unbiased *3/2 = 7/3
    assert close(rl.masked_var(x, m, unbiased=False), 14 / 9)
    assert close(rl.masked_var(x, m), 7 / 3)
    w = rl.masked_whiten(x, m)
    s = math.sqrt(7 / 3)
    assert close(w, [(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0.0, (4 - 7 / 3) / s])
    # shift_mean=False rescales only: the mean 7/3 is added back
    assert close(rl.masked_whiten(x, m, shift_mean=False)[0], (1 - 7 / 3) / s + 7 / 3)
    # along a dim: row means
    xx, mm = torch.tensor([[1.0, 3.0], [2.0, 10.0]]), torch.tensor([[1, 1], [1, 0]])
    assert close(rl.masked_mean(xx, mm, dim=1), [2.0, 2.0])


def test_logprobs_of_taken_tokens_and_entropy():
    # logits [0, ln 3] -> probabilities 1/4, 3/4
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    assert close(rl.logprobs_of_taken_tokens(logits, tokens), [[math.log(0.75), math.log(0.25)]])
    # temperature 2: logits [0, ln3 / 2] -> p(1) = sqrt3 / (1 + sqrt3)
    s3 = math.sqrt(3.0)
    assert close(rl.logprobs_of_taken_tokens(logits, tokens, temperature=2.0)[0, 0], math.log(s3 / (1 + s3)))
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335
    assert close(rl.entropy_from_logits(logits), [[0.562335, 0.562335]])
    # uniform over 4 tokens: ln 4
    assert close(rl.entropy_from_logits(torch.zeros(4)), math.log(4.0))


def test_head_logprobs_and_entropy_is_the_head_then_the_two_functions_without_the_full_logits():
    # hand-worked: a 1-d hidden state h = 1 and a head with rows [0], [ln 3] give the logits [0, ln 3] above
    h, w = torch.ones(1, 2, 1), torch.tensor([[0.0], [math.log(3.0)]])
    lp, ent = rl.head_logprobs_and_entropy(h, w, torch.tensor([[1, 0]]))
    assert close(lp, [[math.log(0.75), math.log(0.25)]]) and close(ent, [[0.562335, 0.562335]])
    # gradient w.r.t. h of log p(1) = ln 3 - logsumexp(0, h ln 3): ln 3 (1 - 3/4) at h = 1
    h1 = torch.ones(1, 1, 1, requires_grad=True)
    rl.head_logprobs_and_entropy(h1, w, torch.tensor([[1]]))[0].sum().backward()
    assert close(h1.grad.flatten(), [math.log(3.0) / 4])
    # against the full logits: values and both gradients, a temperature, chunks that do not divide the positions
    torch.manual_seed(0)
    h0, w0, y = torch.randn(3, 5, 8), torch.randn(50, 8), torch.randint(0, 50, (3, 5))
    ga, gb = torch.randn(3, 5), torch.randn(3, 5)
    out = {}
    for fused in (False, True):
        hh, ww = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        if fused:
            lp, ent = rl.head_logprobs_and_entropy(hh, ww, y, temperature=0.7, chunk=4)
        else:
            logits = hh @ ww.T
            lp, ent = rl.logprobs_of_taken_tokens(logits, y, 0.7), rl.entropy_from_logits(logits, 0.7)
        (lp * ga + ent * gb).sum().backward()
        out[fused] = (lp, ent, hh.grad, ww.grad)
    for a, b in zip(out[False], out[True]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # k1 = ln 0.5 - ln 0.25 = ln 2
    assert close(rl.kl_k1(logp, ref), [math.log(2.0)])
    # r = 0.25 / 0.5 = 0.5: k3 = (0.5 - 1) - ln 0.5 = 0.193147
    assert close(rl.kl_k3(logp, ref), [0.193147])
    # k1 is negative where the reference likes the token more; k3 never is
    assert rl.kl_k1(ref, logp).item() < 0 < rl.kl_k3(ref, logp).item()
    # identical policies: both 0
    assert rl.kl_k1(logp, logp).item() == 0 == rl.kl_k3(logp, logp).item()


def test_shape_rewards_puts_score_on_last_real_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # -0.5 * kl on real tokens, + score at the last real token; padding (kl 7.0) contributes nothing
    assert close(rl.shape_rewards(scores, kl, mask, kl_coef=0.5), [[-0.05, -0.1, -0.15 + 1.0], [-0.25 + 2.0, 0, 0]])
    assert rl.last_token_index(mask).tolist() == [2, 0]


def test_missing_eos_penalty_and_normalisation():
    scores, has_eos = torch.tensor([1.0, 1.0]), torch.tensor([True, False])
    assert close(rl.apply_missing_eos_penalty(scores, has_eos, 1.0), [1.0, 0.0])
    assert close(rl.apply_missing_eos_penalty(scores, has_eos, None), [1.0, 1.0])
    # replace: the cut response scores -penalty however high the RM rated it; the finished one keeps its score
    high = torch.tensor([0.5, 3.0])
    assert close(rl.apply_missing_eos_penalty(high, has_eos, 1.0, replace=True), [0.5, -1.0])
    assert close(rl.apply_missing_eos_penalty(high, has_eos, 0.0, replace=True), [0.5, 0.0])
    # (1 - 0.5) / 2
    assert close(rl.normalise_scores(torch.tensor([1.0]), mean=0.5, std=2.0), [0.25])


def test_chosen_responses_and_their_bonus():
    # finished and >= 1.0: row 0 only (row 1 is cut, row 2 finished below the bar, row 3 cut and below)
    scores, has_eos = torch.tensor([1.0, 1.0, 0.75, 0.5]), torch.tensor([True, False, True, False])
    assert rl.chosen_responses(scores, has_eos, 1.0).tolist() == [True, False, False, False]
    assert rl.chosen_responses(scores, has_eos, 0.7).tolist() == [True, False, True, False]
    assert rl.chosen_responses(scores, has_eos, None).tolist() == [False] * 4
    # +0.5 on every real token of the chosen row, nothing on its padding or on the other row
    adv, mask = torch.tensor([[0.2, -0.4, 9.0], [1.0, 0.5, 0.0]]), torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = rl.add_chosen_bonus(adv, torch.tensor([True, False]), mask, 0.5)
    assert close(out, [[0.7, 0.1, 9.0], [1.0, 0.5, 0.0]])


def test_response_mask_after_eos():
    eos = 2
    ids = torch.tensor([[5, 2, 9, 9], [5, 6, 7, 8], [2, 2, 9, 9]])
    mask, has_eos = rl.response_mask_after_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_gae_by_hand():
    # gamma 0.9, lam 0.5 (gamma*lam = 0.45)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: delta2 = 1 - 0.7 = 0.3; delta1 = 0.9*0.7 - 0.6 = 0.03; delta0 = 0.9*0.6 - 0.5 = 0.04
    #        A2 = 0.3; A1 = 0.03 + 0.45*0.3 = 0.165; A0 = 0.04 + 0.45*0.165 = 0.11425
    # row 1 (episode ends at t=1; the padding's reward 5 and value 9 are ignored):
    #        delta1 = 1 - 0.6 = 0.4; delta0 = 0.04; A1 = 0.4; A0 = 0.04 + 0.45*0.4 = 0.22
    want_adv = [[0.11425, 0.165, 0.3], [0.22, 0.4, 0.0]]
    want_ret = [[0.61425, 0.765, 1.0], [0.72, 1.0, 0.0]]
    for gae in (rl.gae_loop, rl.gae_vectorised):
        adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
        assert close(adv, want_adv) and close(ret, want_ret), gae.__name__


def test_gae_loop_and_vectorised_agree():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    lengths = torch.tensor([40, 1, 17, 39, 5, 0])
    mask = (torch.arange(40)[None, :] < lengths[:, None]).long()
    for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)):
        a1, r1 = rl.gae_loop(rewards, values, mask, gamma, lam)
        a2, r2 = rl.gae_vectorised(rewards, values, mask, gamma, lam)
        assert torch.allclose(a1, a2, atol=1e-4) and torch.allclose(r1, r2, atol=1e-4), (gamma, lam)
    # lam = 0: one-step TD errors; lam = 1, gamma = 1: returns are the reward-to-go
    a, r = rl.gae_loop(rewards, values, mask, 1.0, 1.0)
    reward_to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
    assert torch.allclose(r, reward_to_go, atol=1e-4)


def test_policy_loss_by_hand():
    logprobs = torch.log(torch.tensor([[0.6, 0.3, 0.5, 0.9]]))
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # ratio 1.2, 0.6, 1.0 (the masked token's ratio 9 is ignored); eps 0.1
    # t0: A=1:  max(-1.2, -1.1) = -1.1 (clipped)
    # t1: A=-1: max(0.6, 0.9) = 0.9     (clipped)
    # t2: A=2:  max(-2, -2) = -2        (not clipped)
    loss, stats = rl.policy_loss(logprobs, old, adv, mask, cliprange=0.1)
    assert close(loss, (-1.1 + 0.9 - 2.0) / 3)
    assert close(stats["clipfrac"], 2 / 3)
    assert close(stats["ratio"], (1.2 + 0.6 + 1.0) / 3)
    # approxkl (k3 of the log ratio): (0.2 - ln 1.2) + (-0.4 - ln 0.6) + 0, over 3
    assert close(stats["approxkl"], ((0.2 - math.log(1.2)) + (-0.4 - math.log(0.6))) / 3)
    # the gradient pushes up the log-prob of a positive-advantage token that is not clipped
    lp = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    loss, _ = rl.policy_loss(lp, lp.detach(), torch.tensor([[1.0]]), torch.tensor([[1]]), 0.2)
    loss.backward()
    assert lp.grad.item() == pytest.approx(-1.0)


def test_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([[0.5, 0.5, 5.0]])
    returns, mask = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0]])
    # eps_v 0.2: t0: clipped V = 0.7: max((1-2)^2, (0.7-2)^2) = 1.69
    #            t1: clipped V = 0.3: max(0, 0.09) = 0.09           -> 0.5 * (1.69 + 0.09) / 2 = 0.445
    loss, stats = rl.value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert close(loss, 0.445) and close(stats["vf_clipfrac"], 1.0)
    # inside the clip range it is plain 0.5 MSE: 0.5 * ((0.6-1)^2) = 0.08
    loss, stats = rl.value_loss(torch.tensor([[0.6]]), torch.tensor([[0.5]]), torch.tensor([[1.0]]),
                                torch.tensor([[1]]), 0.2)
    assert close(loss, 0.08) and close(stats["vf_clipfrac"], 0.0)


def test_kl_controllers():
    # Ziegler et al.: target 6, horizon 10000, a batch of 512 episodes
    c = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(12.0, 512) == pytest.approx(0.2 * (1 + 0.2 * 512 / 10000))  # error 1.0 clipped to 0.2
    c = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(3.0, 512) == pytest.approx(0.2 * (1 - 0.2 * 512 / 10000))  # error -0.5 clipped to -0.2
    c = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(6.6, 512) == pytest.approx(0.2 * (1 + 0.1 * 512 / 10000))  # error 0.1
    c2 = rl.AdaptiveKLController(1.0, 1.0, 1)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value
    f = rl.FixedKLController(0.05)
    assert f.update(100.0, 512) == 0.05
    with pytest.raises(ValueError):
        rl.AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_length_slope_is_the_least_squares_slope_of_score_on_length():
    # x = 10, 20, 30 (mean 20), y = 1, 1.5, 3.5 (mean 2): cov = (10*1 + 0 + 10*1.5) / 3 = 25/3,
    # var = (100 + 0 + 100) / 3 = 200/3, slope = 25/200 = 0.125
    assert rl.length_slope(torch.tensor([1.0, 1.5, 3.5]), torch.tensor([10, 20, 30])) == pytest.approx(0.125)
    # shorter is better: the sign follows
    assert rl.length_slope(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 2, 3])) == pytest.approx(-1.0)
    # one length for every response: no slope to fit, nothing subtracted
    assert rl.length_slope(torch.tensor([1.0, 5.0]), torch.tensor([7, 7])) == 0.0
