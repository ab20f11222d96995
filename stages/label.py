"""Stage `label`: RLAIF, an AI judge builds the preference pairs (Lee et al. 2023; Bai et al. 2022).

Reads `<run>/sft/`, samples K responses per prompt from the SFT policy, pairs them (every pair of distinct
responses, or adjacent ones), asks a judge (`alignment/judges.py`: local LM, OpenAI-compatible endpoint or a
reward model) which of each pair is better, in both orders, and writes `pairs.jsonl` (train prompts) and
`eval.jsonl` (held-out prompts) in the preference contract with `label_source: ai` and the soft label
`p_chosen`. `reward` and `dpo` read them with `data.from_stage: label`.

Robustness: shards of `shard_size` prompts are written as they finish (`samples/`, `labels/`), so a killed
run resumes without re-sampling or re-judging them; verdicts are cached in `<artifact root>/.cache/judge/`
(or `cache_dir`), keyed by judge name + prompt + responses, so a `--force` re-run costs no judge calls.

Judge gate (`gate:`), like the reward stage's: before anything is sampled, the judge labels a human-labelled
slice (`gate.data`, default the bundled held-out preference pairs, in both presentation orders) and its
agreement with the human labels and its position-bias rate are measured (`alignment.audit`). Below
`gate.min_agreement` or above `gate.max_position_bias` the artifact is published with status `failed_gate` and
the audit only (no pairs: labels from an unfit judge are noise), and the command exits 2.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Literal

from alignment.artifacts import write_json
from alignment.audit import audit_judge, gate_failures
from alignment.config import Section, StageConfig
from alignment.errors import DataError
from alignment.hardware import peak_rss_mb, resolve_precision
from alignment.judge_local import judge_upstream
from alignment.judges import JudgeSpec, build_judge
from alignment import preemption
from alignment.generation import GenerationSpec, build_engine
from alignment.labeling import (JudgeCache, Judging, collect, judge_shard, label_stats, read_jsonl, sample_responses,
                                sampling_groups, shard_path, shard_seed, shards, write_jsonl)
from alignment.models import load_tokenizer
from alignment.policy import lineage_for, load_policy
from alignment.prompts import PromptData, load_prompts

log = logging.getLogger("align")


class SamplingSpec(Section):
    """How the SFT policy samples the candidate responses."""

    k: int = 2
    """Responses per prompt (>= 2)."""
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    batch_size: int = 8
    """Prompts per generate call (each expands to k sequences); whole shards are sampled together up to this."""
    max_prompt_length: int = 512
    backend: Literal["hf", "vllm"] = "hf"
    """hf: in-process transformers; vllm: a vLLM sidecar serving the SFT policy (alignment/generation_vllm.py)."""


class JudgeGate(Section):
    """Thresholds the judge must meet on human-labelled pairs before its labels are written (None: not checked)."""

    data: str | None = "data/prefs/eval.jsonl"
    """Human-labelled preference pairs (`chosen` is the human preference); None: no gate, nothing measured."""
    max_pairs: int | None = 40
    """Judge at most this many of them (the first N; chosen shown first on even rows, second on odd rows)."""
    min_agreement: float | None = 0.6
    """Fraction of human-labelled pairs where the judge prefers the human-chosen response (ties count half)."""
    max_position_bias: float | None = 0.3
    """Fraction of pairs whose two presentation orders pick different winners (needs judge.both_orders)."""

    def problems(self, prefix: str = "gate") -> list[tuple[str, str]]:
        out = []
        if self.data and not Path(self.data).exists():
            out.append((f"{prefix}.data", f"{self.data}: file not found"))
        if self.max_pairs is not None and self.max_pairs < 1:
            out.append((f"{prefix}.max_pairs", "expected at least 1 (or leave unset for all)"))
        for key in ("min_agreement", "max_position_bias"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 1:
                out.append((f"{prefix}.{key}", f"expected a fraction in [0, 1] or null, got {value}"))
        return out


class Config(StageConfig):
    prompts: PromptData = PromptData()
    max_eval_prompts: int | None = None
    """Held-out prompts to label into eval.jsonl (default: prompts.max_prompts; 0: none, reward/dpo then split train)."""
    sampling: SamplingSpec = SamplingSpec()
    pairing: Literal["all", "adjacent"] = "all"
    """all: every pair of distinct responses (K choose 2); adjacent: K-1 pairs."""
    judge: JudgeSpec = JudgeSpec()
    judge_batch: int = 16
    """Pairs per judge.compare call; the cache is written after each."""
    min_confidence: float = 0.0
    """Drop pairs whose |p_chosen - 0.5| is at most this (exact ties are always dropped)."""
    shard_size: int = 16
    """Prompts per shard: the unit of resumption after a kill."""
    cache_dir: str | None = None
    """Where verdicts are cached; None: `<artifact root>/.cache/judge`. 'none' disables the cache."""
    gate: JudgeGate = JudgeGate()

    def problems(self):
        out = self.prompts.problems("prompts") + self.judge.problems("judge") + self.gate.problems("gate")
        if self.sampling.k < 2:
            out.append(("sampling.k", "expected at least 2 responses per prompt, to have something to compare"))
        if self.sampling.temperature <= 0:
            out.append(("sampling.temperature", "expected > 0: greedy decoding gives k identical responses"))
        if not 0 <= self.min_confidence < 0.5:
            out.append(("min_confidence", "expected a number in [0, 0.5)"))
        if self.max_eval_prompts is not None and self.max_eval_prompts < 0:
            out.append(("max_eval_prompts", "expected 0 or more (or leave unset)"))
        if self.shard_size < 1 or self.judge_batch < 1:
            out.append(("shard_size", "shard_size and judge_batch must be at least 1"))
        return out


def upstream(cfg: Config) -> tuple[str, ...]:
    return ("sft",) + tuple(name for name in judge_upstream(cfg.judge) if name != "sft")


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pair" if "judg" in desc else "prompt", mininterval=2.0, leave=False,
                disable=None)  # None: no bar when stderr is not a terminal (logs, CI)


def judge_gate(cfg: Config, judge, ctx) -> bool:
    """Audit the judge on the human-labelled slice; False (status failed_gate) when it misses a threshold."""
    if not cfg.gate.data:
        return True
    report = audit_judge(judge, cfg.gate.data, limit=cfg.gate.max_pairs, batch=cfg.judge_batch)
    failures = gate_failures(report, min_agreement=cfg.gate.min_agreement,
                             max_position_bias=cfg.gate.max_position_bias)
    write_json(ctx.out_dir / "gate_audit.json", report)
    ctx.metrics.update({"gate": cfg.gate.model_dump(), "gate_passed": not failures, "gate_failures": failures,
                        "gate_agreement": report["agreement"], "gate_position_bias_rate": report["position_bias_rate"],
                        "gate_pairs": report["pairs"], "judge": judge.name})
    log.info("[label] judge gate on %d human-labelled pairs (%s): agreement %.3f, position bias %s",
             report["pairs"], cfg.gate.data, report["agreement"], report["position_bias_rate"])
    if failures:
        ctx.status = "failed_gate"
        log.error("[label] judge gate failed: %s", "; ".join(failures))
        judge.close()
    return not failures


def load_splits(cfg: Config) -> dict[str, list[dict]]:
    """The prompts to label per split ("train", and "eval" unless switched off), each item knowing its index."""
    splits = {"train": load_prompts(cfg.prompts.train, cfg.prompts.max_prompts, cfg.prompts.train_split)}
    n_eval = cfg.prompts.max_prompts if cfg.max_eval_prompts is None else cfg.max_eval_prompts
    if cfg.prompts.eval and n_eval != 0:
        splits["eval"] = load_prompts(cfg.prompts.eval, n_eval, cfg.prompts.eval_split)
    for items in splits.values():
        for i, item in enumerate(items):
            item["index"] = i
    return splits


def sample_shards(cfg: Config, sft, splits: dict, samples_dir: Path) -> int | None:
    """K responses per prompt, written shard by shard (finished shards are kept across a kill); returns the
    number of prompts sampled now, or None when preempted."""
    s, sampled = cfg.sampling, 0
    todo = [(split, group) for split, items in splits.items()
            for group in sampling_groups(len(items), cfg.shard_size, s.batch_size)
            if not all(shard_path(samples_dir, split, i).is_file() for i, _, _ in group)]
    if not todo:
        return 0
    policy, tok = load_policy(sft, cfg.precision).eval(), load_tokenizer(sft.model_dir)
    with build_engine(GenerationSpec(backend=s.backend), policy, tok) as engine:
        bar = _progress(sum(g[-1][2] - g[0][1] for _, g in todo), "[label] sampling")
        for split, group in todo:
            if preemption.requested():
                return None  # the runner requeues; finished shards are kept
            first, items = group[0][1], splits[split][group[0][1]:group[-1][2]]
            # One seed per prompt, from its shard's seed: a shard samples the same whatever it is grouped with.
            seeds = [shard_seed(cfg.seed, split, i) * 100_003 + j for i, a, b in group for j in range(b - a)]
            responses = sample_responses(engine, tok, [it["prompt"] for it in items], k=s.k,
                                         max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                         top_k=s.top_k, batch_size=s.batch_size,
                                         max_prompt_length=s.max_prompt_length, seed=seeds)
            for index, a, b in group:
                path = shard_path(samples_dir, split, index)
                if not path.is_file():  # a resumed group re-samples its finished shards identically; keep them
                    write_jsonl(path, [{**it, "responses": r} for it, r in
                                       zip(splits[split][a:b], responses[a - first:b - first])])
                    sampled += b - a
            bar.update(len(items))
        bar.close()
    del policy
    gc.collect()
    return sampled


def judge_splits(cfg: Config, ctx, judging: Judging, splits: dict) -> dict | None:
    """Every pair of distinct responses judged shard by shard (verdicts cached as they come); the pairs and eval
    files written; per-split label statistics, or None when preempted."""
    samples_dir, labels_dir = ctx.out_dir / "samples", ctx.out_dir / "labels"
    metrics: dict = {}
    for split, items in splits.items():
        judging.progress = _progress(0, f"[label] judging {split}")
        hits, judged = judging.cache.hits, judging.judged
        records = []
        for index, _, _ in shards(len(items), cfg.shard_size):
            out = shard_path(labels_dir, split, index)
            if not out.is_file():
                if preemption.requested():
                    return None
                write_jsonl(out, judge_shard(read_jsonl(shard_path(samples_dir, split, index)), judging, cfg.pairing))
            records += read_jsonl(out)
        judging.progress.close()
        rows, verdicts, dropped = collect(records, cfg.min_confidence)
        if split == "train" and not rows:
            raise DataError(f"{cfg.prompts.train}: the judge produced no usable pair (dropped: {dropped}); "
                            "check the judge (unparseable rate) or raise sampling.temperature / k")
        write_jsonl(ctx.out_dir / ("pairs.jsonl" if split == "train" else "eval.jsonl"), rows)
        stats = label_stats(rows, verdicts)
        metrics[split] = {**stats, "dropped": dropped, "prompts": len(items), "judged": judging.judged - judged,
                          "cache_hits": judging.cache.hits - hits}
        log.info("[label] %s: %d pairs from %d prompts; position bias %s, unparseable %s, mean |p-0.5| %s, "
                 "gold agreement %s; %d judged, %d from cache", split, stats["pairs"], len(items),
                 stats["position_bias_rate"], stats["unparseable_rate"], stats["mean_abs_margin"],
                 stats["gold_agreement"], metrics[split]["judged"], metrics[split]["cache_hits"])
    return metrics


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    sft = ctx.inputs["sft"]
    splits = load_splits(cfg)
    log.info("[label] %s prompts, k=%d, pairing %s; judge %s (%s); precision %s",
             {s: len(v) for s, v in splits.items()}, cfg.sampling.k, cfg.pairing, cfg.judge.kind,
             cfg.judge.model or "", resolve_precision(cfg.precision))
    # The judge first: a wrong model name or a dead endpoint fails in seconds, not after the sampling.
    judge = build_judge(cfg.judge, ctx.inputs, cfg.precision)
    judge.check()
    if not judge_gate(cfg, judge, ctx):
        return  # published as failed_gate with the audit only: nothing sampled, nothing labelled

    # -- sample, then judge (both resumable shard by shard) -----------------------------------------
    t0 = time.perf_counter()
    sampled = sample_shards(cfg, sft, splits, ctx.out_dir / "samples")
    if sampled is None:
        return
    sample_seconds = time.perf_counter() - t0
    cache = JudgeCache(ctx.cache_folder(cfg.cache_dir, "judge"), judge.name)
    judging = Judging(judge, cache, cfg.judge_batch)
    metrics = judge_splits(cfg, ctx, judging, splits)
    if metrics is None:
        return
    judge.close()

    # -- save ------------------------------------------------------------------------------------
    train = metrics["train"]
    ctx.lineage = lineage_for(sft, adapter=False, kind="preferences", judge=judge.name, label_source="ai")
    ctx.metrics.update({
        "pairs": train["pairs"], "eval_pairs": metrics.get("eval", {}).get("pairs", 0),
        "position_bias_rate": train["position_bias_rate"], "unparseable_rate": train["unparseable_rate"],
        "mean_abs_margin": train["mean_abs_margin"], "gold_agreement": train["gold_agreement"],
        # Pairs (both orders) per second of judge time, cache hits excluded; None when everything was cached.
        "judge_pairs_per_s": round(judging.judged / judging.seconds, 3) if judging.seconds else None,
        "judged": judging.judged, "cache_hits": cache.hits, "judge_seconds": round(judging.seconds, 2),
        "sampled_prompts": sampled, "sample_seconds": round(sample_seconds, 2), "splits": metrics,
        "judge": judge.name, "peak_rss_mb": round(peak_rss_mb(), 1),
    })
