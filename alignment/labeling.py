"""RLAIF labelling machinery: sample K responses per prompt, pair them, judge the pairs, write preference rows.

Work is split into shards of `shard_size` prompts, each written atomically (tmp + rename) as JSONL:
`samples/<split>-NNNNN.jsonl` (the K responses) and `labels/<split>-NNNNN.jsonl` (the judged pairs). A killed
run re-started with the same config finds the finished shards and neither re-samples nor re-judges them.
Verdicts are also cached outside the artifact (`JudgeCache`, keyed by judge name + prompt + responses), so
the pairs of a half-judged shard, a `--force` re-run, or another run with the same judge cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from itertools import combinations
from pathlib import Path

from alignment import gold
from alignment.judges import Verdict

log = logging.getLogger("align")


# -- shards ------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """All rows or nothing: a kill mid-write leaves only a .tmp that the next run ignores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def shard_path(folder: Path, split: str, index: int) -> Path:
    return folder / f"{split}-{index:05d}.jsonl"


def shards(n_items: int, size: int) -> list[tuple[int, int, int]]:
    """(shard index, start, stop) covering n_items."""
    return [(i, s, min(s + size, n_items)) for i, s in enumerate(range(0, n_items, size))]


# -- sampling ----------------------------------------------------------------------------------------


def sample_responses(model, tok, prompts: list[list[dict]], *, k: int, max_new_tokens: int, temperature: float,
                     top_p: float, top_k: int, batch_size: int, max_prompt_length: int, seed: int | list[int],
                     backend: str = "hf") -> list[list[str]]:
    """K sampled responses per prompt (texts cut at EOS, special tokens removed), reproducible for a given seed
    (one int, or one per prompt: then a prompt samples the same responses whatever it is batched with).

    `model` is the in-process policy, or an `alignment.generation.Engine` (e.g. a vllm server serving it).
    """
    from alignment.generation import Engine, GenerationSpec, build_engine

    if isinstance(model, Engine):
        backend = model.backend
    spec = GenerationSpec(backend=backend, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                          top_p=top_p, top_k=top_k, num_return_sequences=k, batch_size=batch_size,
                          max_prompt_length=max_prompt_length)
    if isinstance(model, Engine):
        return model.generate(prompts, spec, seed=seed).grouped(k)
    with build_engine(spec, model, tok) as engine:
        return engine.generate(prompts, spec, seed=seed).grouped(k)


def shard_seed(seed: int, split: str, index: int) -> int:
    """The seed of one shard's sampling (per split and shard, so a resumed run samples what it would have)."""
    return seed * 100_003 + index * 2 + (split == "eval")


