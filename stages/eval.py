"""Stage `eval`: compare trained policies (DPO, PPO, ...) with a baseline (the SFT model) on held-out prompts.

For every policy in `policies` and the `baseline`, on the same prompts:
- generate a response (greedy by default, or sampled), batched;
- score it with the run's reward model (`reward: true`);
- ask the judge (the RLAIF judge, `alignment.judges`) which of policy / baseline response is better, in both
  orders, and count the policy's win rate (ties count half; bootstrap CI over prompts);
- estimate KL(policy || baseline) on responses sampled from the policy (exact per-token KL, `alignment.dpo`);
- measure response length and a gold metric no stage trained on (`gold: module:function`, default: the
  fraction of responses meeting every verifiable constraint of their prompt, `alignment.gold`);
- answer further prompt sets (`prompt_sets`, default the bundled held-out phrasings and held-out kinds) and
  report the gold pass rate per set and per constraint kind with bootstrap 95% CIs (`splits`), so a gain on
  prompts shaped like the training data is told apart from one that transfers;
- measure forgetting (`forgetting`): each model's perplexity on general text (data/general/heldout.jsonl) and
  its gold pass rate on kinds no stage trained on, against the base model's.

Prompts: any prompt file (`alignment.prompts`; default the bundled held-out instructions) or an MT-bench
`question.jsonl` (first turn of each question; `data/eval/mt_bench_question.jsonl`).
Writes `metrics.json` (also the manifest's metrics), `samples.jsonl` (every generation on the main prompts with
its scores; the tracker shows it as a table), `samples_sets.jsonl` (the further sets' and the base's answers),
`plots/*.png` and a self-contained `report.html` (alignment/report.py).
Figures and the method in detail: docs/eval.md.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import logging
import time
from pathlib import Path

from alignment import generation
from alignment.answer_cache import AnswerCache
from alignment.config import Section, StageConfig
from alignment.errors import ConfigError, DataError
from alignment.judges import JudgeSpec
from alignment.tracking import SAMPLES

log = logging.getLogger("align")
MODEL_STAGES = ("base", "sft", "dpo", "online_dpo", "ppo", "grpo")
SET_SAMPLES = "samples_sets.jsonl"
"""Answers to the further prompt sets (and the base model's), beside samples.jsonl (the main prompts)."""


class GenerationSpec(generation.GenerationSpec):
    """The shared `alignment.generation` spec with eval's sampling defaults (used when do_sample is true)."""

    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 64
    """Prompts per generate call (memory permitting): on CPU the big lever (bf16 HF: 212 tok/s at 8, 470 at 64)."""


class ForgettingSpec(Section):
    text: str | None = "data/general/heldout.jsonl"
    """General text (JSONL rows with a `text` field) whose perplexity each model gets (None: no perplexity)."""
    max_texts: int | None = None
    batch_size: int = 8
    max_length: int = 256
    """Tokens per text at most (a longer text is cut)."""
    base: bool = True
    """Also evaluate the run's base model: its perplexity and gold pass rates are the reference each model is
    compared with (`ppl_ratio`, `heldout_kinds_gold_change`)."""
    base_sets: list[str] | None = None
    """Prompt sets the base model answers (None: all); it needs at least `heldout_set` for the gold change."""
    heldout_set: str = "heldout_kinds"
    """The prompt set (constraint kinds no stage trained on) whose gold pass rate is the forgetting figure."""


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
    prompts_name: str = "in_distribution"
    """The name of the `prompts` set in the per-set gold metrics (`splits`)."""
    prompt_sets: dict[str, str] = {"heldout_phrasings": "data/instruct/eval_heldout_phrasings.jsonl",
                                   "heldout_kinds": "data/instruct/eval_heldout_kinds.jsonl"}
    """Further prompt sets (name -> prompt file) every model answers, scored by the gold function only: pass rate
    per set and per kind with bootstrap CIs. The judge, reward model and KL use `prompts` alone. {}: none."""
    max_set_prompts: int | None = None
    """Prompts per further set (None: as max_prompts)."""
    forgetting: ForgettingSpec | None = ForgettingSpec()
    """What each model keeps of the base (None: skip)."""
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
    cache_dir: str | None = None
    """Where each model's answers, reward scores and verdicts are kept by a hash of everything that decides them
    (alignment.answer_cache), so a model already answered with the same settings is not answered again, e.g.
    when a policy joins the report. None: `<artifact root>/.cache/eval`; "none": no cache."""

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
        if self.max_set_prompts is not None and self.max_set_prompts < 1:
            out.append(("max_set_prompts", "expected at least 1 (or leave unset)"))
        if self.cache_dir not in (None, "none") and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            out.append(("cache_dir", f"{self.cache_dir} is a file; expected a folder (or none: no cache)"))
        if self.prompts_name in self.prompt_sets:
            out.append((f"prompt_sets.{self.prompts_name}", "names the main prompts set (prompts_name) too"))
        return out + self._forgetting_problems()

    def _forgetting_problems(self) -> list[tuple[str, str]]:
        f, sets = self.forgetting, [self.prompts_name, *self.prompt_sets]
        if f is None:
            return []
        out = []
        if f.batch_size < 1 or f.max_length < 2 or (f.max_texts is not None and f.max_texts < 1):
            out.append(("forgetting", "batch_size >= 1, max_length >= 2 and max_texts >= 1 (or unset) expected"))
        if self.gold and f.heldout_set not in sets:
            out.append(("forgetting.heldout_set", f"expected one of the prompt sets ({', '.join(sets)}), "
                                                  f"got {f.heldout_set!r}"))
        for i, s in enumerate(f.base_sets or []):
            if s not in sets:
                out.append((f"forgetting.base_sets.{i}", f"expected one of the prompt sets ({', '.join(sets)})"))
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
    if cfg.forgetting is not None and cfg.forgetting.base:
        names.append("base")
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


# -- prompt sets, general text and perplexity --------------------------------------------------------


def load_prompt_sets(cfg: Config) -> dict[str, list[dict]]:
    """The main prompts and every further set, by name (main first)."""
    sets = {cfg.prompts_name: load_eval_prompts(cfg.prompts, cfg.max_prompts, cfg.prompts_split)}
    limit = cfg.max_set_prompts if cfg.max_set_prompts is not None else cfg.max_prompts
    for name, source in cfg.prompt_sets.items():
        sets[name] = load_eval_prompts(source, limit, cfg.prompts_split)
    return sets


def load_general_texts(spec: ForgettingSpec | None) -> list[str]:
    """The forgetting text set: each row's non-empty `text` (none when perplexity is off)."""
    from alignment.data import read_rows

    if spec is None or spec.text is None:
        return []
    texts = []
    for rowno, row in read_rows(spec.text, "test"):
        if spec.max_texts is not None and len(texts) >= spec.max_texts:
            break
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{spec.text}: row {rowno}: text: expected a non-empty string")
        texts.append(text)
    if not texts:
        raise DataError(f"{spec.text}: no rows")
    return texts


def text_perplexity(model, tok, texts: list[str], spec: ForgettingSpec) -> dict:
    """Token-weighted perplexity of `model` on plain `texts` (no chat template), batched, right-padded."""
    import torch
    from tqdm.auto import tqdm

    from alignment.evaluation import perplexity

    device = next(model.parameters()).device
    nll, n_tokens = 0.0, 0
    old_side, tok.padding_side = tok.padding_side, "right"
    try:
        for start in tqdm(range(0, len(texts), spec.batch_size), desc="perplexity", unit="batch", leave=False):
            enc = tok(texts[start:start + spec.batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=spec.max_length).to(device)
            with torch.no_grad():
                logits = model(**enc).logits
            # A soft prompt's virtual tokens come first in its logits; score the text's positions only.
            logits = logits[:, -enc["input_ids"].shape[1]:-1].float()
            target, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll += float(losses[mask].sum())
            n_tokens += int(mask.sum())
    finally:
        tok.padding_side = old_side
    return {"ppl": perplexity(nll, n_tokens), "nll_per_token": nll / n_tokens, "tokens": n_tokens}


def answer_plan(cfg: Config, sets: dict[str, list[dict]]) -> list[tuple[str, list[str]]]:
    """(model, the prompt sets it answers): the baseline and every policy answer all of them; the base model,
    when forgetting asks for it, its `base_sets`."""
    plan = [(name, list(sets)) for name in (cfg.baseline, *cfg.policies)]
    f = cfg.forgetting
    if f is not None and f.base and "base" not in (cfg.baseline, *cfg.policies):
        plan.append(("base", [s for s in sets if f.base_sets is None or s in f.base_sets]))
    return plan


def answer_key(cfg: Config, ctx, name: str, set_names: list[str], sets: dict, texts: list[str]) -> str:
    """Everything that decides a model's answers, perplexity and KL (alignment.answer_cache); not which other
    models the report compares, so adding a policy leaves the others' keys alone."""
    from alignment.answer_cache import code_version, digest
    from alignment.hardware import resolve_precision

    f, kl = cfg.forgetting, name in cfg.policies and cfg.kl.prompts > 0
    return digest({"model": ctx.inputs[name].manifest_sha256, "tokenizer": ctx.inputs[cfg.baseline].manifest_sha256,
                   "precision": resolve_precision(cfg.precision), "seed": cfg.seed, "code": code_version(),
                   "generation": cfg.generation.model_dump(mode="json"),
                   "prompts": {s: digest([r["prompt"] for r in sets[s]]) for s in set_names},
                   "ppl": [digest(texts), f.batch_size, f.max_length] if texts else None,
                   "kl": [ctx.inputs[cfg.baseline].manifest_sha256, cfg.kl.model_dump(mode="json")] if kl else None})


def answer_all(cfg: Config, ctx, tok, sets: dict[str, list[dict]], cache) -> tuple[dict, dict, dict, dict]:
    """Responses of every model to its prompt sets ({set: {model: generated}}), KL of each policy to the
    baseline on the main prompts, each model's perplexity, and each model's cache key. A model whose key is in
    the cache is not loaded; otherwise one policy is in memory at a time, next to the baseline (the KL reference)."""
    from functools import partial

    from alignment.answer_cache import is_answers

    texts = load_general_texts(cfg.forgetting)
    responses: dict[str, dict] = {s: {} for s in sets}
    kl, ppl, keys, baseline = {}, {}, {}, {}
    for name, names in answer_plan(cfg, sets):
        keys[name] = answer_key(cfg, ctx, name, names, sets, texts)
        got = cache.get("answers", name, keys[name], partial(is_answers, counts={s: len(sets[s]) for s in names}))
        if got is None:
            got = answer_one(cfg, ctx, tok, name, {s: sets[s] for s in names}, texts, baseline)
            cache.put(keys[name], got)
        for s in names:
            responses[s][name] = got["responses"][s]
        if got["ppl"]:
            ppl[name] = got["ppl"]
        if got["kl"]:
            kl[name] = got["kl"]
    baseline.clear()
    gc.collect()
    return responses, kl, ppl, keys


def answer_one(cfg: Config, ctx, tok, name: str, sets: dict[str, list[dict]], texts: list[str], baseline: dict) -> dict:
    """One model's answers, perplexity and (a policy) KL to the baseline, as the cache keeps them. `baseline`
    holds the loaded baseline model between calls (it is the KL reference of every policy)."""
    from alignment.dpo import sampled_kl, separate_reference
    from alignment.policy import load_policy

    def load(stage: str):
        return load_policy(ctx.inputs[stage], cfg.precision).eval().requires_grad_(False)

    if name == cfg.baseline and name not in baseline:
        baseline[name] = load(name)
    model = baseline[name] if name in baseline else load(name)
    out = {"responses": {s: generate(model, tok, [r["prompt"] for r in rows], cfg.generation, seed=cfg.seed,
                                     desc=f"{name} {s}") for s, rows in sets.items()},
           "ppl": text_perplexity(model, tok, texts, cfg.forgetting) if texts else None, "kl": None}
    if name in cfg.policies and cfg.kl.prompts:
        if cfg.baseline not in baseline:
            baseline[cfg.baseline] = load(cfg.baseline)
        reference = functools.partial(separate_reference, baseline[cfg.baseline])  # sampled_kl's reference_ctx
        main = [r["prompt"] for r in sets[cfg.prompts_name]]
        out["kl"] = sampled_kl(model, reference, tok, main[: cfg.kl.prompts], max_new_tokens=cfg.kl.max_new_tokens,
                               batch_size=cfg.generation.batch_size, seed=cfg.seed)
        log.info("[eval] KL(%s || %s) = %.4f nats per response (%.4f per token)", name, cfg.baseline,
                 out["kl"]["kl_seq"], out["kl"]["kl_per_token"])
    del model
    gc.collect()
    return out


def split_metrics(cfg: Config, sets: dict[str, list[dict]], responses: dict, fn) -> tuple[dict, dict]:
    """Gold scores ({set: {model: [score]}}) and the per-set summary: pass rate per model and per kind, 95% CI,
    and each policy's paired gain over the baseline (`gold_gain`: mean and CI of its per-prompt differences)."""
    from alignment import evaluation as ev

    scores, out = {}, {}
    sources = {cfg.prompts_name: cfg.prompts, **cfg.prompt_sets}
    for s, rows in sets.items():
        scores[s] = {name: fn(rows, r["text"]) for name, r in responses[s].items()}
        kinds = [row.get("category") for row in rows]
        wordings = [ev.wording_of(row) for row in rows]
        models = {name: ev.gold_summary(sc, kinds, seed=cfg.seed) for name, sc in scores[s].items()}
        base = scores[s].get(cfg.baseline)
        strict = {name: ev.finished_only(sc, responses[s][name]["eos"]) for name, sc in scores[s].items()}
        for name, m in models.items():
            if m is None:
                continue
            # Cut answers fail: the checker scores a cut text, and a policy that runs on past the budget collects
            # the "at least N words / sentences" constraints (docs/algorithms.md)
            m.update(finished_rate=ev.mean([float(e) for e in responses[s][name]["eos"]]),
                     pass_rate_strict=ev.mean([g for g in strict[name] if g is not None]))
            if name == cfg.baseline or base is None:
                continue
            # Paired by prompt against the baseline (what "beats SFT on held-out phrasings" is read from); where
            # the rows name their wordings (template ids), also the CI over wordings (docs/eval.md)
            for key, mine, theirs in (("gold_gain", scores[s][name], base),
                                      ("gold_gain_strict", strict[name], strict[cfg.baseline])):
                kept = [(a - b, w) for a, b, w in zip(mine, theirs, wordings, strict=True)
                        if a is not None and b is not None]
                if kept:
                    labels = [w for _, w in kept]
                    m[key] = ev.distribution([d for d, _ in kept], None if None in labels else labels)
        out[s] = {"source": sources[s], "prompts": len(rows),
                  "models": {name: m for name, m in models.items() if m is not None}}
    return scores, out


def forgetting_metrics(cfg: Config, ppl: dict, splits: dict) -> dict:
    """Perplexity and held-out-kind gold per model against the base model (or the baseline when there is none)."""
    from alignment import evaluation as ev

    held = splits.get(cfg.forgetting.heldout_set, {}).get("models", {})
    gold = {name: m["pass_rate"] for name, m in held.items()}
    reference = "base" if "base" in ppl or "base" in gold else cfg.baseline
    out = ev.forgetting_summary({n: p["ppl"] for n, p in ppl.items()}, gold, reference)
    out.update(text=cfg.forgetting.text, heldout_set=cfg.forgetting.heldout_set,
               tokens=next(iter(ppl.values()))["tokens"] if ppl else 0)
    return out


# -- the stage -------------------------------------------------------------------------------------


def reward_scores(cfg: Config, ctx, names: list[str], prompts: list, responses: dict, cache, keys: dict) -> dict:
    """The run's reward model's score of every model's answer to the main prompts (cached per model's answers)."""
    from alignment.answer_cache import digest, is_numbers

    rm_art, rewards, todo = ctx.inputs["reward"], {}, []
    for name in names:
        key = digest({"answers": keys[name], "reward": rm_art.manifest_sha256, "batch_size": cfg.reward_batch_size})
        rewards[name] = cache.get("rewards", name, key, lambda v: is_numbers(v, len(prompts)))
        if rewards[name] is None:
            todo.append((name, key))
    if todo:
        from alignment.reward import load_reward_model, score_conversations

        rm, rm_tok = load_reward_model(rm_art.model_dir, cfg.precision)
        for name, key in todo:
            convs = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, responses[name]["text"])]
            rewards[name], _ = score_conversations(rm, rm_tok, convs, batch_size=cfg.reward_batch_size)
            cache.put(key, rewards[name])
        del rm
        gc.collect()
    return rewards


