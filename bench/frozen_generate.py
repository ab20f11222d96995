"""HF generate on a model whose weights are frozen (every LoRA model's base) vs the same weights trainable.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/frozen_generate.py [--rows 64]

SmolLM2-135M-Instruct in bf16 (bench/generation.py's copy), greedy, `--rows` chat prompts x `--tokens` new tokens,
through `alignment.generation.generate`, each variant in its own process (peak RSS = the child's ru_maxrss):

- `trainable`: the weights as loaded (requires_grad True);
- `frozen`: `requires_grad_(False)` on every weight, with generate's `thaw` switched off (the code before the fix);
- `frozen+thaw`: frozen, through generate as it is (the flags are turned on while it runs, then restored).

Prints wall, user and system CPU seconds, peak RSS and the ratios to `trainable`.
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
VARIANTS = ("trainable", "frozen", "frozen+thaw")


def load_prompts(rows: int) -> list:
    """The first `rows` training prompts of data/instruct (the user turns)."""
    lines = (REPO / "data" / "instruct" / "train.jsonl").read_text().splitlines()[:rows]
    return [[m for m in json.loads(line)["messages"] if m["role"] != "assistant"] for line in lines]


def child(variant: str, rows: int, tokens: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from generation import ensure_model

    from alignment import generation as G
    from alignment.models import load_causal_lm, load_tokenizer

    folder = ensure_model()
    model, tok = load_causal_lm(folder, "bf16"), load_tokenizer(folder)
    if variant != "trainable":
        model.requires_grad_(False)
    if variant == "frozen":
        G.thaw = lambda model: []
    prompts = load_prompts(rows)
    spec = G.GenerationSpec(max_new_tokens=tokens, batch_size=rows)
    t0, c0 = time.perf_counter(), os.times()
    ro = G.generate(model, tok, prompts, spec, greedy=True)
    c1 = os.times()
    assert torch.is_tensor(ro.response_ids)
    return {"variant": variant, "wall_s": time.perf_counter() - t0, "user_s": c1.user - c0.user,
            "sys_s": c1.system - c0.system, "tokens": int(sum(ro.lengths))}


def run_children(script: str, variants, args: list[str]) -> list[dict]:
    """Run `script --child VARIANT ARGS` once per variant, each in its own process: its last stdout line (JSON)
    plus the child's peak RSS."""
    results = []
    for variant in variants:
        proc = subprocess.Popen([sys.executable, script, "--child", variant, *args], stdout=subprocess.PIPE, cwd=REPO)
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{variant} failed")
        results.append({**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": usage.ru_maxrss / 1024})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--child", choices=VARIANTS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.tokens)))
        return
    results = run_children(__file__, VARIANTS, ["--rows", str(args.rows), "--tokens", str(args.tokens)])
    base = results[0]
    print("| variant | wall s | user s | sys s | peak RSS MB | tokens | wall / trainable | RSS / trainable |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['tokens']} | {r['wall_s'] / base['wall_s']:.2f}x | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
