"""Our PPO (alignment/ppo.py) against TRL's last PPOTrainer (trl 1.12.0, trl.experimental.ppo), in one run.

The same random-init Qwen2-shaped model (hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 3072, tied
embeddings, vocab 4,096: a byte-level BPE trained on data/instruct plus filler tokens, 107.0M parameters)
is the policy/reference start for both sides. The reward model has the pipeline's shape: the policy's base + a LoRA
reward adapter (random B, seeded) + a score head; ours loads it unmerged as a frozen adapter role on its one base
(`AdapterReward.from_folder`, as the ppo stage loads the reward stage's `adapter/`), TRL the same adapter merged into a
Qwen2ForSequenceClassification (it cannot share a base), from which its value model also starts. After training each
side scores the same probe rows with its own reward path; the run fails if they differ beyond bf16 rounding. Workload, both sides: 64 prompts from
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
peak RSS is the child's own VmHWM at its end (its ru_maxrss would include the driver's RSS at the fork; reported
as `ru_maxrss_mb` for reference), episodes/s is 64 episodes / wall time of the training loop
(model loading excluded, reported separately). Run it alone: it is serialised with other heavy jobs by flock.

    bash bench/setup_trl112.sh      # once: trl 1.12.0 + torch 2.13.0 (CPU) in bench/out/venv-trl112
    flock /tmp/heavy.lock env OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo_vs_trl.py \
        --modes lora --sides trl ours          # --updates 2 for a quick check; ours:reward=merged for the old RM

A side `ours:KEY=VALUE+KEY=VALUE` runs our trainer with those PPOSpec overrides (ablations in one invocation);
three keys are the bench's own: reward=merged (the old merged reward model), lora_kernel=peft (peft.kernel: peft's
LoRA forward instead of alignment.fused_lora's) and prefill=padded (generation.prefill: HF generate's prefill of the
left-padded prompts instead of alignment.generation.packed_prefill).

Writes bench/out/ppo_vs_trl.json (`--out`) and prints the markdown table of docs/ppo_bench.md.
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
BATCH, RESPONSE, EPOCHS, UPDATES, PROMPTS, PROBE = 8, 24, 2, 8, 64, 4
LORA = dict(r=16, alpha=32)
LR = {"lora": 1e-4, "full": 1e-5}
KL_COEF, TEMPERATURE, SEED = 0.05, 1.0, 0


# -- shared set-up (main venv) -------------------------------------------------------------------------------------
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REWARD_B_STD = 0.02
"""The reward adapter's B matrices: random (seeded) instead of LoRA's zeros, at the model's initializer_range, so
the RM differs from the policy's base as a trained reward adapter would."""


