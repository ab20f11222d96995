"""Stage `eval`: compare trained policies (DPO, PPO, ...) with a baseline (the SFT model) on held-out prompts.

For every policy in `policies` and the `baseline`, on the same prompts:
- generate a response (greedy by default, or sampled), batched;
- score it with the run's reward model (`reward: true`);
- ask the judge (the RLAIF judge, `alignment.judges`) which of policy / baseline response is better, in both
  orders, and count the policy's win rate (ties count half; bootstrap CI over prompts);
- estimate KL(policy || baseline) on responses sampled from the policy (exact per-token KL, `alignment.dpo`);
- measure response length and a gold metric no stage trained on (`gold: module:function`, default: the
  fraction of responses meeting every verifiable constraint of their prompt, `alignment.gold`).

Prompts: any prompt file (`alignment.prompts`; default the bundled held-out instructions) or an MT-bench
`question.jsonl` (first turn of each question; `data/eval/mt_bench_question.jsonl`).
Writes `metrics.json` (also the manifest's metrics), `samples.jsonl` (every generation with its scores; the
tracker shows it as a table), `plots/*.png` and a self-contained `report.html` (alignment/report.py).
Figures and the method in detail: docs/eval.md.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import logging
import time

from alignment import generation
from alignment.config import Section, StageConfig
from alignment.errors import ConfigError, DataError
from alignment.judges import JudgeSpec
from alignment.tracking import SAMPLES

log = logging.getLogger("align")
MODEL_STAGES = ("base", "sft", "dpo", "ppo")


class GenerationSpec(generation.GenerationSpec):
    """The shared `alignment.generation` spec with eval's sampling defaults (used when do_sample is true)."""

    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 64
    """Prompts per generate call (memory permitting): on CPU the big lever (bf16 HF: 212 tok/s at 8, 470 at 64)."""


class KLSpec(Section):
    prompts: int = 32
    """Prompts on which KL(policy || baseline) is estimated from sampled responses (0: skip)."""
    max_new_tokens: int = 32


class Config(StageConfig):
    policies: list[str] = ["dpo"]
    """Stages of the run to evaluate (dpo, ppo, sft, ...), each compared with the baseline."""
    baseline: str = "sft"
    prompts: str = "data/instruct/eval.jsonl"
    """Held-out prompts: a prompt file (alignment.prompts), a `datasets` name/path, or an MT-bench question.jsonl."""
    prompts_split: str = "test"
    max_prompts: int | None = None
    generation: GenerationSpec = GenerationSpec()
    reward: bool = True
    """Score every response with the run's `reward` model."""
    reward_batch_size: int = 16
    judge: JudgeSpec | None = JudgeSpec(kind="local", model="base")
    """The pairwise judge (None: no win rate). Default: the run's base model as a local judge."""
    tie_band: float = 0.0
    """A verdict within 0.5 +- tie_band counts as a tie."""
    kl: KLSpec = KLSpec()
    gold: str | None = "alignment.evaluation:constraint_gold"
    """`module:function(rows, responses) -> list[float | None]`; None values are not counted (None: skip)."""
    report_samples: int = 12
    """Generations shown in report.html (all of them go to samples.jsonl)."""

    def problems(self):
        out = []
        for i, p in enumerate(self.policies):
            if p not in MODEL_STAGES:
                out.append((f"policies.{i}", f"expected a policy stage ({', '.join(MODEL_STAGES)}), got {p!r}"))
            if p == self.baseline:
                out.append((f"policies.{i}", f"'{p}' is also the baseline; compare it with another stage"))
        if not self.policies:
            out.append(("policies", "expected at least one policy stage to evaluate"))
        if self.baseline not in MODEL_STAGES:
            out.append(("baseline", f"expected one of {', '.join(MODEL_STAGES)}, got {self.baseline!r}"))
        if len(set(self.policies)) != len(self.policies):
            out.append(("policies", "a stage is listed twice"))
        if self.judge is not None:
            out += self.judge.problems("judge")
        if self.gold and ":" not in self.gold:
            out.append(("gold", f"expected module:function, got {self.gold!r}"))
        out += self.generation.problems("generation")
        if self.kl.prompts < 0 or self.kl.max_new_tokens < 1:
            out.append(("kl", "prompts >= 0 and max_new_tokens >= 1 expected"))
        if not 0 <= self.tie_band < 0.5:
            out.append(("tie_band", f"expected 0 <= tie_band < 0.5, got {self.tie_band}"))
        if self.max_prompts is not None and self.max_prompts < 1:
            out.append(("max_prompts", "expected at least 1 (or leave unset)"))
        return out


