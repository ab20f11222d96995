"""Our PPO (alignment/ppo.py) against TRL's last PPOTrainer (trl 1.12.0, trl.experimental.ppo), in one run.

The same random-init Qwen2-shaped model (hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 3072, tied
embeddings, vocab 4,096: a byte-level BPE trained on data/instruct plus filler tokens, 107.0M parameters)
is the policy/reference start for both sides, and the same random-init reward model of the same shape
(Qwen2ForSequenceClassification, 1 label) scores both. Workload, both sides: 64 prompts from
data/instruct/train.jsonl (chat template applied), batch 8, exactly 24 sampled response tokens (EOS is
never a stop: the comparison is of equal work), 2 PPO epochs of one minibatch of 8, 8 updates (64 episodes),
on CPU. LoRA: r 16 on every linear layer of the policy. Full: every policy weight trains.

Precision (`--precision`, default: bf16 where the CPU has AVX512-BF16/AMX, else fp32), each side at its best:
bf16 loads every model of both sides in bfloat16; TRL runs with `PPOConfig(bf16=True)` (accelerate's autocast),
ours trains fp32 LoRA adapters and value head under autocast on the bf16 base (alignment/ppo.py).

How each side spends memory is part of what is compared: TRL's PPOTrainer takes four models (policy,
reference, value, reward; with LoRA the reference is the adapter-off policy, the value model is still a
full trainable copy initialised from the reward model, as in TRL's examples). Ours keeps one base with
adapters for its roles (see alignment/ppo.py).

Each side runs in its own child process (TRL's in bench/out/venv-trl112, made by bench/setup_trl112.sh);
peak RSS is the child's ru_maxrss (os.wait4), episodes/s is 64 episodes / wall time of the training loop
(model loading excluded, reported separately). Run it alone: it is serialised with other heavy jobs by flock.

    bash bench/setup_trl112.sh      # once: trl 1.12.0 + torch 2.13.0 (CPU) in bench/out/venv-trl112
    flock /tmp/heavy.lock env OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo_vs_trl.py \
        --modes lora full --sides trl ours ours:value_model=separate --repeat 2

A side `ours:KEY=VALUE+KEY=VALUE` runs our trainer with those PPOSpec overrides (ablations in one invocation).

Writes bench/out/ppo_vs_trl.json and prints the markdown table of docs/ppo_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
WORK = OUT / "ppo_vs_trl"
TRL_PYTHON = OUT / "venv-trl112" / "bin" / "python"

SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
             intermediate_size=3072, tie_word_embeddings=True, max_position_embeddings=512)
VOCAB = 4096
BATCH, RESPONSE, EPOCHS, UPDATES, PROMPTS = 8, 24, 2, 8, 64
LORA = dict(r=16, alpha=32)
LR = {"lora": 1e-4, "full": 1e-5}
KL_COEF, TEMPERATURE, SEED = 0.05, 1.0, 0


# -- shared set-up (main venv) -------------------------------------------------------------------------------------
def setup(work: Path) -> dict:
    """Tokenizer, policy, reward model and tokenised prompts on disk, identical for both sides."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from alignment.models import build_tiny_random

    if (work / "setup.json").is_file():
        return json.loads((work / "setup.json").read_text())
    texts, rows = [], []
    for line in (REPO / "data" / "instruct" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [m["content"] for m in row["messages"]]
        rows.append([m for m in row["messages"] if m["role"] != "assistant"])
    # The tiny-model tokenizer recipe (byte-level BPE on the bundled text). The corpus yields ~2.7k merges;
    # filler tokens take the vocabulary to 4,096 so the model lands on ~107M parameters and every id the random
    # policy samples decodes to text.
    _, tok = build_tiny_random(texts, vocab_size=VOCAB, hidden_size=8, layers=1, heads=1, seed=SEED)
    tok.add_tokens([f"<|filler_{i}|>" for i in range(VOCAB - len(tok))])
    assert len(tok) == VOCAB, len(tok)
    config = Qwen2Config(vocab_size=VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **SHAPE)
    torch.manual_seed(SEED)
    policy = Qwen2ForCausalLM(config)
    torch.manual_seed(SEED + 1)
    rm_config = Qwen2Config(**config.to_dict())
    rm_config.num_labels = 1
    reward = Qwen2ForSequenceClassification(rm_config)
    for folder, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(work / folder, safe_serialization=True)
        tok.save_pretrained(work / folder)
    prompt_ids = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]) for m in rows[:PROMPTS]]
    info = {"params": sum(p.numel() for p in policy.parameters()), "vocab": VOCAB,
            "bpe_tokens": VOCAB - sum(1 for t in tok.get_vocab() if t.startswith("<|filler_")),
            "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
            "prompt_tokens_max": max(map(len, prompt_ids))}
    (work / "prompts.json").write_text(json.dumps({"prompt_ids": prompt_ids, "messages": rows[:PROMPTS]}))
    (work / "setup.json").write_text(json.dumps(info))
    return info


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    torch.manual_seed(SEED)


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- TRL side (runs in bench/out/venv-trl112) ---------------------------------------------------------------------
def run_trl(work: Path, mode: str, threads: int, precision: str = "fp32") -> dict:
    _threads(threads)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    prompt_ids = json.loads((work / "prompts.json").read_text())["prompt_ids"]
    data = Dataset.from_dict({"input_ids": prompt_ids})
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=dtype)
    # TRL's examples: the value model starts from the reward model; both are full sequence classifiers.
    value = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, dtype=dtype)
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    args = PPOConfig(output_dir=str(work / f"trl-{mode}"), per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=EPOCHS,
                     total_episodes=BATCH * UPDATES, response_length=RESPONSE, local_rollout_forward_batch_size=BATCH,
                     num_sample_generations=0, stop_token="eos", temperature=TEMPERATURE, kl_coef=KL_COEF,
                     learning_rate=LR[mode], seed=SEED, save_strategy="no", report_to=[], logging_steps=1,
                     use_cpu=True, bf16=precision == "bf16", disable_tqdm=True, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=data, eval_dataset=data, value_model=value, peft_config=peft_config)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    logs = [r for r in trainer.state.log_history if "objective/scores" in r]
    return {"side": "trl", "version": trl.__version__, "mode": mode, "precision": precision, "load_s": load_s,
            "train_s": train_s,
            "train_cpu_s": train_cpu_s,
            "updates": len(logs), "episodes": trainer.state.episode, "rss_after_load_mb": rss_loaded,
            "score_first": logs[0]["objective/scores"], "score_last": logs[-1]["objective/scores"],
            "kl_last": logs[-1]["objective/kl"],
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


# -- our side (main venv) ------------------------------------------------------------------------------------------
def run_ours(work: Path, mode: str, threads: int, options: dict | None = None, precision: str = "fp32") -> dict:
    """`options`: PPOSpec overrides (e.g. value_model=shared), from a side named `ours:key=value+key=value`."""
    _threads(threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignment.ppo import PPOSpec, PPOTrainer, lora_config, value_head_from_reward_model
    from alignment.reward_sources import ModelReward
    from alignment.schema import PeftSpec

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(work / "policy")
    prompts = json.loads((work / "prompts.json").read_text())["messages"]
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=dtype)
    rm = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, dtype=dtype)
    reward = ModelReward(rm, tok, normalize=False, batch_size=BATCH)
    spec = PPOSpec(updates=UPDATES, batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=EPOCHS, lr=LR[mode],
                   lr_schedule="linear", max_new_tokens=RESPONSE, temperature=TEMPERATURE, missing_eos_penalty=None,
                   kl_coef=KL_COEF, value_init="reward", **(options or {}))
    lora = PeftSpec(method="lora", r=LORA["r"], alpha=LORA["alpha"], dropout=0.0)
    # Like TRL's value model, the critic starts from the reward model (here: its score head on the value adapter).
    # Full: lora_config None trains every weight, with a frozen reference copy and the value head on the policy's
    # own trunk (TRL: policy + frozen reference + full value model).
    trainer = PPOTrainer(policy, tok, reward, spec, lora_config(lora) if mode == "lora" else None,
                         value_head_init=value_head_from_reward_model(rm), seed=SEED)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    # The trainer's own loop (TRL's linear LR decay, stepped per update); no held-out evaluation or checkpoints,
    # as on TRL's side (num_sample_generations=0, save_strategy="no").
    result = trainer.train(prompts[: UPDATES * BATCH])
    rows = [r for r in result.history if "objective/scores" in r]
    timing = {k: sum(r.get(f"time/{k}_s", 0.0) for r in rows) for k in ("generate", "score", "forward", "optimise")}
    return {"side": "ours", "mode": mode, "precision": precision, "options": spec.model_dump(include=set(options or {})),
            "value_model": spec.value_model, "load_s": load_s, "train_s": result.seconds,
            "train_cpu_s": result.cpu_seconds, "updates": len(rows),
            "episodes": len(rows) * BATCH, "rss_after_load_mb": rss_loaded,
            "score_first": rows[0]["objective/scores"], "score_last": rows[-1]["objective/scores"],
            "kl_last": rows[-1]["ppo/kl"], **{f"time_{k}_s": v for k, v in timing.items()},
            "trainable_params": sum(p.numel() for p in trainer._trainable)}


