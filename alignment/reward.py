"""Reward models: the pairwise losses, scoring, and the quality gate that decides if an RM may drive RL.

Losses (pure functions of the two reward vectors, so they are tested with hand-worked numbers):

- Bradley-Terry (Bradley & Terry, 1952; Ouyang et al., 2022): ``-log σ(r_c - r_r - m)`` with an
  optional per-pair margin ``m`` (Touvron et al., 2023, Llama 2);
- soft labels (Lee et al., 2023, RLAIF): the cross-entropy against the labeller's probability ``p``
  that ``chosen`` is better, ``-[p log σ(r_c - r_r) + (1 - p) log σ(r_r - r_c)]``; with ``p = 1``
  it is Bradley-Terry without margin;
- reward centering (Eisenstein et al., 2023): ``coef · mean((r_c + r_r)²)``, TRL's
  ``center_rewards_coefficient``, keeps rewards near zero so PPO's KL/reward scale stays stable.

Quality-gate metrics on held-out pairs (plain Python lists in, floats out):

- accuracy: fraction of pairs with ``r_c > r_r`` (a tie counts as wrong);
- mean margin: mean of ``r_c - r_r``;
- ECE (Guo et al., 2017) of the pairwise probability ``σ(r_c - r_r)``: each pair predicts the
  response it scores higher with confidence ``max(σ(d), 1 - σ(d))`` in [0.5, 1]; confidences
  fall into ``n_bins`` equal-width bins over [0.5, 1] and ECE = Σ_b |B_b|/n · |acc(B_b) - conf(B_b)|;
- length correlation: Pearson's r between reward and response length in tokens, pooled over
  chosen and rejected responses. An RM that mostly rewards length (Singhal et al., 2023) makes
  PPO produce long answers instead of good ones.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


# -- losses --------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``-log σ(r_c - r_r - m)``; ``margin`` None means m = 0."""
    import torch.nn.functional as F

    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def soft_label_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p_chosen: torch.Tensor) -> torch.Tensor:
    """Mean of ``-[p log σ(d) + (1 - p) log σ(-d)]`` with ``d = r_c - r_r`` (RLAIF distillation)."""
    import torch.nn.functional as F

    diff = r_chosen - r_rejected
    p = p_chosen.to(diff.dtype)
    # logsigmoid on both sides rather than log(1 - σ(d)): stable for large |d|.
    return -(p * F.logsigmoid(diff) + (1 - p) * F.logsigmoid(-diff)).mean()


def centering_penalty(r_chosen: torch.Tensor, r_rejected: torch.Tensor, coef: float) -> torch.Tensor:
    """``coef · mean((r_c + r_r)²)``: pulls the mean reward of each pair towards zero."""
    return coef * ((r_chosen + r_rejected) ** 2).mean()


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, p_chosen: torch.Tensor | None = None,
                margin: torch.Tensor | None = None, center_coef: float | None = None) -> torch.Tensor:
    """The loss the reward stage trains on: soft labels when ``p_chosen`` is given, else Bradley-Terry.

    A margin only applies to hard labels: with soft labels the labeller's probability already
    says how strongly chosen is preferred.
    """
    if p_chosen is not None:
        loss = soft_label_loss(r_chosen, r_rejected, p_chosen)
    else:
        loss = bradley_terry_loss(r_chosen, r_rejected, margin)
    if center_coef:
        loss = loss + centering_penalty(r_chosen, r_rejected, center_coef)
    return loss


# -- gate metrics --------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def pairwise_accuracy(r_chosen: Sequence[float], r_rejected: Sequence[float]) -> float:
    return sum(c > r for c, r in zip(r_chosen, r_rejected, strict=True)) / len(r_chosen)


def mean_margin(r_chosen: Sequence[float], r_rejected: Sequence[float]) -> float:
    return sum(c - r for c, r in zip(r_chosen, r_rejected, strict=True)) / len(r_chosen)


