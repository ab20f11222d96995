"""Online (iterative) DPO: the pieces the `online_dpo` stage loops over, as functions of plain data.

Each round (Xiong et al. 2024, "Iterative Preference Learning from Human Feedback"; Dong et al. 2024, the
RLHFlow online recipe): the current policy samples K responses per prompt, a scorer rates each response
(a reward model, the verifiable gold checker, or an AI judge against the prompt's reference answer: any
`alignment.reward_sources.RewardSource`), the best and the worst response of each prompt become a
preference pair, and DPO trains on that round's pairs with the SFT model as the fixed reference.

Best-vs-worst is the pair with the largest score gap, so the most informative one per prompt; prompts whose
responses all score within `min_gap` of each other carry no preference and are dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path


def round_prompts(n_prompts: int, per_round: int, round_index: int, seed: int) -> list[int]:
    """Prompt indices for round `round_index` (0-based): consecutive slices of a seeded permutation.

    Rounds see fresh prompts until the pool runs out, then a new permutation starts (a new pass). A pure
    function of its arguments, so a resumed run draws exactly the prompts the first run drew.
    """
    if n_prompts < 1 or per_round < 1:
        raise ValueError(f"round_prompts: need prompts and per_round >= 1, got {n_prompts}, {per_round}")
    out: list[int] = []
    start = round_index * per_round
    while len(out) < per_round:
        epoch, offset = divmod(start + len(out), n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out += order[offset: offset + per_round - len(out)]
    return out


def adjusted_scores(scores: list[float], finished: list[bool], truncation_penalty: float) -> list[float]:
    """Scores with `truncation_penalty` subtracted from responses cut at max_new_tokens (no EOS).

    A truncated response is not what the policy should learn to produce; a penalty larger than the score range
    ranks every finished response above every truncated one.
    """
    return [s - (0.0 if f else truncation_penalty) for s, f in zip(scores, finished, strict=True)]


def best_vs_worst(item: dict, responses: list[str], scores: list[float], min_gap: float) -> dict | None:
    """The preference row (alignment.preferences contract) of one prompt's best vs worst response, or None.

    Ties go to the earliest response (deterministic). None when the gap is at most `min_gap` or the two texts
    are the same (DPO on identical responses is a zero gradient).
    """
    if len(responses) != len(scores) or len(responses) < 2:
        raise ValueError(f"best_vs_worst: {len(responses)} responses, {len(scores)} scores")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    gap = scores[best] - scores[worst]
    if gap <= min_gap or responses[best].strip() == responses[worst].strip() or not responses[best].strip():
        return None
    row = {"id": f"{item.get('id', item.get('row', ''))}-{best}v{worst}", "prompt": item["prompt"],
           "chosen": [{"role": "assistant", "content": responses[best]}],
           "rejected": [{"role": "assistant", "content": responses[worst]}],
           "label_source": "ai", "margin": round(gap, 6)}
    row.update({k: item[k] for k in ("constraints", "category") if item.get(k) is not None})
    return row


@dataclass
class RoundPairs:
    rows: list[dict] = field(default_factory=list)
    dropped_no_gap: int = 0


def build_pairs(samples: list[dict], min_gap: float, truncation_penalty: float) -> RoundPairs:
    """Best-vs-worst rows from a round's sample records ({prompt, responses, scores, finished, ...})."""
    out = RoundPairs()
    for rec in samples:
        scores = adjusted_scores(rec["scores"], rec["finished"], truncation_penalty)
        row = best_vs_worst(rec, rec["responses"], scores, min_gap)
        if row is None:
            out.dropped_no_gap += 1
        else:
            out.rows.append(row)
    return out


def sample_stats(samples: list[dict]) -> dict:
    """What a round's samples say about the policy that drew them (its online learning curve)."""
    scores = [s for r in samples for s in r["scores"]]
    finished = [f for r in samples for f in r["finished"]]
    lengths = [n for r in samples for n in r["lengths"]]
    best = [max(r["scores"]) for r in samples]
    return {"mean_score": round(sum(scores) / len(scores), 6), "mean_best_score": round(sum(best) / len(best), 6),
            "finished_rate": round(sum(finished) / len(finished), 4),
            "mean_length": round(sum(lengths) / len(lengths), 2), "generated_tokens": int(sum(lengths))}


def score_groups(scorer, items: list[dict], groups: list[list[str]], batch_size: int = 64) -> list[list[float]]:
    """Scores of every prompt's K responses from a text-level scorer (alignment.reward_sources), batched."""
    prompts, completions, constraints, reference = [], [], [], []
    for it, responses in zip(items, groups, strict=True):
        for r in responses:
            prompts.append(it["prompt"])
            completions.append(r)
            constraints.append(it.get("constraints"))
            reference.append(it.get("reference"))
    flat: list[float] = []
    for s in range(0, len(prompts), batch_size):
        sl = slice(s, s + batch_size)
        fields = {"constraints": constraints[sl] if all(c is not None for c in constraints[sl]) else None,
                  "reference": reference[sl] if all(r is not None for r in reference[sl]) else None}
        flat += scorer(prompts[sl], completions[sl], **fields)
    k = [len(g) for g in groups]
    starts = [sum(k[:i]) for i in range(len(k))]
    return [flat[a:a + n] for a, n in zip(starts, k)]


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Continue training from a previous round's adapter: its weights into `peft_model`'s active adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise ValueError(f"{adapter_dir}: adapter keys do not fit this model: {missing[:3]}")
