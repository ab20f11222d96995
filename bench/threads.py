"""What a second torch thread buys on this CPU, against a second process: the measurement behind `jobs: 2`.

Two workloads, each variant in its own child process (so thread counts and CPU times are clean):
  matmul    a bf16 [2048 x 768] x [768 x 3072] linear for 8 s: one thread, two threads, and two one-thread
            processes side by side
  sample    alignment.generation.generate on the SmolLM2 base (bf16, sampled, --tokens new tokens) at 8, 16 and
            64 rows, one thread against two
Reports wall, user and system CPU seconds of the measured part of each variant (not the imports or model
loading), and the ratios against the one-thread baseline of the same run.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/threads.py --model artifacts/smollm2/base/model
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def matmul(seconds: float = 8.0) -> dict:
    import torch

    x, w = torch.randn(2048, 768, dtype=torch.bfloat16), torch.randn(3072, 768, dtype=torch.bfloat16)
    for _ in range(5):
        torch.nn.functional.linear(x, w)
    t, n, ru = time.perf_counter(), 0, _usage()
    while time.perf_counter() - t < seconds:
        torch.nn.functional.linear(x, w)
        n += 1
    wall = time.perf_counter() - t
    return {"gflops": 2 * 2048 * 768 * 3072 * n / wall / 1e9, "seconds": wall, **_since(ru)}


def _usage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def _since(before: tuple[float, float]) -> dict:
    """User and system CPU seconds of this process since `before` (the measured part only, not the imports)."""
    now = _usage()
    return {"user_s": now[0] - before[0], "sys_s": now[1] - before[1]}


def sample(model_dir: str, rows: int, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.generation import GenerationSpec, generate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    lines = (REPO / "data/instruct/eval.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["messages"][:1] for line in lines[:max(rows, 16)]]
    spec = GenerationSpec(max_new_tokens=tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, batch_size=rows)
    generate(model, tok, prompts[:rows], spec, seed=0, max_new_tokens=4)  # warm-up
    t, ru = time.perf_counter(), _usage()
    ro = generate(model, tok, prompts, spec, seed=0)
    return {"seconds": time.perf_counter() - t, "tokens": int(ro.response_mask.sum()), **_since(ru)}


def _child(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, __file__, "--child", *args], env=env, stdout=subprocess.PIPE, text=True)


def _wait(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        text = p.stdout.read()
        if p.wait() != 0:
            raise SystemExit(f"bench/threads.py: a child failed (exit {p.returncode})")
        out.append(json.loads(text.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="artifacts/smollm2/base/model", help="a HF model folder (the base stage's)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        res = matmul() if a.child[0] == "matmul" else sample(a.model, int(a.child[1]), a.tokens)
        print(json.dumps(res))
        return
    print("| workload | variant | wall s | user s | sys s | result | vs one thread |")
    print("|---|---|---:|---:|---:|---|---:|")
    for name, variants in (("matmul", [("1 thread", 1, 1), ("2 threads", 2, 1), ("2 processes x 1 thread", 1, 2)]),):
        base = None
        for label, threads, procs in variants:
            res = _wait([_child(["matmul"], threads) for _ in range(procs)])
            wall, total = max(r["seconds"] for r in res), sum(r["gflops"] for r in res)
            base = base or total
            print(f"| bf16 matmul | {label} | {wall:.1f} | {sum(r['user_s'] for r in res):.1f} | "
                  f"{sum(r['sys_s'] for r in res):.1f} | {total:.0f} GFLOP/s in all | {total / base:.2f}x |")
    for rows in (8, 16, 64):
        base = None
        for threads in (1, 2):
            r = _wait([_child(["sample", str(rows), "--model", a.model, "--tokens", str(a.tokens)], threads)])[0]
            base = base or r["seconds"]
            print(f"| sample {rows} rows | {threads} thread{'s' * (threads > 1)} | {r['seconds']:.1f} | "
                  f"{r['user_s']:.1f} | {r['sys_s']:.1f} | {r['tokens'] / r['seconds']:.0f} tokens/s | "
                  f"{base / r['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
