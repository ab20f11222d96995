"""Instruction mixtures (FLAN / OPT-IML style): several sources, mixing rates, caps, held-out categories.

- Mixing rate: a source's share of the training examples is weight / sum(weights). With no weights the mixture
  is examples-proportional (T5, FLAN): each source in proportion to its size after its cap K.
- Cap: at most K training examples from a source, so one large dataset cannot swamp the others.
- Total: data.max_train_examples, or else the largest mixture that keeps the rates exact without repeating an
  example. A source with fewer examples than its share gives all it has and the rest is shared out among the
  others in proportion to their weights (examples-proportional mixing with a cap, as in T5 section 3.5.2).
- Held-out categories (FLAN's held-out task clusters): their rows never train; their eval rows are reported per
  category. Held-out sources are evaluation-only.

The one-source form `data.train` / `data.eval` is the mixture of one source that keeps the first N rows.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field

from alignment.data import seeded_split
from alignment.errors import DataError
from alignment.schema import SFTData, SourceSpec
from alignment.sft_data import load_examples

log = logging.getLogger("align")
MAIN_EVAL = "eval"


@dataclass
class Mixture:
    train: list[dict]
    eval_groups: dict[str, list[dict]]
    """'eval' (the in-distribution eval set: every training source's eval rows), 'source:<name>' per source when
    there are several or a held-out one, 'category:<name>' per held-out category."""
    report: dict = field(default_factory=dict)
    """The realised mixture, for the manifest."""


def sources_of(data: SFTData) -> list[SourceSpec]:
    if data.sources:
        return list(data.sources)
    return [SourceSpec(name=str(data.train), train=data.train, eval=data.eval, train_split=data.train_split,
                       eval_split=data.eval_split, sample="first")]


def mixing_counts(available: dict[str, int], weights: dict[str, float] | None, total: int | None) -> dict[str, int]:
    """Examples per source: proportional to the weights (or to `available` when None), never above `available`.

    >>> mixing_counts({"a": 400, "b": 80}, {"a": 3, "b": 1}, None)
    {'a': 240, 'b': 80}
    >>> mixing_counts({"a": 400, "b": 80}, {"a": 1, "b": 1}, 300)
    {'a': 220, 'b': 80}
    """
    w = {n: float(a) for n, a in available.items()} if weights is None else dict(weights)
    live = [n for n in available if available[n] > 0 and w[n] > 0]
    counts = {n: 0 for n in available}
    if not live:
        return counts
    if total is None:
        wsum = sum(w[n] for n in live)
        # The largest total whose exact shares fit in every source (1e-9: float noise, e.g. 80 * 4 / 1).
        total = min(math.floor(available[n] * wsum / w[n] + 1e-9) for n in live)
    budget = min(total, sum(available[n] for n in live))
    free = list(live)
    while free:
        wsum = sum(w[n] for n in free)
        full = [n for n in free if budget * w[n] / wsum >= available[n]]
        if not full:
            break
        for n in full:
            counts[n] = available[n]
            budget -= available[n]
            free.remove(n)
    if free:
        wsum = sum(w[n] for n in free)
        shares = {n: budget * w[n] / wsum for n in free}
        for n in free:
            counts[n] = math.floor(shares[n] + 1e-9)
        # Largest remainder: hand out what flooring left over, biggest fractional part first.
        left = budget - sum(counts[n] for n in free)
        for n in sorted(free, key=lambda n: (-(shares[n] - counts[n]), free.index(n)))[:left]:
            counts[n] += 1
    return counts


def stages_of(data: SFTData) -> tuple[str, ...]:
    """The stages whose published data the mixture trains on (`from_stage`), for the stage's upstream."""
    return tuple(dict.fromkeys(s.from_stage for s in data.sources if s.from_stage))


def _resolve_stages(sources: list[SourceSpec], inputs: dict | None) -> list[SourceSpec]:
    """Sources with `from_stage` read that input artifact's train.jsonl (the store has verified its hashes)."""
    out = []
    for s in sources:
        if s.from_stage:
            if not inputs or s.from_stage not in inputs:
                raise DataError(f"data.sources: '{s.name}' reads from_stage '{s.from_stage}', which is not an input "
                                "of this stage (run it first, or set inputs.<stage>)")
            s = s.model_copy(update={"train": str(inputs[s.from_stage].path / "train.jsonl")})
        out.append(s)
    return out


def realise_mixture(data: SFTData, seed: int, inputs: dict | None = None) -> Mixture:
    """Load every source, apply filters, hold-outs, caps and rates; return train rows and eval groups.

    `inputs`: the stage's input artifacts, for sources with `from_stage`.
    """
    sources = _resolve_stages(sources_of(data), inputs)
    held_cats = set(data.held_out_categories)
    pools: dict[str, list[dict]] = {}
    evals: dict[str, list[dict]] = {}
    held_sources: dict[str, list[dict]] = {}
    cat_evals: dict[str, list[dict]] = {c: [] for c in data.held_out_categories}
    dropped = Counter()

    for s in sources:
        train = _load(s, s.train, s.train_split, data) if s.train else []
        evals_ = _load(s, s.eval, s.eval_split, data) if s.eval else None
        if s.held_out:
            rows = evals_ if evals_ is not None else train
            held_sources[s.name] = _keep_categories(rows, s.categories)
            for ex in rows:
                if ex["category"] in held_cats:
                    cat_evals[ex["category"]].append(ex)
            continue
        if evals_ is None:
            # No eval file: a seeded split of the train rows (before any filter, so it does not depend on them).
            train, evals_ = seeded_split(train, data.eval_fraction, seed)
        for ex in evals_:
            if ex["category"] in held_cats:
                cat_evals[ex["category"]].append(ex)
        train, evals_ = _keep_categories(train, s.categories), _keep_categories(evals_, s.categories)
        dropped.update(ex["category"] for ex in train if ex["category"] in held_cats)
        pools[s.name] = [ex for ex in train if ex["category"] not in held_cats]
        evals[s.name] = [ex for ex in evals_ if ex["category"] not in held_cats]

    trainers = [s for s in sources if not s.held_out]
    available = {s.name: min(len(pools[s.name]), s.cap or len(pools[s.name])) for s in trainers}
    weights = None if all(s.weight is None for s in trainers) else {s.name: s.weight for s in trainers}
    counts = mixing_counts(available, weights, data.max_train_examples)
    train_rows = [ex for s in trainers for ex in _draw(s, pools[s.name], counts[s.name], seed)]
    if not train_rows:
        raise DataError("data: the mixture has no training examples left (check sources, categories and "
                        "held_out_categories)")

    cap = data.max_eval_examples
    per_source = {name: rows[:cap] for name, rows in evals.items()}
    # Sources cut from the same file would otherwise count its held-out rows once each.
    cat_evals = {c: _unique(rows) for c, rows in cat_evals.items()}
    groups = _eval_groups(per_source, held_sources, cat_evals, cap, by_source=len(trainers) > 1 or bool(held_sources))

    report = _report(trainers, pools, counts, per_source, held_sources, cat_evals, dropped, cap, train_rows)
    return Mixture(train=train_rows, eval_groups=groups, report=report)


def _report(trainers, pools, counts, per_source, held_sources, cat_evals, dropped, cap, train_rows) -> dict:
    """What the mixture drew from each source and what it held out (the stage's manifest keeps it)."""
    total = len(train_rows)
    return {
        "sources": {s.name: {"available": len(pools[s.name]), "cap": s.cap, "weight": s.weight,
                             "used": counts[s.name], "rate": round(counts[s.name] / total, 4),
                             "eval_examples": len(per_source[s.name])} for s in trainers},
        "held_out_sources": {n: {"eval_examples": len(rows[:cap])} for n, rows in held_sources.items()},
        "held_out_categories": {c: {"train_rows_dropped": dropped[c], "eval_examples": len(rows[:cap])}
                                for c, rows in cat_evals.items()},
        "train_examples": total,
        "train_categories": dict(sorted(Counter(str(ex["category"]) for ex in train_rows).items())),
    }


def _draw(s: SourceSpec, pool: list[dict], k: int, seed: int) -> list[dict]:
    """The k rows a training source contributes: its first k, or a seeded sample of them."""
    if s.sample == "first" or k >= len(pool):
        return pool[:k]
    # Sorted indices keep file order, so the same seed and files give the same rows in the same order.
    return [pool[j] for j in sorted(random.Random(f"{seed}:{s.name}").sample(range(len(pool)), k))]


def _eval_groups(per_source: dict, held_sources: dict, cat_evals: dict, cap: int | None, by_source: bool) -> dict:
    """The eval groups: all training sources together, each source apart (when there are several), each held-out
    category apart; a group without rows is one DataError."""
    groups = {MAIN_EVAL: [ex for rows in per_source.values() for ex in rows]}
    if by_source:
        groups.update({f"source:{n}": rows for n, rows in per_source.items()})
        groups.update({f"source:{n}": rows[:cap] for n, rows in held_sources.items()})
    for c, rows in cat_evals.items():
        if rows:
            groups[f"category:{c}"] = rows[:cap]
        else:
            log.warning("[sft] held-out category %r has no eval rows in any source", c)
    empty = [g for g, rows in groups.items() if not rows]
    if empty:
        raise DataError(f"data: no eval rows for {', '.join(empty)} (give the source an eval file, or check its "
                        "categories filter)")
    return groups


def _load(s: SourceSpec, path: str, split: str, data: SFTData) -> list[dict]:
    rows = load_examples(path, split, data.max_bad_fraction)
    for ex in rows:
        ex["source"] = s.name
        if s.category is not None:
            ex["category"] = s.category
    return rows


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for ex in rows:
        key = json.dumps([ex["prompt"], ex["completion"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _keep_categories(rows: list[dict], categories: list[str] | None) -> list[dict]:
    return rows if categories is None else [ex for ex in rows if ex["category"] in categories]
