"""DPO helpers against hand-worked numbers, the loss/option table at config load, and soft labels."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.config import load_config
from alignment.dpo import (LOSSES, PairLogps, data_record, implicit_preference, loss_problems, masked_token_logps,
                           reward_metrics, soft_label_term, soft_sigmoid_loss, token_kl, tokenize_pair)
from alignment.errors import ConfigError
from alignment.manifest import sha256_file
from stages.dpo import Config

TINY = "configs/tiny/dpo.yaml"


def logps(chosen, rejected, chosen_len=None, rejected_len=None) -> PairLogps:
    t = lambda v: torch.tensor(v, dtype=torch.float)  # noqa: E731
    return PairLogps(t(chosen), t(rejected), t(chosen_len or [1.0] * len(chosen)),
                     t(rejected_len or [1.0] * len(rejected)))


# -- sequence log-probs ------------------------------------------------------------------------------


def test_masked_token_logps_scores_only_response_tokens_with_the_causal_shift():
    # Vocabulary of 2; logits at every position favour token 1 by ln 3, so p(1) = 3/4, p(0) = 1/4.
    logits = torch.tensor([[[0.0, math.log(3)]] * 4])
    ids = torch.tensor([[0, 1, 0, 1]])
    response = torch.tensor([[0, 0, 1, 1]])  # the last two tokens are the response
    got = masked_token_logps(logits, ids, response)
    # Position t scores token t + 1: token 2 (= 0, p 1/4) and token 3 (= 1, p 3/4); token 1 is prompt.
    assert got.shape == (1, 3)
    assert got[0].tolist() == pytest.approx([0.0, math.log(0.25), math.log(0.75)])


def test_tokenize_pair_splits_where_prompt_and_response_diverge():
    class ChatML:
        def apply_chat_template(self, messages, tokenize, return_dict, add_generation_prompt=False):
            ids = []
            for m in messages:
                ids += [1, {"user": 2, "assistant": 3}[m["role"]]] + [ord(c) for c in m["content"]] + [9]
            return {"input_ids": ids + ([1, 3] if add_generation_prompt else [])}

    pair = {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "bc"}],
            "rejected": [{"role": "assistant", "content": "d"}]}
    prompt, chosen, rejected = tokenize_pair(ChatML(), pair)
    assert prompt == [1, 2, 97, 9, 1, 3]  # the assistant header belongs to the prompt
    assert chosen == [98, 99, 9] and rejected == [100, 9]


# -- metrics -------------------------------------------------------------------------------------------


def test_implicit_preference_sum_and_length_normalised():
    # Pair 1: chosen -4 over 4 tokens (-1/token), rejected -3 over 1 token (-3/token):
    #   summed margin -1 (prefers rejected), per-token margin +2 (prefers chosen).
    # Pair 2: chosen -2 / 2 tokens, rejected -6 / 2 tokens: both prefer chosen (+4, +2).
    got = implicit_preference(logps([-4.0, -2.0], [-3.0, -6.0], [4.0, 2.0], [1.0, 2.0]))
    assert got["prefers_chosen_sum"] == 0.5
    assert got["prefers_chosen_per_token"] == 1.0
    assert got["logp_margin_sum"] == pytest.approx(1.5)
    assert got["logp_margin_per_token"] == pytest.approx(2.0)


def test_reward_metrics_are_beta_scaled_log_ratios():
    policy = logps([-1.0, -5.0], [-4.0, -2.0])
    ref = logps([-2.0, -4.0], [-3.0, -3.0])
    got = reward_metrics(policy, ref, beta=0.5)
    # chosen rewards 0.5 * [1, -1]; rejected 0.5 * [-1, 1]; margins [1, -1].
    assert got["rewards/chosen"] == pytest.approx(0.0)
    assert got["rewards/margins"] == pytest.approx(0.0)
    assert got["rewards/accuracies"] == 0.5
    assert reward_metrics(ref, ref, beta=0.5)["rewards/margins"] == 0.0


def test_token_kl_matches_hand_computed_value_and_respects_mask():
    p = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # [1/2, 1/2]
    q = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])  # [1/4, 3/4]
    kl = token_kl(p, q, torch.tensor([[1, 0]]))
    # 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert kl[0, 0].item() == pytest.approx(0.5 * math.log(4 / 3))
    assert kl[0, 1].item() == 0.0
    assert token_kl(p, p, torch.ones(1, 2)).abs().max().item() == 0.0


# -- soft labels -----------------------------------------------------------------------------------


def test_soft_sigmoid_loss_hand_values_and_identity_with_trl_sigmoid_plus_term():
    delta = torch.tensor([2.0, -1.0, 0.0])
    p = torch.tensor([1.0, 0.25, 0.5])
    beta = 0.5
    loss = soft_sigmoid_loss(delta, p, beta)
    # p = 1 is plain DPO: -log sigmoid(1); delta = 0 gives ln 2 for any p.
    assert loss[0].item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert loss[2].item() == pytest.approx(math.log(2))
    # p = 1/4, beta * delta = -1/2: -(1/4) log s(-1/2) - (3/4) log s(1/2)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss[1].item() == pytest.approx(-0.25 * math.log(s(-0.5)) - 0.75 * math.log(s(0.5)))
    hard = -torch.nn.functional.logsigmoid(beta * delta)
    assert torch.allclose(hard + soft_label_term(delta, p, beta), loss)


# -- the loss/option table, enforced at config load -------------------------------------------------


def problems_for(**kw) -> list[tuple[str, str]]:
    args = dict(loss_types=["sigmoid"], loss_weights=None, label_smoothing=0.0, soft_labels=False, beta=0.1)
    return loss_problems(**{**args, **kw})


@pytest.mark.parametrize("kw", [
    {},
    {"loss_types": ["robust"], "label_smoothing": 0.1},
    {"loss_types": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_types": ["ipo"]},
    {"loss_types": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2]},
    {"soft_labels": True},
    {"loss_types": ["aot"], "label_smoothing": 0.2},
])
def test_supported_combinations_pass(kw):
    assert problems_for(**kw) == []


@pytest.mark.parametrize("kw, key, words", [
    ({"label_smoothing": 0.1}, "dpo.label_smoothing", ["sigmoid", "ignores", "robust", "soft_labels"]),
    ({"loss_types": ["ipo"], "soft_labels": True}, "data.soft_labels", ["ipo", "sigmoid"]),
    ({"loss_types": ["robust"], "label_smoothing": 0.5}, "dpo.label_smoothing", ["robust", "[0.0, 0.5)"]),
    ({"loss_types": ["exo_pair"]}, "dpo.label_smoothing", ["exo_pair", "> 0"]),
    ({"soft_labels": True, "label_smoothing": 0.1, "loss_types": ["robust", "sigmoid"]}, "data.soft_labels",
     ["label_smoothing"]),
    ({"loss_types": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "dpo.loss_weights", ["2 losses"]),
    ({"loss_types": ["simpo"]}, "dpo.loss_type", ["unknown", "sigmoid"]),
    ({"loss_types": ["sft"]}, "dpo.loss_type", ["sft stage"]),
    ({"beta": 0.0}, "dpo.beta", ["> 0"]),
])
def test_unsupported_combinations_name_the_settings_and_the_fix(kw, key, words):
    found = " | ".join(msg for k, msg in problems_for(**kw) if k == key)
    assert found, problems_for(**kw)
    for w in words:
        assert w in found


def test_every_trl_loss_is_in_the_table():
    import inspect

    from trl.trainer import dpo_trainer  # the table mirrors TRL's loss list: a new or renamed loss fails here

    src = inspect.getsource(dpo_trainer.DPOTrainer._compute_loss)
    in_trl = {line.split('"')[1] for line in src.splitlines() if 'loss_type == "' in line}
    assert in_trl == set(LOSSES)


def test_config_load_fails_naming_file_key_and_fix():
    with pytest.raises(ConfigError) as e:
        load_config(Config, TINY, ["dpo.label_smoothing=0.1"])
    msg = str(e.value)
    assert msg.startswith(f"{TINY} (command line): dpo.label_smoothing: loss_type ['sigmoid'] ignores")
    with pytest.raises(ConfigError) as e:
        load_config(Config, TINY, ["dpo.loss_type=ipo", "data.soft_labels=true"])
    assert "data.soft_labels: per-pair soft labels (p_chosen) apply to loss_type 'sigmoid' only" in str(e.value)
    ok = load_config(Config, TINY, ["dpo.loss_type=[robust]", "dpo.label_smoothing=0.2"])
    assert ok.loss_types == ["robust"]


# -- provenance -----------------------------------------------------------------------------------------


def test_data_record_pins_file_by_sha256(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    rec = data_record(str(f), None, 1)
    assert rec["sha256"] == sha256_file(f) and rec["path"] == str(f.resolve()) and rec["rows"] == 1
    hub = data_record("someone/prefs", "train", 10)
    assert hub["sha256"] is None and hub["split"] == "train"