def sampling_groups(n_items: int, shard_size: int, batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Shards (index, start, stop) in fixed groups of consecutive shards, each group sampled by one call.

    `batch_size // shard_size` shards per group (at least one): batches as big as the spec allows while the
    shards stay the unit of resumption. The boundaries never move, so a resumed run samples a group with the
    same prompts in the same batches as an uninterrupted run (bit-identical even in bf16).
    """
    per = max(1, batch_size // shard_size)
    every = shards(n_items, shard_size)
    return [every[g:g + per] for g in range(0, len(every), per)]


def candidate_pairs(responses: list[str], pairing: str) -> list[tuple[int, int]]:
    """Index pairs to judge among one prompt's responses; empty and duplicate responses are left out.

    all: every unordered pair (K choose 2); adjacent: (0,1), (1,2), ... (K-1 pairs, linear in K).
    """
    distinct, seen = [], set()
    for i, r in enumerate(responses):
        if r.strip() and r.strip() not in seen:
            seen.add(r.strip())
            distinct.append(i)
    if pairing == "adjacent":
        return list(zip(distinct, distinct[1:]))
    return list(combinations(distinct, 2))


# -- the verdict cache ---------------------------------------------------------------------------------


class JudgeCache:
    """Append-only JSONL of verdicts, one file per judge name: {"key": sha256(prompt, a, b), "v": verdict}.

    Appends are one `write` per batch on an O_APPEND descriptor (concurrent runs do not interleave lines);
    a line cut short by a kill is skipped on load.
    """

    def __init__(self, folder: Path | None, judge_name: str):
        self.path = None if folder is None else \
            Path(folder) / f"{hashlib.sha256(judge_name.encode()).hexdigest()[:20]}.jsonl"
        self.judge_name = judge_name
        self.table: dict[str, dict] = {}
        self.hits = 0
        if self.path is not None and self.path.is_file():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self.table[row["key"]] = row["v"]
                    except (ValueError, KeyError, TypeError):
                        continue

    def key(self, prompt: list[dict], a: str, b: str) -> str:
        return hashlib.sha256(json.dumps([self.judge_name, prompt, a, b], ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> Verdict | None:
        v = self.table.get(key)
        if v is None:
            return None
        self.hits += 1
        return Verdict(**v)

    def put(self, items: list[tuple[str, Verdict]]) -> None:
        for key, v in items:
            self.table[key] = v.to_json()
        if self.path is None or not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps({"key": k, "v": v.to_json()}) + "\n" for k, v in items).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


class Judging:
    """Judges pairs through the cache, in batches, and keeps the statistics the manifest reports."""

    def __init__(self, judge, cache: JudgeCache, batch_size: int, progress=None):
        self.judge, self.cache, self.batch_size, self.progress = judge, cache, batch_size, progress
        self.judged = 0
        self.seconds = 0.0

    def verdicts(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> list[Verdict]:
        keys = [self.cache.key(p, x, y) for p, x, y in zip(prompts, a, b)]
        out: list[Verdict | None] = [self.cache.get(k) for k in keys]
        if self.progress is not None:
            self.progress.update(sum(v is not None for v in out))
        todo = [i for i, v in enumerate(out) if v is None]
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s:s + self.batch_size]
            t0 = time.perf_counter()
            got = self.judge.compare([prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx])
            self.seconds += time.perf_counter() - t0
            self.judged += len(idx)
            self.cache.put([(keys[i], v) for i, v in zip(idx, got)])  # kept even if the run dies next batch
            for i, v in zip(idx, got):
                out[i] = v
            if self.progress is not None:
                self.progress.update(len(idx))
        return out


# -- preference rows ----------------------------------------------------------------------------------


def preference_row(item: dict, i: int, j: int, v: Verdict) -> dict:
    """A row of the preference contract: the judge's favourite is `chosen`, p_chosen its probability."""
    a, b = item["responses"][i], item["responses"][j]
    a_wins = v.p_a >= 0.5
    row = {"id": f"{item.get('id', item['index'])}-{i}v{j}", "prompt": item["prompt"],
           "chosen": [{"role": "assistant", "content": a if a_wins else b}],
           "rejected": [{"role": "assistant", "content": b if a_wins else a}],
           "label_source": "ai", "p_chosen": round(v.p_a if a_wins else 1.0 - v.p_a, 6)}
    row.update({k: item[k] for k in ("constraints", "category") if item.get(k) is not None})
    row["judge"] = {"p_ab": v.p_ab, "p_ba": v.p_ba, "disagree": v.disagree, "parsed": v.parsed}
    return row


def judge_shard(batch: list[dict], judging: Judging, pairing: str) -> list[dict]:
    """The records of one shard: a verdict + preference row per judged pair, a marker per prompt without a pair."""
    pairs = [(it, i, j) for it in batch for i, j in candidate_pairs(it["responses"], pairing)]
    if judging.progress is not None:
        judging.progress.total += len(pairs)
    got = judging.verdicts([it["prompt"] for it, _, _ in pairs], [it["responses"][i] for it, i, _ in pairs],
                           [it["responses"][j] for it, _, j in pairs])
    records = [{"verdict": v.to_json(), "row": preference_row(it, i, j, v)} for (it, i, j), v in zip(pairs, got)]
    # A prompt whose k responses are all the same (or empty) gives nothing to compare.
    return records + [{"dropped": "prompt_without_pair"} for it in batch if not candidate_pairs(it["responses"], pairing)]


def collect(records: list[dict], min_confidence: float) -> tuple[list[dict], list[Verdict], dict]:
    """(kept preference rows, every verdict, dropped counts by reason) from a split's shard records."""
    rows, verdicts = [], []
    dropped = {"prompt_without_pair": 0, "unparseable": 0, "low_confidence": 0}
    for rec in records:
        if "dropped" in rec:
            dropped[rec["dropped"]] += 1
            continue
        v = Verdict(**rec["verdict"])
        verdicts.append(v)
        if keep(v, min_confidence):
            rows.append(rec["row"])
        else:
            dropped["unparseable" if not v.parsed else "low_confidence"] += 1
    return rows, verdicts, dropped


def keep(v: Verdict, min_confidence: float) -> bool:
    """Unparseable verdicts carry no label; exact ties (and, optionally, near-ties) carry no preference."""
    return v.parsed and abs(v.p_a - 0.5) > min_confidence


def label_stats(rows: list[dict], verdicts: list[Verdict]) -> dict:
    """What the manifest reports about a split's labels."""
    calls = sum(1 + (v.p_ba is not None) for v in verdicts)
    both = [v for v in verdicts if v.p_ba is not None and v.unparsed_calls == 0]
    decisive = [r for r in rows if r.get("constraints") and
                gold.score(r["chosen"][0]["content"], r["constraints"]) !=
                gold.score(r["rejected"][0]["content"], r["constraints"])]
    agree = sum(gold.score(r["chosen"][0]["content"], r["constraints"]) >
                gold.score(r["rejected"][0]["content"], r["constraints"]) for r in decisive)
    return {
        "pairs": len(rows), "verdicts": len(verdicts),
        "position_bias_rate": round(sum(v.disagree for v in both) / len(both), 4) if both else None,
        "unparseable_rate": round(sum(v.unparsed_calls for v in verdicts) / calls, 4) if calls else None,
        "mean_abs_margin": round(sum(abs(r["p_chosen"] - 0.5) for r in rows) / len(rows), 4) if rows else None,
        # On prompts with verifiable constraints: how often the judge's favourite is the one that satisfies more.
        "gold_agreement": round(agree / len(decisive), 4) if decisive else None,
        "gold_decisive_pairs": len(decisive),
    }