def setup(work: Path, precision: str) -> dict:
    """Tokenizer, policy, reward model and tokenised prompts in `work/<precision>/`, identical for both sides.

    The reward model has the pipeline's shape (stages/reward.py): the policy's base + a LoRA reward adapter + a
    score head, published twice: unmerged in the peft layout (`reward-adapter/`, which ours loads as a frozen role
    on its one base, `AdapterReward.from_folder`) and merged into a plain sequence classifier (`reward/`, which TRL
    loads as its reward model and as the start of its value model). Weights are saved in the run's precision, so
    no side maps fp32 file pages while loading bf16 models.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = work / precision
    if (folder / "setup.json").is_file():
        return json.loads((folder / "setup.json").read_text())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tok, rows, answers = _tokenizer_and_prompts()
    config = Qwen2Config(vocab_size=VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **SHAPE)
    torch.manual_seed(SEED)
    policy = Qwen2ForCausalLM(config)
    rm = _reward_adapter(policy, config)
    rm.save_pretrained(folder / "reward-adapter", safe_serialization=True)
    prompt_ids = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]) for m in rows[:PROMPTS]]
    # The reward check: each side scores these (prompt, reference answer cut to RESPONSE tokens, no EOS) pairs
    # with its own reward path after training; the driver compares the scores with the fp32 ones computed here.
    probe = {"query_ids": prompt_ids[:PROBE],
             "response_ids": [tok(a, add_special_tokens=False)["input_ids"][:RESPONSE] for a in answers[:PROBE]]}
    _write_prompts(folder, prompt_ids, rows, probe)  # _probe_scores reads the probe rows from there
    with torch.no_grad():
        adapter_fp32 = _probe_scores(rm.base_model.model, folder, tok.pad_token_id)
    merged = rm.merge_and_unload()  # in fp32, then cast: the closest bf16 model to base + adapter
    with torch.no_grad():
        merged_fp32 = _probe_scores(merged, folder, tok.pad_token_id)
    # In fp32 the unmerged adapter and the merged model are the same function (up to float rounding)
    assert torch.allclose(adapter_fp32, merged_fp32, atol=1e-4), (adapter_fp32, merged_fp32)
    probe["scores_fp32"] = merged_fp32.tolist()
    for name, model in (("policy", policy), ("reward", merged)):
        model.to(dtype).save_pretrained(folder / name, safe_serialization=True)
        tok.save_pretrained(folder / name)
    info = {"params": sum(p.numel() for p in policy.parameters()), "vocab": VOCAB, "precision": precision,
            "bpe_tokens": VOCAB - sum(1 for t in tok.get_vocab() if t.startswith("<|filler_")),
            "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
            "prompt_tokens_max": max(map(len, prompt_ids)),
            "reward_adapter_params": LORA["r"] * sum(m.in_features + m.out_features for m in merged.modules()
                                                         if type(m).__name__ == "Linear" and m.out_features > 1),
            "probe_scores_fp32": probe["scores_fp32"]}
    _write_prompts(folder, prompt_ids, rows, probe)
    (folder / "setup.json").write_text(json.dumps(info))
    return info


def _tokenizer_and_prompts():
    """(tokenizer, prompt message lists, reference answers) from data/instruct/train.jsonl.

    The tiny-model tokenizer recipe (byte-level BPE on the bundled text). The corpus yields ~2.7k merges; filler
    tokens take the vocabulary to 4,096 so the model lands on ~107M parameters and every id the random policy
    samples decodes to text."""
    from alignment.models import build_tiny_random

    texts, rows, answers = [], [], []
    for line in (REPO / "data" / "instruct" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [m["content"] for m in row["messages"]]
        rows.append([m for m in row["messages"] if m["role"] != "assistant"])
        answers.append(next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "ok"))
    _, tok = build_tiny_random(texts, vocab_size=VOCAB, hidden_size=8, layers=1, heads=1, seed=SEED)
    tok.add_tokens([f"<|filler_{i}|>" for i in range(VOCAB - len(tok))])
    assert len(tok) == VOCAB, len(tok)
    return tok, rows, answers


def _reward_adapter(policy, config):
    """The reward model: the policy's trunk + a random score head (seed 1) + a LoRA adapter whose B is random
    (seed 2); the score head is the adapter's modules_to_save (SEQ_CLS), as in the reward stage's `adapter/`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(SEED + 1)
    rm_config = Qwen2Config(**config.to_dict())
    rm_config.num_labels = 1
    rm = Qwen2ForSequenceClassification(rm_config)
    rm.model.load_state_dict(policy.model.state_dict())
    rm = get_peft_model(rm, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                       target_modules=LINEAR, task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * REWARD_B_STD)
    return rm


def _write_prompts(folder: Path, prompt_ids: list, rows: list, probe: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.json").write_text(json.dumps({"prompt_ids": prompt_ids, "messages": rows[:PROMPTS],
                                                     "probe": probe}))


def _probe_scores(rm, work: Path, pad: int):
    """A sequence classifier's scores on the probe rows (the last token of each, left-padded)."""
    import torch

    from alignment.reward_sources import last_token_scores

    q, qm, r = _probe_batch(work, pad)
    return last_token_scores(rm, torch.cat([q, r], 1), torch.cat([qm, torch.ones_like(r)], 1)).float()


