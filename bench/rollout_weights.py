"""PPO-shaped rollouts on CPU: sampling with an unmerged LoRA adapter vs merged weights, at 8 and 16 rows.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/rollout_weights.py

SmolLM2-135M-Instruct in bf16 (bench/generation.py's copy), `--rows` training prompts (8 and 16: the rows of one
PPO update), sampled at temperature 1 with per-prompt seeds, up to `--tokens` new tokens, through
`alignment.generation.generate`, each variant in its own process:

- `merged`: the plain weights (what `ppo.rollout_weights: merged` samples with);
- `adapter`: the same weights under an unmerged LoRA r=16 on every linear layer (peft's default fp32 adapter
  weights, B = 0 so the samples are the same), which `ppo.rollout_weights: adapter` samples with.

Prints wall, user and system CPU seconds, token steps, ms per step and the ratio to `merged` at the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
VARIANTS = ("merged", "adapter")


def child(variant: str, rows: int, tokens: int) -> dict:
    from frozen_generate import load_prompts
    from generation import ensure_model

    from alignment import generation as G
    from alignment.models import load_causal_lm, load_tokenizer

    folder = ensure_model()
    model, tok = load_causal_lm(folder, "bf16"), load_tokenizer(folder)
    if variant == "adapter":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    spec = G.GenerationSpec(max_new_tokens=tokens, do_sample=True, batch_size=rows)
    prompts = load_prompts(rows)
    G.generate(model, tok, prompts[:2], spec.model_copy(update={"max_new_tokens": 4}), seed=0)  # warm-up
    t0, c0 = time.perf_counter(), os.times()
    ro = G.generate(model, tok, prompts, spec, seed=1)
    c1 = os.times()
    return {"variant": f"{variant} x{rows}", "wall_s": time.perf_counter() - t0, "user_s": c1.user - c0.user,
            "sys_s": c1.system - c0.system, "steps": ro.response_ids.shape[1], "tokens": int(sum(ro.lengths))}


def main() -> None:
    from frozen_generate import run_children

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--child", choices=VARIANTS)
    p.add_argument("--child-rows", type=int)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.child_rows, args.tokens)))
        return
    print("| variant | wall s | user s | sys s | token steps | tokens | ms / step | wall / merged |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        results = run_children(__file__, VARIANTS, ["--child-rows", str(rows), "--tokens", str(args.tokens)])
        for r in results:
            ms, ratio = 1000 * r["wall_s"] / r["steps"], r["wall_s"] / results[0]["wall_s"]
            print(f"| {r['variant']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['steps']} | "
                  f"{r['tokens']} | {ms:.0f} | {ratio:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
