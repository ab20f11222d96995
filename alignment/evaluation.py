"""Evaluation metrics as pure functions of plain lists (tested on hand-worked numbers).

- Win rate from pairwise judge verdicts (AlpacaEval / MT-bench pairwise style). Each verdict is
  P(policy better) in [0, 1], averaged over both presentation orders by the judge. A verdict above
  0.5 + tie_band is a win, below 0.5 - tie_band a loss, otherwise a tie; the win rate counts a tie as half
  a win, so 0.5 means "no better than the baseline". The soft win rate is the mean probability.
- Position bias: the fraction of verdicts whose two orders picked different winners.
- KL(policy || baseline) per prompt in nats, estimated on responses sampled from the policy
  (`alignment.dpo.sampled_kl`): aggregated as the mean sequence KL and the KL per generated token.
- Gold pass rate per prompt set and per constraint kind; perplexity and the forgetting summary (what a policy
  keeps of the base: perplexity ratio on general text, gold change on held-out kinds).
- Length statistics, gold pass rate, and percentile-bootstrap confidence intervals (Efron & Tibshirani,
  1993) for any of these means; resampling prompts, so 1000 resamples of ~100 values cost milliseconds.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence


def win_counts(p_policy: Sequence[float], tie_band: float = 0.0) -> tuple[int, int, int]:
    """(wins, ties, losses) of the policy from P(policy better) per prompt."""
    wins = sum(p > 0.5 + tie_band for p in p_policy)
    losses = sum(p < 0.5 - tie_band for p in p_policy)
    return wins, len(p_policy) - wins - losses, losses


def win_rate(p_policy: Sequence[float], tie_band: float = 0.0) -> float:
    """(wins + ties / 2) / n: 0.5 means as good as the baseline."""
    if not p_policy:
        raise ValueError("win_rate needs at least one verdict")
    wins, ties, _ = win_counts(p_policy, tie_band)
    return (wins + 0.5 * ties) / len(p_policy)


def p_policy_both_orders(p_ab: float, p_ba: float) -> float:
    """P(policy better) from P(first-shown better) with the policy shown first (p_ab) and second (p_ba)."""
    return 0.5 * (p_ab + (1.0 - p_ba))


def win_summary(p_policy: Sequence[float], *, disagree: Sequence[bool] = (), parsed: Sequence[bool] = (),
                tie_band: float = 0.0, n_boot: int = 1000, seed: int = 0) -> dict:
    """Everything the report shows about one policy-vs-baseline comparison."""
    wins, ties, losses = win_counts(p_policy, tie_band)
    n = len(p_policy)
    lo, hi = bootstrap_ci([1.0 if p > 0.5 + tie_band else 0.0 if p < 0.5 - tie_band else 0.5 for p in p_policy],
                          n_boot=n_boot, seed=seed)
    return {
        "win_rate": (wins + 0.5 * ties) / n, "win_rate_ci": [lo, hi], "soft_win_rate": sum(p_policy) / n,
        "wins": wins, "ties": ties, "losses": losses, "n": n,
        "position_disagreement": (sum(disagree) / len(disagree)) if disagree else None,
        "unparsed": (len(parsed) - sum(parsed)) if parsed else 0,
    }


def bootstrap_ci(values: Sequence[float], *, stat: Callable[[Sequence[float]], float] | None = None,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` (default: the mean) at level 1 - alpha."""
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    stat = stat or (lambda xs: sum(xs) / len(xs))
    rng = random.Random(seed)
    n = len(values)
    return _percentile_interval([stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot)], alpha)