def _probe_batch(work: Path, pad: int):
    """The reward check's rows: left-padded queries, responses (all the same length, no EOS)."""
    import torch

    probe = json.loads((work / "prompts.json").read_text())["probe"]
    width = max(map(len, probe["query_ids"]))
    q = torch.tensor([[pad] * (width - len(r)) + r for r in probe["query_ids"]])
    qm = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in probe["query_ids"]])
    n = min(map(len, probe["response_ids"]))
    r = torch.tensor([row[:n] for row in probe["response_ids"]])
    return q, qm, r


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    torch.manual_seed(SEED)


def _rss_mb() -> float:
    """Peak RSS of this process so far (VmHWM), in MB. Not ru_maxrss: Linux carries a process's maxrss across
    fork and exec, so a child's ru_maxrss never reads below the driver's RSS at the fork (the driver holds the
    models it saved in setup(): ~1.4 GB in bf16), which hid a smaller side's real peak. VmHWM belongs to the
    address space exec made."""
    return _mem("peak")["VmHWM"]


def _mem(phase: str) -> dict:
    """VmRSS (now) and VmHWM (peak so far) of this process, in MB, tagged with the phase."""
    out = {"phase": phase}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


# -- TRL side (runs in bench/out/venv-trl112) ---------------------------------------------------------------------
def run_trl(work: Path, mode: str, threads: int, precision: str = "fp32", updates: int = UPDATES) -> dict:
    _threads(threads)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.utils import get_reward

    memory = [_mem("imports")]

    class Memory(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            memory.append(_mem(f"update {len(memory) - 2}"))

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    prompt_ids = json.loads((work / "prompts.json").read_text())["prompt_ids"]
    data = Dataset.from_dict({"input_ids": prompt_ids})
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=dtype)
    # TRL's examples: the value model starts from the reward model; both are full sequence classifiers. TRL
    # cannot share a base, so it gets the reward adapter merged (`reward/`).
    value = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, dtype=dtype)
    memory.append(_mem("models loaded"))
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    args = PPOConfig(output_dir=str(work / f"trl-{mode}"), per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=EPOCHS,
                     total_episodes=BATCH * updates, response_length=RESPONSE, local_rollout_forward_batch_size=BATCH,
                     num_sample_generations=0, stop_token="eos", temperature=TEMPERATURE, kl_coef=KL_COEF,
                     learning_rate=LR[mode], seed=SEED, save_strategy="no", report_to=[], logging_steps=1,
                     use_cpu=True, bf16=precision == "bf16", disable_tqdm=True, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=data, eval_dataset=data, value_model=value, peft_config=peft_config,
                         callbacks=[Memory()])
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    memory.append(_mem("trainer ready"))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    # The reward check (after the measurement): TRL's own scoring function on the probe rows.
    q, _, r = _probe_batch(work, tok.pad_token_id)
    with torch.no_grad():
        probe = get_reward(trainer.reward_model, torch.cat([q, r], 1), tok.pad_token_id, q.shape[1])[1]
    logs = [r for r in trainer.state.log_history if "objective/scores" in r]
    return {"side": "trl", "version": trl.__version__, "mode": mode, "precision": precision, "load_s": load_s,
            "train_s": train_s,
            "train_cpu_s": train_cpu_s,
            "updates": len(logs), "episodes": trainer.state.episode, "rss_after_load_mb": rss_loaded,
            "score_first": logs[0]["objective/scores"], "score_last": logs[-1]["objective/scores"],
            "kl_last": logs[-1]["objective/kl"], "memory": memory, "probe_scores": probe.float().tolist(),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "peak_rss_mb": _rss_mb()}