def judge_verdicts(cfg: Config, ctx, prompts: list, responses: dict, cache, keys: dict,
                   rewards: dict) -> tuple[dict, str]:
    """The judge's verdicts of each policy against the baseline on the main prompts, and the judge's name. A local
    or reward-model judge's verdicts are cached per pair of answers (its name pins its weights and template); a
    served judge's name learns the server's identity only with the first call, so it is asked every time. A
    reward-model judge on the run's own reward model takes the answers' scores from `rewards` (the eval already
    scored them with that model) instead of loading and running it again."""
    from alignment.answer_cache import AnswerCache, digest
    from alignment.judge_local import RewardModelJudge
    from alignment.judges import Verdict, build_judge

    judge = build_judge(cfg.judge, ctx.inputs, cfg.precision)
    cache = cache if cfg.judge.kind in ("local", "reward_model") else AnswerCache(None)
    verdicts = {}
    for name in cfg.policies:
        key = digest({"judge": judge.name, "a": keys[name], "b": keys[cfg.baseline]})
        got = cache.get("verdicts", name, key, lambda v: len(v) == len(prompts) and [Verdict(**x) for x in v])
        if got is not None:
            verdicts[name] = [Verdict(**x) for x in got]
            continue
        if isinstance(judge, RewardModelJudge) and "reward" in ctx.inputs and \
                judge.artifact.path == ctx.inputs["reward"].path and name in rewards and cfg.baseline in rewards:
            verdicts[name] = judge.from_scores(rewards[name], rewards[cfg.baseline])
        else:
            verdicts[name] = judge.compare(prompts, responses[name]["text"], responses[cfg.baseline]["text"])
        cache.put(key, [v.to_json() for v in verdicts[name]])
    name = judge.name
    judge.close()
    del judge
    gc.collect()
    return verdicts, name