def expected_calibration_error(r_chosen: Sequence[float], r_rejected: Sequence[float], n_bins: int = 10) -> float:
    """ECE of σ(r_c - r_r) as a binary classifier of "chosen is better" (see the module docstring)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for c, r in zip(r_chosen, r_rejected, strict=True):
        p = _sigmoid(c - r)
        confidence = max(p, 1.0 - p)
        # Confidence 1.0 goes into the last bin rather than one past it.
        index = min(int((confidence - 0.5) / 0.5 * n_bins), n_bins - 1)
        bins[index].append((confidence, c > r))
    n = len(r_chosen)
    ece = 0.0
    for b in bins:
        if b:
            conf = sum(x for x, _ in b) / len(b)
            acc = sum(ok for _, ok in b) / len(b)
            ece += len(b) / n * abs(acc - conf)
    return ece


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; 0.0 when either side is constant (no linear relation can be measured)."""
    n = len(x)
    if n != len(y) or n < 2:
        raise ValueError("pearson needs two sequences of the same length >= 2")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def gate_metrics(r_chosen: Sequence[float], r_rejected: Sequence[float], len_chosen: Sequence[int],
                 len_rejected: Sequence[int], n_bins: int = 10) -> dict:
    """accuracy, mean_margin, ece and length_corr of an RM on held-out pairs."""
    return {
        "accuracy": pairwise_accuracy(r_chosen, r_rejected),
        "mean_margin": mean_margin(r_chosen, r_rejected),
        "ece": expected_calibration_error(r_chosen, r_rejected, n_bins),
        "length_corr": pearson(list(r_chosen) + list(r_rejected), list(len_chosen) + list(len_rejected)),
    }


def metrics_by_group(groups: Sequence[str | None], r_chosen: Sequence[float], r_rejected: Sequence[float],
                     len_chosen: Sequence[int], len_rejected: Sequence[int]) -> dict[str, dict]:
    """Per group (a pair's `category`: its constraint kind) of held-out pairs: pairs, accuracy, mean margin and
    the length correlation; pairs without a group are left out. One group can pass the gate as a whole and still
    be one the RM has not learned, or one it scores by length (Singhal et al., 2023)."""
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            index.setdefault(g, []).append(i)
    out = {}
    for g, idx in sorted(index.items()):
        c, r = [r_chosen[i] for i in idx], [r_rejected[i] for i in idx]
        lens = [len_chosen[i] for i in idx] + [len_rejected[i] for i in idx]
        out[g] = {"pairs": len(idx), "accuracy": round(pairwise_accuracy(c, r), 4),
                  "mean_margin": round(mean_margin(c, r), 4), "length_corr": round(pearson(c + r, lens), 4)}
    return out


def gate_failures(metrics: dict, *, min_accuracy: float | None = None, max_length_corr: float | None = None,
                  max_ece: float | None = None) -> list[str]:
    """One message per threshold the metrics miss (empty when the RM passes).

    The length correlation is compared in absolute value: an RM that prefers short answers
    regardless of quality is as unfit for RL as one that prefers long ones.
    """
    out = []
    if min_accuracy is not None and metrics["accuracy"] < min_accuracy:
        out.append(f"accuracy {metrics['accuracy']:.3f} < min_accuracy {min_accuracy}")
    if max_length_corr is not None and abs(metrics["length_corr"]) > max_length_corr:
        out.append(f"|length_corr| {abs(metrics['length_corr']):.3f} > max_length_corr {max_length_corr}")
    if max_ece is not None and metrics["ece"] > max_ece:
        out.append(f"ece {metrics['ece']:.3f} > max_ece {max_ece}")
    return out


def kind_gate_failures(by_group: dict[str, dict], *, min_accuracy: float | None, min_pairs: int = 1,
                       gated: set[str] | None = None, set_name: str = "eval") -> tuple[list[str], dict[str, str]]:
    """The per-kind floor on one held-out set's `metrics_by_group` result: one message per kind below
    `min_accuracy`, and the kinds reported but not gated, with why (fewer than `min_pairs` pairs, where one pair
    moves accuracy by 1/n; or not in `gated`, the kinds the RM trained on). No floor: nothing fails or is skipped."""
    if min_accuracy is None:
        return [], {}
    failures, skipped = [], {}
    for kind, v in by_group.items():
        if gated is not None and kind not in gated:
            skipped[kind] = "not a kind the RM trained on"
        elif v["pairs"] < min_pairs:
            skipped[kind] = f"{v['pairs']} pairs < min_kind_pairs {min_pairs}"
        elif v["accuracy"] < min_accuracy:
            failures.append(f"{set_name} kind '{kind}' accuracy {v['accuracy']:.3f} < min_kind_accuracy "
                            f"{min_accuracy} ({v['pairs']} pairs)")
    return failures, skipped


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (what PPO uses to whiten rewards)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