def upstream(cfg: Config) -> tuple[str, ...]:
    names = [cfg.baseline, *cfg.policies]
    if cfg.reward:
        names.append("reward")
    j = cfg.judge
    if j is not None and j.kind == "local" and (j.model or "sft") in MODEL_STAGES:
        names.append(j.model or "sft")
    if j is not None and j.kind == "reward_model" and not j.reward_artifact:
        names.append("reward")
    return tuple(dict.fromkeys(names))


# -- prompts ---------------------------------------------------------------------------------------


def load_eval_prompts(source: str, limit: int | None, split: str) -> list[dict]:
    """Prompt records (alignment.prompts layout); MT-bench rows (`turns`) become their first user turn."""
    from alignment.data import read_rows
    from alignment.prompts import load_prompts

    first = next(iter(read_rows(source, split)), None)
    if first is None:
        raise DataError(f"{source}: no rows")
    if "turns" not in first[1]:
        return load_prompts(source, limit, split)
    out = []
    for rowno, row in read_rows(source, split):
        if limit is not None and len(out) >= limit:
            break
        turns = row.get("turns")
        if not (isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0].strip()):
            raise DataError(f"{source}: row {rowno}: turns: expected a list of question strings (MT-bench)")
        rec = {"prompt": [{"role": "user", "content": turns[0]}], "row": rowno,
               "id": row.get("question_id", rowno), "category": str(row.get("category", "mt_bench"))}
        ref = row.get("reference")
        if isinstance(ref, list) and ref and isinstance(ref[0], str):
            rec["reference"] = ref[0]
        out.append(rec)
    return out