def _percentile_interval(stats: list[float], alpha: float) -> tuple[float, float]:
    stats, n_boot = sorted(stats), len(stats)
    lo = stats[max(0, int(math.floor(alpha / 2 * n_boot)))]
    hi = stats[min(n_boot - 1, int(math.ceil((1 - alpha / 2) * n_boot)) - 1)]
    return lo, hi


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence, *, n_boot: int = 1000, alpha: float = 0.05,
                         seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean when the values come in clusters (e.g. prompts sharing one wording): each
    draw resamples the clusters with replacement, then the values inside each drawn cluster, and takes the mean
    of everything drawn. With one value per cluster it is `bootstrap_ci` draw for draw. Why: the prompt-level
    bootstrap treats the wordings a split happens to use as fixed, so it misses how far another set of wordings
    would move the figure."""
    if not values or len(values) != len(clusters):
        raise ValueError(f"cluster_bootstrap_ci needs one cluster label per value ({len(values)} values, "
                         f"{len(clusters)} labels)")
    members: dict = {}
    for v, c in zip(values, clusters):
        members.setdefault(c, []).append(v)
    groups = list(members.values())
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        drawn = [rng.randrange(len(groups)) for _ in range(len(groups))]
        picked: list[float] = []
        for g in (groups[i] for i in drawn):
            picked.extend([g[rng.randrange(len(g))] for _ in g] if len(g) > 1 else g)
        stats.append(sum(picked) / len(picked))
    return _percentile_interval(stats, alpha)


def kl_summary(seq_kl: Sequence[float], n_tokens: int) -> dict:
    """Mean KL per response (nats) and per generated token from per-response sequence KLs."""
    if not seq_kl:
        raise ValueError("kl_summary needs at least one response")
    total = sum(seq_kl)
    return {"kl_seq": total / len(seq_kl), "kl_per_token": total / max(n_tokens, 1), "kl_responses": len(seq_kl),
            "kl_tokens": n_tokens}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of nothing")
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def length_stats(lengths: Sequence[int]) -> dict:
    return {"mean": mean(lengths), "median": quantile(lengths, 0.5), "p90": quantile(lengths, 0.9),
            "max": max(lengths), "min": min(lengths)}


def distribution(values: Sequence[float], clusters: Sequence | None = None) -> dict:
    """Mean, standard deviation (population) and bootstrap CI of the mean; with `clusters` (a label per value)
    also `mean_ci_wordings`, the CI that resamples the clusters first (`cluster_bootstrap_ci`)."""
    m = mean(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
    lo, hi = bootstrap_ci(values)
    out = {"mean": m, "std": sd, "mean_ci": [lo, hi], "n": len(values)}
    if clusters is not None:
        out["mean_ci_wordings"] = list(cluster_bootstrap_ci(values, clusters))
    return out


def wording_of(row: dict) -> str | None:
    """The wording of a prompt's own constraint kind: the segment of its `template` id for its `category` (e.g.
    `max_words/h1` in `task/h3+frame/h1+max_words/h1`); None for a row without both fields (user data)."""
    template, category = row.get("template"), row.get("category")
    if not template or not category:
        return None
    segments = [s for s in str(template).split("+") if s.split("/")[0] == category]
    return segments[0] if segments else str(template)


def constraint_gold(rows: list[dict], responses: list[str]) -> list[float | None]:
    """The bundled gold metric: 1.0 when a response meets every constraint of its prompt, 0.0 when it misses
    one, None for prompts without constraints (not counted). No stage trains on it (`alignment.gold`)."""
    from alignment import gold

    return [None if not row.get("constraints") else float(gold.passes(resp, row["constraints"]))
            for row, resp in zip(rows, responses, strict=True)]


def finished_only(scores: Sequence[float | None], eos: Sequence[bool]) -> list[float | None]:
    """Gold scores with every answer that hit the token budget without an EOS counted as failed (0): the checker
    scores a cut text as it stands, so a policy that runs on collects the "at least N words" constraints."""
    return [None if g is None else (g if e else 0.0) for g, e in zip(scores, eos, strict=True)]


def pass_rate_summary(scores: Sequence[float], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Gold pass rate of scored prompts (each 1.0 pass / 0.0 fail, or a fraction) with its bootstrap 95% CI."""
    lo, hi = bootstrap_ci(scores, n_boot=n_boot, seed=seed)
    return {"pass_rate": mean(scores), "pass_rate_ci": [lo, hi], "n": len(scores)}


def gold_summary(scores: Sequence[float | None], kinds: Sequence[str | None], *, n_boot: int = 1000,
                 seed: int = 0) -> dict | None:
    """Pass rate over one prompt set and per kind (a row's `category`); None scores (no constraints) are left
    out, and so is the set when nothing was scored. Kinds are reported only when rows carry one."""
    if len(scores) != len(kinds):
        raise ValueError(f"gold_summary: {len(scores)} scores but {len(kinds)} kinds")
    scored = [(s, k) for s, k in zip(scores, kinds) if s is not None]
    if not scored:
        return None
    out = pass_rate_summary([s for s, _ in scored], n_boot=n_boot, seed=seed)
    groups: dict[str, list[float]] = {}
    for s, k in scored:
        if k is not None:
            groups.setdefault(str(k), []).append(s)
    out["by_kind"] = {k: pass_rate_summary(v, n_boot=n_boot, seed=seed) for k, v in sorted(groups.items())}
    return out


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token), the token-weighted perplexity of a text set."""
    if n_tokens < 1:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / n_tokens)


def forgetting_summary(ppl: dict[str, float], heldout_gold: dict[str, float], reference: str) -> dict:
    """What each model keeps of `reference` (the base model): perplexity on general text and its ratio to the
    reference's (> 1: worse language modelling than the base), and the gold pass rate on kinds no stage trained
    on with its change from the reference (< 0: lost). Models missing a figure are left out of that figure."""
    out: dict = {"reference": reference, "ppl": dict(ppl), "heldout_kinds_gold": dict(heldout_gold)}
    if reference in ppl:
        out["ppl_ratio"] = {n: p / ppl[reference] for n, p in ppl.items()}
    if reference in heldout_gold:
        out["heldout_kinds_gold_change"] = {n: g - heldout_gold[reference] for n, g in heldout_gold.items()}
    return out