def write_samples(cfg: Config, out_dir: Path, everything: list[dict], names: list[str]) -> list[dict]:
    """samples.jsonl: the main prompts' baseline and policy answers (the tracker's table, returned); the further
    sets and the base model's answers go to samples_sets.jsonl."""
    main = [s["split"] == cfg.prompts_name and s["policy"] in names for s in everything]
    samples = [s for s, m in zip(everything, main) if m]
    for file, rows_out in ((SAMPLES, samples), (SET_SAMPLES, [s for s, m in zip(everything, main) if not m])):
        with (out_dir / file).open("w", encoding="utf-8") as f:
            for s in rows_out:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return samples


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    from alignment.models import load_tokenizer
    from alignment.report import write_eval_report

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    sets = load_prompt_sets(cfg)
    rows = sets[cfg.prompts_name]
    prompts = [r["prompt"] for r in rows]
    baseline_art = ctx.inputs[cfg.baseline]
    tok = load_tokenizer(baseline_art.model_dir)
    names = [cfg.baseline, *cfg.policies]
    log.info("[eval] %d prompts from %s%s; %s vs baseline %s", len(rows), cfg.prompts,
             "".join(f", {len(v)} {k}" for k, v in sets.items() if k != cfg.prompts_name), ", ".join(cfg.policies),
             cfg.baseline)

    # -- generate every set, KL to the baseline while both models are loaded, perplexity ------------
    cache = AnswerCache(ctx.cache_folder(cfg.cache_dir, "eval"))  # beside the label stage's judge cache
    all_responses, kl, ppl, keys = answer_all(cfg, ctx, tok, sets, cache)
    responses = all_responses[cfg.prompts_name]
    gen_s = time.perf_counter() - t0

    # -- reward model; judge: each policy against the baseline, both orders --------------------------
    rewards = reward_scores(cfg, ctx, names, prompts, responses, cache, keys) if cfg.reward else {}
    verdicts, judge_name = (judge_verdicts(cfg, ctx, prompts, responses, cache, keys, rewards) if cfg.judge is not None
                            else ({}, None))
    if cache.reused:
        log.info("[eval] from the cache (%s): %s", cache.folder, cache.summary())

    # -- gold, per prompt set and kind; forgetting -----------------------------------------------
    gold, all_gold, splits = {}, {}, {}
    if cfg.gold:
        all_gold, splits = split_metrics(cfg, sets, all_responses, gold_function(cfg.gold))
        gold = {name: all_gold[cfg.prompts_name][name] for name in names}
    forgetting = forgetting_metrics(cfg, ppl, splits) if cfg.forgetting is not None else None

    # -- metrics ---------------------------------------------------------------------------------
    per_model = {name: model_metrics(cfg, name, responses, rewards, gold, verdicts, kl, ppl) for name in names}
    headline = headline_metrics(cfg, per_model, splits)
    ctx.metrics.update({**headline, "models": per_model, "prompts": len(rows), "prompts_source": cfg.prompts,
                        "judge": judge_name, "splits": splits,
                        **({"forgetting": forgetting} if forgetting is not None else {}),
                        "cache_reused": cache.reused, "generate_seconds": round(gen_s, 2),
                        "eval_seconds": round(time.perf_counter() - t0, 2)})

    # -- save ------------------------------------------------------------------------------------
    samples = write_samples(cfg, ctx.out_dir, collect_samples(cfg, sets, all_responses, all_gold, rewards, verdicts),
                            names)
    histories = {name: ctx.inputs[name].path / "log_history.jsonl" for name in cfg.policies}
    write_eval_report(ctx.out_dir, metrics=ctx.metrics, samples=samples,
                      histories=histories, rewards=rewards, lengths={n: responses[n]["tokens"] for n in names},
                      inputs={k: str(a.path) for k, a in ctx.inputs.items()}, baseline=cfg.baseline,
                      policies=cfg.policies, run=ctx.run, shown=cfg.report_samples)
    ctx.lineage = {"adapter": False, "evaluated": {n: str(ctx.inputs[n].path) for n in cfg.policies},
                   "baseline": str(baseline_art.path), "parent_stage": cfg.policies[0]}
    log.info("[eval] %s; report.html and plots/ are in the artifact",
             summary_line(names, per_model, splits, forgetting))


def model_metrics(cfg: Config, name: str, responses: dict, rewards: dict, gold: dict, verdicts: dict, kl: dict,
                  ppl: dict) -> dict:
    """One model's figures on the main prompts (and its perplexity): length, reward, gold, judge, KL, gains."""
    from alignment import evaluation as ev

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
    if name in ppl:
        m["perplexity"] = ppl[name]
    if name in rewards and name != cfg.baseline:
        diffs = [a - b for a, b in zip(rewards[name], rewards[cfg.baseline])]
        m["reward_gain"] = ev.distribution(diffs)
    if scored and name != cfg.baseline:
        # Paired by prompt: tighter than comparing the two pass rates' own intervals.
        diffs = [a - b for a, b in zip(gold[name], gold[cfg.baseline]) if a is not None and b is not None]
        m["gold_gain"] = ev.distribution(diffs)
    return m


def headline_metrics(cfg: Config, per_model: dict, splits: dict) -> dict:
    """The first policy's headline figures, including its gold pass rate on every prompt set."""
    first = cfg.policies[0]
    m = per_model[first]
    headline = {"policy": first, "baseline": cfg.baseline}
    for key, value in (("win_rate", m.get("judge", {}).get("win_rate")),
                       ("mean_reward", m.get("reward", {}).get("mean")), ("kl", m.get("kl", {}).get("kl_seq")),
                       ("gold_pass_rate", m.get("gold", {}).get("pass_rate"))):
        if value is not None:
            headline[key] = value
    for s, split in splits.items():
        if first in split["models"]:
            headline[f"gold_pass_rate_{s}"] = split["models"][first]["pass_rate"]
    return headline


def collect_samples(cfg: Config, sets: dict, responses: dict, gold: dict, rewards: dict, verdicts: dict) -> list[dict]:
    """Every generation of every set with its scores (reward and judge on the main set only)."""
    samples = []
    for set_name, rows in sets.items():
        main = set_name == cfg.prompts_name
        for i, row in enumerate(rows):
            for name, r in responses[set_name].items():
                s = {"id": row.get("id", row["row"]), "split": set_name, "policy": name,
                     "prompt": row["prompt"][-1]["content"], "response": r["text"][i], "tokens": r["tokens"][i]}
                if row.get("category") is not None:
                    s["category"] = row["category"]
                if main and name in rewards:
                    s["reward"] = rewards[name][i]
                g = gold.get(set_name, {}).get(name)
                if g and g[i] is not None:
                    s["gold"] = g[i]
                if main and name in verdicts:
                    s["p_beats_baseline"] = verdicts[name][i].p_a
                samples.append(s)
    return samples


def summary_line(names: list[str], per_model: dict, splits: dict, forgetting: dict | None) -> str:
    """One log line: each model's headline figures, then gold per set and perplexity."""
    parts = []
    for n in names:
        m = per_model[n]
        figures = (("win", m.get("judge", {}).get("win_rate")), ("reward", m.get("reward", {}).get("mean")),
                   ("kl", m.get("kl", {}).get("kl_seq")), ("gold", m.get("gold", {}).get("pass_rate")))
        figures += tuple((f"gold[{s}]", v["models"].get(n, {}).get("pass_rate")) for s, v in list(splits.items())[1:])
        figures += (("ppl", (forgetting or {}).get("ppl", {}).get(n)),)
        parts.append(f"{n}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures if v is not None))
    return "; ".join(parts)