def gold_function(spec: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError([f"gold: cannot load {spec!r} ({e})"]) from None


# -- generation ------------------------------------------------------------------------------------


def generate(model, tok, prompts: list[list[dict]], spec: GenerationSpec, *, seed: int, desc: str) -> dict:
    """Responses in prompt order: {"text", "tokens" (generated length, EOS not counted), "eos" (stopped by itself)}."""
    with generation.build_engine(spec, model, tok) as engine:
        ro = engine.generate(prompts, spec, seed=seed, desc=desc)
    eos = ro.has_eos.tolist()
    return {"text": ro.texts, "tokens": [n - e for n, e in zip(ro.lengths, eos)], "eos": eos}


# -- the stage -------------------------------------------------------------------------------------


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    from alignment import evaluation as ev
    from alignment.dpo import sampled_kl, separate_reference
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.report import write_eval_report

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    rows = load_eval_prompts(cfg.prompts, cfg.max_prompts, cfg.prompts_split)
    prompts = [r["prompt"] for r in rows]
    baseline_art = ctx.inputs[cfg.baseline]
    tok = load_tokenizer(baseline_art.model_dir)
    names = [cfg.baseline, *cfg.policies]
    log.info("[eval] %d prompts from %s; %s vs baseline %s", len(rows), cfg.prompts, ", ".join(cfg.policies),
             cfg.baseline)

    # -- generate, and KL to the baseline while both models are loaded ----------------------------
    baseline = load_policy(baseline_art, cfg.precision).eval().requires_grad_(False)
    responses = {cfg.baseline: generate(baseline, tok, prompts, cfg.generation, seed=cfg.seed, desc=cfg.baseline)}
    reference = functools.partial(separate_reference, baseline)  # sampled_kl's reference_ctx
    kl = {}
    for name in cfg.policies:
        policy = load_policy(ctx.inputs[name], cfg.precision).eval().requires_grad_(False)
        responses[name] = generate(policy, tok, prompts, cfg.generation, seed=cfg.seed, desc=name)
        if cfg.kl.prompts:
            kl[name] = sampled_kl(policy, reference, tok, prompts[: cfg.kl.prompts],
                                  max_new_tokens=cfg.kl.max_new_tokens, batch_size=cfg.generation.batch_size,
                                  seed=cfg.seed)
            log.info("[eval] KL(%s || %s) = %.4f nats per response (%.4f per token)", name, cfg.baseline,
                     kl[name]["kl_seq"], kl[name]["kl_per_token"])
        del policy
        gc.collect()
    del baseline, reference
    gc.collect()
    gen_s = time.perf_counter() - t0

    # -- reward model ----------------------------------------------------------------------------
    rewards = {}
    if cfg.reward:
        from alignment.reward import load_reward_model, score_conversations

        rm, rm_tok = load_reward_model(ctx.inputs["reward"].model_dir, cfg.precision)
        for name in names:
            convs = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, responses[name]["text"])]
            rewards[name], _ = score_conversations(rm, rm_tok, convs, batch_size=cfg.reward_batch_size)
        del rm
        gc.collect()

    # -- judge: each policy against the baseline, both orders --------------------------------------
    verdicts, judge_name = {}, None
    if cfg.judge is not None:
        from alignment.judges import build_judge

        judge = build_judge(cfg.judge, ctx.inputs, cfg.precision)
        for name in cfg.policies:
            verdicts[name] = judge.compare(prompts, responses[name]["text"], responses[cfg.baseline]["text"])
        judge_name = judge.name
        judge.close()
        del judge
        gc.collect()

    # -- gold ------------------------------------------------------------------------------------
    gold = {}
    if cfg.gold:
        fn = gold_function(cfg.gold)
        gold = {name: fn(rows, responses[name]["text"]) for name in names}

    # -- metrics ---------------------------------------------------------------------------------
    per_model = {}
    for name in names:
        r = responses[name]
        m = {"length_tokens": ev.length_stats(r["tokens"]), "missing_eos_rate": 1 - sum(r["eos"]) / len(r["eos"])}
        if name in rewards:
            m["reward"] = ev.distribution(rewards[name])
        scored = [g for g in gold.get(name, []) if g is not None]
        if scored:
            lo, hi = ev.bootstrap_ci(scored, seed=cfg.seed)
            m["gold"] = {"pass_rate": ev.mean(scored), "pass_rate_ci": [lo, hi], "n": len(scored)}
        if name in verdicts:
            v = verdicts[name]
            m["judge"] = ev.win_summary([x.p_a for x in v], disagree=[x.disagree for x in v],
                                        parsed=[x.parsed for x in v], tie_band=cfg.tie_band, seed=cfg.seed)
        if name in kl:
            m["kl"] = kl[name]
        if name in rewards and name != cfg.baseline:
            diffs = [a - b for a, b in zip(rewards[name], rewards[cfg.baseline])]
            m["reward_gain"] = ev.distribution(diffs)
        if scored and name != cfg.baseline:
            # Paired by prompt: tighter than comparing the two pass rates' own intervals.
            diffs = [a - b for a, b in zip(gold[name], gold[cfg.baseline]) if a is not None and b is not None]
            m["gold_gain"] = ev.distribution(diffs)
        per_model[name] = m
    first = cfg.policies[0]
    headline = {"policy": first, "baseline": cfg.baseline}
    if "judge" in per_model[first]:
        headline["win_rate"] = per_model[first]["judge"]["win_rate"]
    if "reward" in per_model[first]:
        headline["mean_reward"] = per_model[first]["reward"]["mean"]
    if "kl" in per_model[first]:
        headline["kl"] = per_model[first]["kl"]["kl_seq"]
    if "gold" in per_model[first]:
        headline["gold_pass_rate"] = per_model[first]["gold"]["pass_rate"]
    ctx.metrics.update({**headline, "models": per_model, "prompts": len(rows), "prompts_source": cfg.prompts,
                        "judge": judge_name,
                        "generate_seconds": round(gen_s, 2), "eval_seconds": round(time.perf_counter() - t0, 2)})

    # -- save ------------------------------------------------------------------------------------
    samples = []
    for i, row in enumerate(rows):
        for name in names:
            s = {"id": row.get("id", row["row"]), "policy": name, "prompt": row["prompt"][-1]["content"],
                 "response": responses[name]["text"][i], "tokens": responses[name]["tokens"][i]}
            if name in rewards:
                s["reward"] = rewards[name][i]
            if gold.get(name) and gold[name][i] is not None:
                s["gold"] = gold[name][i]
            if name in verdicts:
                s["p_beats_baseline"] = verdicts[name][i].p_a
            samples.append(s)
    with (ctx.out_dir / SAMPLES).open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    histories = {name: ctx.inputs[name].path / "log_history.jsonl" for name in cfg.policies}
    write_eval_report(ctx.out_dir, metrics=ctx.metrics, samples=samples, histories=histories,
                      rewards=rewards, lengths={n: responses[n]["tokens"] for n in names},
                      inputs={k: str(a.path) for k, a in ctx.inputs.items()}, baseline=cfg.baseline,
                      policies=cfg.policies, run=ctx.run, shown=cfg.report_samples)
    ctx.lineage = {"adapter": False, "evaluated": {n: str(ctx.inputs[n].path) for n in cfg.policies},
                   "baseline": str(baseline_art.path), "parent_stage": first}
    summary = "; ".join(
        f"{n}: " + ", ".join(f"{k} {v:.3f}" for k, v in (
            ("win", per_model[n].get("judge", {}).get("win_rate")), ("reward", per_model[n].get("reward", {}).get("mean")),
            ("kl", per_model[n].get("kl", {}).get("kl_seq")), ("gold", per_model[n].get("gold", {}).get("pass_rate")))
            if v is not None) for n in names)
    log.info("[eval] %s; report.html and plots/ are in the artifact", summary)