# -- the driver ----------------------------------------------------------------------------------------------------
def child(side: str, mode: str, threads: int, precision: str) -> dict:
    """Run one side in a fresh process; return its result plus the child's peak RSS (ru_maxrss)."""
    python = TRL_PYTHON if side == "trl" else Path(sys.executable)
    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in side)
    if not python.is_file():
        raise SystemExit(f"{python} is missing: run `bash bench/setup_trl112.sh` first")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    out = WORK / f"result-{tag}-{mode}.json"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(python), __file__, "--side", side, "--mode", mode, "--threads", str(threads),
                             "--precision", precision, "--result", str(out)], cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"{side}/{mode} failed with exit code {proc.returncode}")
    res = {**json.loads(out.read_text()), "side": side}
    if "unsupported" not in res:
        # CPU seconds of the whole child (loading included): on a shared machine the wall time also counts
        # other jobs' load, the CPU time much less so.
        res.update(peak_rss_mb=usage.ru_maxrss / 1024, process_wall_s=wall,
                   process_cpu_s=usage.ru_utime + usage.ru_stime, episodes_per_s=res["episodes"] / res["train_s"],
                   train_cpu_s_per_episode=res["train_cpu_s"] / res["episodes"],
                   loadavg_after=os.getloadavg()[0])
    return res