# -- building, scoring and loading reward models -------------------------------------------------


def reward_model_from_policy(policy, pad_token_id: int):
    """A sequence-classification model (num_labels=1) with the policy's transformer weights and a new score head.

    Built from the config and the policy's backbone state dict rather than a temporary folder:
    no disk round trip, and a strict load proves that every backbone weight was carried over.
    """
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    # Sequence classification reads the reward at the last non-pad token, so it needs the pad id.
    config.pad_token_id = pad_token_id
    config.architectures = None
    rm = AutoModelForSequenceClassification.from_config(config, dtype=policy.dtype)
    backbone = getattr(policy, policy.base_model_prefix)
    getattr(rm, rm.base_model_prefix).load_state_dict(backbone.state_dict(), strict=True)
    return rm


def load_reward_model(model_dir, precision: str = "fp32"):
    """(model, tokenizer) of a published reward model (`<artifact>/model`), in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.hardware import place, torch_dtype

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype(precision),
                                                               use_safetensors=True)
    return place(model).eval(), AutoTokenizer.from_pretrained(model_dir)


def conversation_ids(tok, messages: list[dict], max_length: int | None = None) -> tuple[list[int], bool]:
    """Token ids of a conversation as the reward trainer tokenises it, and whether it was truncated.

    Over-long input keeps its end: the reward is read at the last token.
    """
    ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    if max_length is not None and len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


def score_conversations(model, tok, conversations: list[list[dict]], *, batch_size: int = 16,
                        max_length: int | None = None) -> tuple[list[float], int]:
    """The reward of each conversation (prompt + response messages) and how many were truncated."""
    import torch

    from alignment.training import progress

    encoded = [conversation_ids(tok, conv, max_length) for conv in conversations]
    pad_id = model.config.get_text_config().pad_token_id
    device = next(model.parameters()).device
    # Batches of similar length waste little compute on padding; results go back in input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    rewards: list[float] = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in progress(range(0, len(order), batch_size), "reward scoring"):
            index = order[start:start + batch_size]
            batch = [encoded[i][0] for i in index]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                mask[i, :len(ids)] = 1
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            for i, r in zip(index, out.logits.squeeze(-1).float().cpu().tolist()):
                rewards[i] = r
    model.train(was_training)
    return rewards, sum(t for _, t in encoded)


def score_pairs(model, tok, pairs: list[dict], *, batch_size: int = 16, max_length: int | None = None) -> dict:
    """Rewards and response lengths (tokens) of normalised preference pairs (`alignment.preferences`)."""
    convs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    rewards, truncated = score_conversations(model, tok, convs, batch_size=batch_size, max_length=max_length)
    n = len(pairs)

    def length(msgs):
        return len(tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"])

    return {
        "chosen": rewards[:n], "rejected": rewards[n:], "truncated": truncated,
        "len_chosen": [length(p["chosen"]) for p in pairs], "len_rejected": [length(p["rejected"]) for p in pairs],
    }


# -- trainer -------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def soft_label_reward_trainer():
    """TRL's RewardTrainer, with the loss replaced by `reward_loss` so it also takes soft labels.

    TRL (1.x) only knows hard labels with an optional margin, and its collator and signature
    columns drop any other field. Forward pass, metrics and logging stay TRL's: only the
    loss value is recomputed from the same rewards. Built lazily so that importing this module
    for the loss math does not import TRL.
    """
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            if "p_chosen" in examples[0]:
                out["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float)
            return out

    class SoftLabelRewardTrainer(RewardTrainer):
        def __init__(self, *args, processing_class, **kwargs):
            pad_id = processing_class.pad_token_id
            super().__init__(*args, processing_class=processing_class,
                             data_collator=SoftLabelCollator(pad_token_id=pad_id), **kwargs)

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "p_chosen"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p_chosen = inputs.pop("p_chosen", None)
            _, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                              num_items_in_batch=num_items_in_batch)
            r_chosen, r_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = reward_loss(r_chosen, r_rejected, p_chosen=p_chosen, margin=inputs.get("margin"),
                               center_coef=self.args.center_rewards_coefficient)
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer
