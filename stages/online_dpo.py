"""Stage `online_dpo`: iterative DPO on the policy's own samples (the RLHFlow online recipe).

Reads `<run>/sft/` (and `<run>/reward/` when the scorer is the reward model). For each of `online.rounds`
rounds: the current policy (SFT + the previous round's adapter) samples K responses for each of the round's
prompts (`alignment.generation.generate`), a scorer rates them (`scorer:`, an `alignment.reward_sources`
RewardSource: the reward model, the verifiable gold checker `alignment.reward_sources:gold_reward`, or an AI
judge against the reference answer), the best and worst response of each prompt become a preference pair, and
DPO (TRL's DPOTrainer, the same `dpo:` options as the dpo stage) continues the LoRA adapter on those pairs,
with the SFT model (adapter off) as the fixed reference. Pieces: `alignment/online_dpo.py`.

Each round is its own folder, `rounds/<i>/`: `samples.jsonl` (responses + scores), `pairs.jsonl`, `model/` (the
adapter after the round), `log_history.jsonl`, and `round.json` (its metrics and the sha256 of its pairs and
adapter), written last. A killed run resumes after the last finished round (and inside a round from its
samples and its newest trainer checkpoint). `model/` is the last round's adapter: `load_policy` rebuilds
base + SFT + online DPO from the lineage, like a dpo artifact.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path

from alignment import preemption
from alignment.artifacts import remove_tree, write_json
from alignment.config import Section, StageConfig
from alignment.dpo import adapter_disabled, dpo_trainer_class, loss_problems, sampled_kl
from alignment.fused_lora import use_kernel
from alignment.errors import DataError
from alignment.generation import GenerationSpec, generate
from alignment.hardware import peak_rss_mb, resolve_precision
from alignment.judge_local import judge_upstream
from alignment.labeling import read_jsonl, write_jsonl
from alignment.manifest import sha256_file
from alignment.models import load_tokenizer
from alignment.online_dpo import build_pairs, round_prompts, sample_stats, score_groups, load_adapter_weights
from alignment.peft_methods import describe, peft_config
from alignment.policy import lineage_for, load_policy, merge_adapter, require_mergeable, save_on_parent
from alignment.preferences import to_trl_dataset
from alignment.prompts import PromptData, load_prompts
from alignment.reward_sources import RewardSource, text_reward_fn
from alignment.runner import latest_checkpoint
from alignment.schema import PeftSpec, TrainSpec
from alignment.training import callbacks, group_pairs_by_length, save_log_history, train_from, trainer_args
from stages.dpo import DPOSpec, EvalSpec

log = logging.getLogger("align")


class OnlineSpec(Section):
    """The rounds: how many, on how many prompts, and which pairs are kept."""

    rounds: int = 3
    prompts_per_round: int = 64
    """Fresh prompts each round (slices of a seeded permutation of `prompts.train`; a new pass when used up)."""
    min_gap: float = 0.0
    """Drop a prompt when its best and worst score differ by at most this (no preference to learn)."""
    truncation_penalty: float = 0.0
    """Subtracted from the score of a response cut at max_new_tokens without EOS before pairing."""
    score_batch_size: int = 64
    """Responses per scorer call."""


class Config(StageConfig):
    prompts: PromptData = PromptData()
    online: OnlineSpec = OnlineSpec()
    generation: GenerationSpec = GenerationSpec(do_sample=True, num_return_sequences=4, max_new_tokens=64)
    """How the policy samples; num_return_sequences is K (>= 2), do_sample must be on."""
    scorer: RewardSource = RewardSource()
    """What rates each response: kind model (the run's reward model), function (e.g. the gold checker), judge."""
    dpo: DPOSpec = DPOSpec()
    peft: PeftSpec = PeftSpec()
    train: TrainSpec = TrainSpec()
    """Per round: the optimiser restarts each round (epochs / max_steps count within a round)."""
    eval: EvalSpec = EvalSpec()

    def problems(self):
        out = loss_problems([self.dpo.loss_type] if isinstance(self.dpo.loss_type, str) else list(self.dpo.loss_type),
                            self.dpo.loss_weights, self.dpo.label_smoothing, False, self.dpo.beta)
        out += self.prompts.problems("prompts") + self.generation.problems("generation")
        out += self.scorer.problems("scorer") + self.peft.problems("peft")
        if self.peft.method != "lora":
            out.append(("peft.method", f"online_dpo continues one LoRA adapter across rounds, not "
                                       f"'{self.peft.method}'; use method: lora (use_dora/use_rslora allowed)"))
        if self.generation.num_return_sequences < 2:
            out.append(("generation.num_return_sequences", "expected K >= 2 responses per prompt to pair"))
        if not self.generation.do_sample:
            out.append(("generation.do_sample", "expected true: greedy decoding gives K identical responses"))
        if self.generation.backend != "hf":
            out.append(("generation.backend", "online_dpo samples in-process with backend hf"))
        if self.online.rounds < 1 or self.online.prompts_per_round < 1 or self.online.score_batch_size < 1:
            out.append(("online", "rounds, prompts_per_round and score_batch_size must be >= 1"))
        if self.online.min_gap < 0 or self.online.truncation_penalty < 0:
            out.append(("online", "min_gap and truncation_penalty must be >= 0"))
        return out


def upstream(cfg: Config) -> tuple[str, ...]:
    s = cfg.scorer
    names = ["sft"]
    if s.kind == "model" or (s.kind == "judge" and s.judge and s.judge.kind == "reward_model"
                             and not s.judge.reward_artifact):
        names.append("reward")
    if s.kind == "judge" and s.judge is not None:
        names += judge_upstream(s.judge)
    return tuple(dict.fromkeys(names))


# -- one round ---------------------------------------------------------------------------------------


def policy_with_adapter(sft, precision: str, adapter_dir: Path | None, *, merged: bool = False):
    """SFT merged, with the previous round's LoRA adapter on top (None: round 1 samples from the SFT model).
    `merged`: the adapter merged into the weights, for a copy that only samples and is dropped after (nothing to
    undo; at a round's 64 rows an unmerged adapter made each token step 2.26x slower, bench/rollout_weights.py
    --rows 64). Unmerged, the adapter can be switched off (the SFT reference of the held-out KL)."""
    from peft import PeftModel

    model = load_policy(sft, precision)
    if adapter_dir is None:
        return model.eval()
    model = PeftModel.from_pretrained(model, adapter_dir)
    return (merge_adapter(model) if merged else model).eval()


def sample_round(cfg: Config, sft, tok, scorer, items: list[dict], index: int, prev: Path | None) -> list[dict]:
    """Every prompt of the round with its K responses, their scores, finish flags and token counts."""
    model = policy_with_adapter(sft, cfg.precision, prev, merged=True)
    k = cfg.generation.num_return_sequences
    # Seeded per round: a resumed run samples exactly what an uninterrupted one would have.
    rollout = generate(model, tok, [it["prompt"] for it in items], cfg.generation,
                       seed=cfg.seed * 100_003 + index, desc=f"[online_dpo] round {index}: sampling")
    del model
    gc.collect()
    groups = rollout.grouped(k)
    finished = [rollout.has_eos.tolist()[i:i + k] for i in range(0, len(rollout.texts), k)]
    lengths = [rollout.lengths[i:i + k] for i in range(0, len(rollout.texts), k)]
    scores = score_groups(scorer, items, groups, cfg.online.score_batch_size)
    return [{**it, "responses": g, "scores": [round(float(x), 6) for x in s], "finished": f, "lengths": n}
            for it, g, s, f, n in zip(items, groups, scores, finished, lengths)]


def train_round(cfg: Config, sft, tok, rows: list[dict], rdir: Path, prev: Path | None):
    """DPO on the round's pairs, continuing `prev`'s adapter; the reference is the SFT model (adapter off)."""
    from trl import DPOConfig

    policy = load_policy(sft, cfg.precision)
    loss = [cfg.dpo.loss_type] if isinstance(cfg.dpo.loss_type, str) else list(cfg.dpo.loss_type)
    args = DPOConfig(**trainer_args(cfg.train, out_dir=rdir / "checkpoints", seed=cfg.seed, precision=cfg.precision,
                                    report_to=cfg.report_to),
                     max_length=cfg.train.max_length, beta=cfg.dpo.beta, loss_type=loss,
                     loss_weights=cfg.dpo.loss_weights, label_smoothing=cfg.dpo.label_smoothing,
                     precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs)
    trainer = dpo_trainer_class(False)(model=policy, ref_model=None, args=args, processing_class=tok,
                                       peft_config=peft_config(cfg.peft), train_dataset=to_trl_dataset(rows),
                                       callbacks=callbacks())
    use_kernel(trainer.model, cfg.peft)
    group_pairs_by_length(trainer)
    if prev is not None:
        load_adapter_weights(trainer.model, prev)  # the policy continues; the reference stays the SFT model
    resume = latest_checkpoint(rdir / "checkpoints")
    t0 = time.perf_counter()
    result = train_from(trainer, resume)
    return trainer, result, time.perf_counter() - t0


def run_round(cfg: Config, ctx, sft, tok, scorer, prompts: list[dict], index: int, prev: Path | None) -> dict | None:
    """Sample, score, pair, train, save one round into rounds/<index>/; None when stopped for preemption."""
    rdir = ctx.out_dir / "rounds" / str(index)
    t0 = time.perf_counter()
    if not (rdir / "samples.jsonl").is_file():
        picked = round_prompts(len(prompts), cfg.online.prompts_per_round, index - 1, cfg.seed)
        write_jsonl(rdir / "samples.jsonl", sample_round(cfg, sft, tok, scorer, [prompts[i] for i in picked],
                                                         index, prev))
    samples, sample_seconds = read_jsonl(rdir / "samples.jsonl"), time.perf_counter() - t0
    pairs = build_pairs(samples, cfg.online.min_gap, cfg.online.truncation_penalty)
    if not pairs.rows:
        raise DataError(f"online_dpo round {index}: no prompt gave a pair (all {len(samples)} prompts' responses "
                        f"score within online.min_gap={cfg.online.min_gap}); raise generation.temperature or "
                        "num_return_sequences, or use a finer scorer")
    write_jsonl(rdir / "pairs.jsonl", pairs.rows)
    if preemption.requested():
        return None
    trainer, result, train_seconds = train_round(cfg, sft, tok, pairs.rows, rdir, prev)
    if preemption.requested():
        return None  # stopped at a checkpoint inside the round; the same command resumes from it
    save_on_parent(trainer.model, tok, rdir / "model", sft, adapter=True)
    save_log_history(trainer, rdir)
    remove_tree(rdir / "checkpoints")
    last = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    summary = {"round": index, "prompts": len(samples), "pairs": len(pairs.rows),
               "dropped_no_gap": pairs.dropped_no_gap, **sample_stats(samples),
               "train_loss": round(result.training_loss, 6), "steps": result.global_step,
               "train_rewards_accuracy": last[-1]["rewards/accuracies"] if last else None,
               "sample_seconds": round(sample_seconds, 2), "train_seconds": round(train_seconds, 2),
               "pairs_sha256": sha256_file(rdir / "pairs.jsonl"),
               "adapter_sha256": sha256_file(rdir / "model" / "adapter_model.safetensors")}
    write_json(rdir / "round.json", summary)  # last: its presence marks the round finished
    del trainer
    gc.collect()
    log.info("[online_dpo] round %d: %d pairs from %d prompts; policy's mean score %.3f (best of K %.3f), "
             "finished %.2f, mean length %.1f; DPO loss %.3f in %d steps", index, summary["pairs"],
             summary["prompts"], summary["mean_score"], summary["mean_best_score"], summary["finished_rate"],
             summary["mean_length"], summary["train_loss"], summary["steps"])
    return summary


def finished_round(ctx, index: int) -> dict | None:
    path = ctx.out_dir / "rounds" / str(index) / "round.json"
    return json.loads(path.read_text()) if path.is_file() else None


# -- the stage ---------------------------------------------------------------------------------------


def held_out_kl(cfg: Config, sft, tok, adapter_dir: Path) -> dict:
    """KL(online DPO policy || SFT) on held-out prompts, from responses sampled from the policy."""
    if not cfg.eval.kl_prompts or not cfg.prompts.eval:
        return {}
    held = load_prompts(cfg.prompts.eval, cfg.eval.kl_prompts, cfg.prompts.eval_split)
    model = policy_with_adapter(sft, cfg.precision, adapter_dir)
    return sampled_kl(model, lambda: adapter_disabled(model), tok, [p["prompt"] for p in held],
                      max_new_tokens=cfg.eval.kl_sample_length, batch_size=cfg.train.eval_batch_size, seed=cfg.seed)


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    sft = ctx.inputs["sft"]
    require_mergeable(sft, needed_by="online_dpo")
    prompts = load_prompts(cfg.prompts.train, cfg.prompts.max_prompts, cfg.prompts.train_split)
    tok = load_tokenizer(sft.model_dir)
    scorer = text_reward_fn(cfg.scorer, ctx.inputs, cfg.precision)
    log.info("[online_dpo] %d rounds x %d of %d prompts, K=%d, %d new tokens; scorer %s; beta %s; precision %s",
             cfg.online.rounds, cfg.online.prompts_per_round, len(prompts), cfg.generation.num_return_sequences,
             cfg.generation.max_new_tokens, cfg.scorer.kind, cfg.dpo.beta, resolve_precision(cfg.precision))

    # -- rounds: sample -> score -> best-vs-worst pairs -> DPO, each saved as it finishes --------------------
    rounds, prev = [], None
    for index in range(1, cfg.online.rounds + 1):
        summary = finished_round(ctx, index)
        if summary is not None:
            log.info("[online_dpo] round %d: finished earlier, kept", index)
        else:
            summary = run_round(cfg, ctx, sft, tok, scorer, prompts, index, prev)
            if summary is None:
                return  # preemption: the runner requeues, finished rounds are kept
        rounds.append(summary)
        prev = ctx.out_dir / "rounds" / str(index) / "model"

    # -- save: the last round's adapter is the stage's model ----------------------------------------------
    remove_tree(ctx.out_dir / "model")
    shutil.copytree(prev, ctx.out_dir / "model")
    kl = held_out_kl(cfg, sft, tok, prev)
    ctx.lineage = lineage_for(sft, adapter=True, reference="parent", **describe(cfg.peft), rounds=len(rounds),
                              scorer=cfg.scorer.kind)
    ctx.metrics.update({
        "rounds": rounds, "pairs": sum(r["pairs"] for r in rounds),
        "generated_tokens": sum(r["generated_tokens"] for r in rounds),
        "first_mean_score": rounds[0]["mean_score"], "last_mean_score": rounds[-1]["mean_score"],
        "train_seconds": round(sum(r["train_seconds"] for r in rounds), 2),
        "sample_seconds": round(sum(r["sample_seconds"] for r in rounds), 2),
        "eval": kl, "peak_rss_mb": round(peak_rss_mb(), 1),
    })
    log.info("[online_dpo] %d rounds: policy's mean score %.3f -> %.3f; KL to SFT %s", len(rounds),
             rounds[0]["mean_score"], rounds[-1]["mean_score"], kl.get("kl_seq", "skipped"))