# -- our side (main venv) ------------------------------------------------------------------------------------------
def run_ours(work: Path, mode: str, threads: int, options: dict | None = None, precision: str = "fp32",
             updates: int = UPDATES) -> dict:
    """`options`: PPOSpec overrides (e.g. value_model=shared), from a side named `ours:key=value+key=value`;
    `reward=merged` loads the merged RM as a separate model instead of the adapter role (the pipeline's fallback
    when the reward adapter does not fit the policy)."""
    _threads(threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignment.ppo import PPOCallback, PPOSpec, PPOTrainer, lora_config, value_head_from_reward_model
    from alignment.reward_sources import AdapterReward, ModelReward
    from alignment.schema import PeftSpec

    memory = [_mem("imports")]

    class Memory(PPOCallback):
        def on_update_end(self, trainer, row, control):
            memory.append(_mem(f"update {row['step']}"))

    options = dict(options or {})
    reward_as = options.pop("reward", "adapter")
    kernel = options.pop("lora_kernel", "fused")  # peft.kernel of the stages: fused | peft
    prefill = options.pop("prefill", "packed")  # generation.prefill of the rollouts: packed | padded
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(work / "policy")
    prompts = json.loads((work / "prompts.json").read_text())["messages"]
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=dtype)
    memory.append(_mem("policy loaded"))
    if reward_as == "merged":
        rm = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, dtype=dtype)
        reward = ModelReward(rm, tok, normalize=False, batch_size=BATCH)
    else:  # the pipeline's shape: the reward stage's unmerged adapter + score head, a frozen role on our one base
        reward = AdapterReward.from_folder(work / "reward-adapter", tok, normalize=False)
    spec = PPOSpec(updates=updates, batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=EPOCHS, lr=LR[mode],
                   lr_schedule="linear", max_new_tokens=RESPONSE, temperature=TEMPERATURE, missing_eos_penalty=None,
                   kl_coef=KL_COEF, value_init="reward", **options)
    lora = PeftSpec(method="lora", r=LORA["r"], alpha=LORA["alpha"], dropout=0.0)
    # Like TRL's value model, the critic starts from the reward model (here: its score head as the value head).
    # Full: lora_config None trains every weight, with a frozen reference copy and the value head on the policy's
    # own trunk (TRL: policy + frozen reference + full value model).
    trainer = PPOTrainer(policy, tok, reward, spec, lora_config(lora) if mode == "lora" else None,
                         value_head_init=value_head_from_reward_model(reward), seed=SEED,
                         fused_lora=kernel == "fused")
    if prefill != "packed":
        spec_of = trainer.generation_spec
        trainer.generation_spec = lambda batch_size=None: spec_of(batch_size).model_copy(update={"prefill": prefill})
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    memory.append(_mem("trainer ready"))
    # The trainer's own loop (TRL's linear LR decay, stepped per update); no held-out evaluation or checkpoints,
    # as on TRL's side (num_sample_generations=0, save_strategy="no").
    result = trainer.train(prompts[: updates * BATCH], callbacks=[Memory()])
    # The reward check (after the measurement): our scorer on the probe rows.
    q, qm, r = _probe_batch(work, tok.pad_token_id)
    probe = reward.score_ids(q, qm, r, torch.ones_like(r), torch.zeros(len(r), dtype=torch.bool))
    rows = [r for r in result.history if "objective/scores" in r]
    timing = {k: sum(r.get(f"time/{k}_s", 0.0) for r in rows) for k in ("generate", "score", "forward", "optimise")}
    chosen = {**spec.model_dump(include=set(options)), "reward": reward_as, "lora_kernel": kernel, "prefill": prefill}
    return {"side": "ours", "mode": mode, "precision": precision, "options": chosen,
            "value_model": spec.value_model, "load_s": load_s, "train_s": result.seconds,
            "train_cpu_s": result.cpu_seconds, "updates": len(rows),
            "episodes": len(rows) * BATCH, "rss_after_load_mb": rss_loaded,
            "score_first": rows[0]["objective/scores"], "score_last": rows[-1]["objective/scores"],
            "kl_last": rows[-1]["ppo/kl"], **{f"time_{k}_s": v for k, v in timing.items()},
            "memory": memory, "probe_scores": probe.float().tolist(),
            "trainable_params": sum(p.numel() for p in trainer._trainable), "peak_rss_mb": _rss_mb()}