def table(results: list[dict]) -> str:
    lines = ["| mode | precision | side | run | episodes/s | train s | train CPU s / episode | load s | child CPU s | "
             "peak RSS (MB) | trainable params | score first -> last |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["mode"], r.get("repeat", 0), r["side"] != "trl", r["side"])):
        head = f"| {r['mode']} | {r.get('precision', 'fp32')} | {r['side']} | {r.get('repeat', 0) + 1} |"
        if "unsupported" in r:
            lines.append(f"{head} n/a: {r['unsupported']} | | | | | | | |")
            continue
        lines.append(f"{head} {r['episodes_per_s']:.2f} | {r['train_s']:.1f} | {r['train_cpu_s_per_episode']:.2f} | "
                     f"{r['load_s']:.1f} | {r.get('process_cpu_s', float('nan')):.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {r['score_first']:.3f} -> {r['score_last']:.3f} |")
    lines += ["", "| mode | run | side | episodes/s ours / TRL (goal >= 2) | train CPU s / episode TRL / ours | "
                  "peak RSS ours / TRL (goal <= 0.35) |", "|---|---|---|---|---|---|"]
    trl = {(r["mode"], r.get("repeat", 0)): r for r in results if r["side"] == "trl" and "unsupported" not in r}
    for o in sorted(results, key=lambda r: (r["mode"], r.get("repeat", 0), r["side"])):
        t = trl.get((o["mode"], o.get("repeat", 0)))
        if o["side"] == "trl" or t is None or "unsupported" in o:
            continue
        lines.append(f"| {o['mode']} | {o.get('repeat', 0) + 1} | {o['side']} | "
                     f"{o['episodes_per_s'] / t['episodes_per_s']:.2f}x | "
                     f"{t['train_cpu_s_per_episode'] / o['train_cpu_s_per_episode']:.2f}x | "
                     f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")
    return "\n".join(lines)


def _options(side: str) -> dict:
    """`ours:value_model=shared+micro_batch_size=4` -> {"value_model": "shared", "micro_batch_size": "4"}."""
    _, _, opts = side.partition(":")
    return dict(kv.split("=", 1) for kv in opts.split("+") if kv)


def _words(values: list[str]) -> list[str]:
    return [w for v in values for w in v.split(",") if w]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", help="(internal) the side a child runs")
    ap.add_argument("--sides", nargs="+", default=["trl", "ours"],
                    help="sides to run, in this order: trl, ours, or ours:KEY=VALUE+KEY=VALUE with PPOSpec overrides "
                         "(e.g. ours:value_model=separate)")
    ap.add_argument("--mode", choices=["lora", "full"])
    ap.add_argument("--modes", nargs="+", default=["lora", "full"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="both sides' precision; default bf16 where the CPU runs it fast, else fp32")
    ap.add_argument("--result")
    ap.add_argument("--repeat", type=int, default=1, help="run every (mode, side) pair this many times, interleaved")
    a = ap.parse_args()
    if a.side:  # a child
        res = (run_trl(WORK, a.mode, a.threads, a.precision) if a.side == "trl" else
               run_ours(WORK, a.mode, a.threads, _options(a.side), a.precision))
        Path(a.result).write_text(json.dumps(res))
        return
    if a.precision is None:
        from alignment.hardware import resolve_precision

        a.precision = resolve_precision("auto")
    WORK.mkdir(parents=True, exist_ok=True)
    info = setup(WORK)
    print(f"model: Qwen2-shaped, {info['params'] / 1e6:.1f}M parameters, vocab {info['vocab']} "
          f"({info['bpe_tokens']} BPE tokens); prompts {info['prompt_tokens_mean']:.1f} tokens on average", flush=True)
    results = []
    for rep in range(a.repeat):
        for mode in _words(a.modes):
            for side in _words(a.sides):
                res = {**child(side, mode, a.threads, a.precision), "repeat": rep}
                print(json.dumps(res), flush=True)
                results.append(res)
    report = {"setup": info, "argv": sys.argv[1:],
              "workload": dict(batch=BATCH, response_tokens=RESPONSE, ppo_epochs=EPOCHS, updates=UPDATES,
                               threads=a.threads, lora=LORA, lr=LR, kl_coef=KL_COEF, precision=a.precision),
              "results": results}
    (OUT / "ppo_vs_trl.json").write_text(json.dumps(report, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