# -- the driver ----------------------------------------------------------------------------------------------------
def _kind(side: str) -> str:
    return side.partition(":")[0]


def allocator_of(side: str) -> str:
    """A side's malloc: `allocator=system|mimalloc` in its options, else as each ships: ours runs on mimalloc (every
    `align` process does, alignment/allocator.py), TRL on the system's."""
    chosen = _options(side).get("allocator", "mimalloc" if _kind(side) == "ours" else "system")
    if chosen not in ("system", "mimalloc"):
        raise SystemExit(f"--sides {side}: allocator must be system or mimalloc, got {chosen!r}")
    return chosen


def onednn_cache_of(side: str) -> str:
    """A side's oneDNN primitive cache capacity: `onednn_cache=N|default` in its options, else as each runs: ours
    with the ppo recipe's `onednn_cache` (configs/smollm2/ppo.yaml; the runner exports it), TRL with oneDNN's
    default (1024)."""
    import yaml

    shipped = yaml.safe_load((REPO / "configs" / "smollm2" / "ppo.yaml").read_text()).get("onednn_cache")
    chosen = _options(side).get("onednn_cache", str(shipped) if _kind(side) == "ours" and shipped is not None
                                else "default")
    if chosen != "default" and not chosen.isdigit():
        raise SystemExit(f"--sides {side}: onednn_cache must be a number of primitives or default, got {chosen!r}")
    return chosen


def child_env(side: str, threads: int) -> dict:
    from alignment import allocator

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    cache = onednn_cache_of(side)
    if cache != "default":
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cache
    lib = allocator.mimalloc_library()
    env["LD_PRELOAD"] = ":".join(p for p in env.get("LD_PRELOAD", "").split(":") if p and "libmimalloc" not in p)
    if allocator_of(side) == "mimalloc":
        if lib is None:
            raise SystemExit(f"--sides {side}: mimalloc needs the cmeel-mimalloc package (pip install cmeel-mimalloc)")
        env = allocator.preload_env(env, lib)
    return env


def child(side: str, mode: str, threads: int, precision: str, updates: int) -> dict:
    """Run one side in a fresh process; return its result plus the child's CPU time and ru_maxrss."""
    python = TRL_PYTHON if _kind(side) == "trl" else Path(sys.executable)
    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in side)
    if not python.is_file():
        raise SystemExit(f"{python} is missing: run `bash bench/setup_trl112.sh` first")
    env = child_env(side, threads)
    out = WORK / precision / f"result-{tag}-{mode}.json"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(python), __file__, "--side", side, "--mode", mode, "--threads", str(threads),
                             "--precision", precision, "--updates", str(updates), "--result", str(out)],
                            cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"{side}/{mode} failed with exit code {proc.returncode}")
    res = {**json.loads(out.read_text()), "side": side}
    if "unsupported" not in res:
        # CPU seconds of the whole child (loading included): on a shared machine the wall time also counts
        # other jobs' load, the CPU time much less so.
        res.update(ru_maxrss_mb=usage.ru_maxrss / 1024, process_wall_s=wall,
                   process_cpu_s=usage.ru_utime + usage.ru_stime, episodes_per_s=res["episodes"] / res["train_s"],
                   train_cpu_s_per_episode=res["train_cpu_s"] / res["episodes"],
                   loadavg_after=os.getloadavg()[0])
    return res


def table(results: list[dict]) -> str:
    lines = ["| mode | precision | side | allocator | oneDNN cache | run | episodes/s | train s | train CPU s / episode | "
             "load s | child CPU s | peak RSS (MB) | trainable params | score first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["mode"], r.get("repeat", 0), _kind(r["side"]) != "trl", r["side"])):
        head = (f"| {r['mode']} | {r.get('precision', 'fp32')} | {r['side']} | {r.get('allocator', 'system')} | "
                f"{r.get('onednn_cache', 'default')} | {r.get('repeat', 0) + 1} |")
        if "unsupported" in r:
            lines.append(f"{head} n/a: {r['unsupported']} | | | | | | | | |")
            continue
        lines.append(f"{head} {r['episodes_per_s']:.2f} | {r['train_s']:.1f} | {r['train_cpu_s_per_episode']:.2f} | "
                     f"{r['load_s']:.1f} | {r.get('process_cpu_s', float('nan')):.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {r['score_first']:.3f} -> {r['score_last']:.3f} |")
    lines += ["", "| mode | run | side | against | episodes/s ours / TRL (goal >= 2) | train CPU s / episode TRL / ours | "
                  "peak RSS ours / TRL (goal <= 0.35) |", "|---|---|---|---|---|---|---|"]
    trl = [r for r in results if _kind(r["side"]) == "trl" and "unsupported" not in r]
    ours = [r for r in results if _kind(r["side"]) != "trl" and "unsupported" not in r]
    for o in sorted(ours, key=lambda r: (r["mode"], r.get("repeat", 0), r["side"])):
        for t in (t for t in trl if (t["mode"], t.get("repeat", 0)) == (o["mode"], o.get("repeat", 0))):
            lines.append(f"| {o['mode']} | {o.get('repeat', 0) + 1} | {o['side']} | {t['side']} | "
                         f"{o['episodes_per_s'] / t['episodes_per_s']:.2f}x | "
                         f"{t['train_cpu_s_per_episode'] / o['train_cpu_s_per_episode']:.2f}x | "
                         f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")
    return "\n".join(lines)


def reward_check(results: list[dict], fp32: list[float]) -> dict:
    """Each side's probe scores against TRL's and against the fp32 scores of setup (where the adapter and the merged
    model agree to 1e-4): the two sides may differ by their own precision's rounding, and no more."""
    trl = next((r["probe_scores"] for r in results if _kind(r["side"]) == "trl"), None)
    if trl is None:
        return {"max_abs_diff": 0.0, "rounding": 1.0, "fp32": fp32, "trl": None}
    rounding = max(abs(a - b) for r in results for a, b in zip(r["probe_scores"], fp32))
    diffs = [abs(a - b) for r in results if _kind(r["side"]) != "trl" for a, b in zip(r["probe_scores"], trl)]
    return {"max_abs_diff": max(diffs, default=0.0), "rounding": rounding, "fp32": [round(x, 4) for x in fp32],
            "trl": [round(x, 4) for x in trl],
            **{r["side"]: [round(x, 4) for x in r["probe_scores"]] for r in results if _kind(r["side"]) != "trl"}}


def memory_table(results: list[dict]) -> str:
    """RSS now / peak so far (MB) of each child at its phases."""
    lines = ["", "| mode | side | run | RSS now / peak so far (MB) by phase |", "|---|---|---|---|"]
    for r in results:
        cells = "; ".join(f"{m['phase']} {m['VmRSS']:.0f} / {m['VmHWM']:.0f}" for m in r.get("memory", []))
        lines.append(f"| {r['mode']} | {r['side']} | {r.get('repeat', 0) + 1} | {cells} |")
    return "\n".join(lines)


def _options(side: str) -> dict:
    """`ours:value_model=shared+micro_batch_size=4` -> {"value_model": "shared", "micro_batch_size": "4"}."""
    _, _, opts = side.partition(":")
    return dict(kv.split("=", 1) for kv in opts.split("+") if kv)


def _words(values: list[str]) -> list[str]:
    return [w for v in values for w in v.split(",") if w]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", help="(internal) the side a child runs")
    ap.add_argument("--sides", nargs="+", default=["trl", "ours"],
                    help="sides to run, in this order: trl, ours, or ours:KEY=VALUE+KEY=VALUE with PPOSpec overrides "
                         "(e.g. ours:value_model=separate); either side takes allocator=system|mimalloc "
                         "(default: ours mimalloc, as `align` runs, TRL system) and onednn_cache=N|default "
                         "(default: ours the ppo recipe's, TRL oneDNN's)")
    ap.add_argument("--mode", choices=["lora", "full"])
    ap.add_argument("--modes", nargs="+", default=["lora", "full"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="both sides' precision; default bf16 where the CPU runs it fast, else fp32")
    ap.add_argument("--updates", type=int, default=UPDATES,
                    help=f"updates per side (default {UPDATES}, the benchmark; fewer for a quick check)")
    ap.add_argument("--result")
    ap.add_argument("--repeat", type=int, default=1, help="run every (mode, side) pair this many times, interleaved")
    ap.add_argument("--out", type=Path, default=OUT / "ppo_vs_trl.json",
                    help="where the raw figures go (a run of some sides need not replace the last full comparison)")
    return ap.parse_args(argv)


def run_side(a: argparse.Namespace) -> None:
    """A child: one side in one mode, its figures written to `a.result`."""
    work = WORK / a.precision
    options = _options(a.side)
    options.pop("allocator", None)  # the driver's: LD_PRELOAD of this child
    options.pop("onednn_cache", None)  # the driver's: this child's environment
    res = (run_trl(work, a.mode, a.threads, a.precision, a.updates) if _kind(a.side) == "trl" else
           run_ours(work, a.mode, a.threads, options, a.precision, a.updates))
    from alignment.allocator import loaded

    res["allocator"] = loaded()
    res["onednn_cache"] = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default")
    Path(a.result).write_text(json.dumps(res))


def print_report(report: dict) -> None:
    print(table(report["results"]))
    print(memory_table(report["results"]))
    check = report["reward_check"]
    print(f"\nreward check ({PROBE} probe rows, each side's own scorer): max |ours - TRL| = {check['max_abs_diff']:.4f}, "
          f"largest distance of a side from the fp32 scores {check['rounding']:.4f}; fp32 {check['fp32']}, "
          f"TRL {check['trl']}, ours {[v for k, v in check.items() if k.startswith('ours')]}")


def main() -> None:
    a = parse_args()
    if a.side:
        return run_side(a)
    if a.precision is None:
        from alignment.hardware import resolve_precision

        a.precision = resolve_precision("auto")
    WORK.mkdir(parents=True, exist_ok=True)
    info = setup(WORK, a.precision)
    print(f"model: Qwen2-shaped, {info['params'] / 1e6:.1f}M parameters, vocab {info['vocab']} "
          f"({info['bpe_tokens']} BPE tokens); prompts {info['prompt_tokens_mean']:.1f} tokens on average", flush=True)
    results = []
    for rep in range(a.repeat):
        for mode in _words(a.modes):
            for side in _words(a.sides):
                res = {**child(side, mode, a.threads, a.precision, a.updates), "repeat": rep}
                print(json.dumps(res), flush=True)
                results.append(res)
    report = {"setup": info, "argv": sys.argv[1:],
              "workload": dict(batch=BATCH, response_tokens=RESPONSE, ppo_epochs=EPOCHS, updates=UPDATES,
                               threads=a.threads, lora=LORA, lr=LR, kl_coef=KL_COEF, precision=a.precision,
                               updates_run=a.updates),
              "results": results, "reward_check": reward_check(results, info["probe_scores_fp32"])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print_report(report)
    check = report["reward_check"]
    if check["max_abs_diff"] > 2 * check["rounding"] + 1e-3:
        raise SystemExit("the two sides' reward models disagree beyond their precision's rounding")


if __name__ == "__main__":
    main()
