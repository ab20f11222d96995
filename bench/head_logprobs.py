"""PPO's log-probs and entropies of the response tokens: the LM head's full logits, then the log-softmax pieces
(`alignment.rl.logprobs_of_taken_tokens` + `entropy_from_logits`, how ppo.py computed them before), against
`alignment.rl.head_logprobs_and_entropy` (the head a chunk of positions at a time, the full logits never held).

One forward + backward per step, bf16 autocast, the shapes of a PPO minibatch (default: 8 responses x 128 tokens
through SmolLM2-135M's head, 576 x 49,152). Each variant runs in its own process (so its peak RSS is its own),
interleaved `--repeat` times. Reports wall and user/sys CPU seconds per step and the peak RSS above the process's
RSS before the first measured step (VmHWM after a reset of the high-water mark); ratios against the full logits.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/head_logprobs.py [--rows 8] [--tokens 128] [--vocab 49152]
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
VARIANTS = ("full_logits", "chunked_head")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def child(variant: str, rows: int, tokens: int, vocab: int, hidden: int, steps: int, threads: int) -> dict:
    import torch

    from alignment import rl

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) * 0.02).bfloat16()
    target = torch.randint(0, vocab, (rows, tokens))

    def step():
        h = torch.randn(rows, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if variant == "chunked_head":
                lp, ent = rl.head_logprobs_and_entropy(h, weight, target)
            else:
                logits = torch.nn.functional.linear(h, weight)
                lp, ent = rl.logprobs_of_taken_tokens(logits, target), rl.entropy_from_logits(logits)
        (lp.sum() + 0.01 * ent.sum()).backward()

    step()  # warm-up: oneDNN primitives, allocator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = _status("VmRSS")
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {"variant": variant, "wall_s": wall / steps, "user_s": (r1.ru_utime - r0.ru_utime) / steps,
            "sys_s": (r1.ru_stime - r0.ru_stime) / steps, "peak_above_start_mb": _status("VmHWM") - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    shape = dict(rows=a.rows, tokens=a.tokens, vocab=a.vocab, hidden=a.hidden, steps=a.steps, threads=a.threads)
    if a.child:
        print(json.dumps(child(a.child, **shape)))
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    runs = []
    for _ in range(a.repeat):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", v, *sum(
                ([f"--{k}", str(x)] for k, x in shape.items()), [])], env=env, check=True, capture_output=True,
                text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{a.rows} x {a.tokens} positions, head {a.hidden} x {a.vocab}, bf16 autocast, {a.threads} thread(s), "
          f"forward + backward, {a.steps} steps x {a.repeat} runs per variant")
    print("| variant | wall s / step | user s / step | sys s / step | peak above start (MB) |")
    print("|---|---:|---:|---:|---:|")
    mean = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        mean[v] = {k: sum(r[k] for r in rs) / len(rs) for k in ("wall_s", "user_s", "sys_s", "peak_above_start_mb")}
        m = mean[v]
        print(f"| {v} | {m['wall_s']:.3f} | {m['user_s']:.3f} | {m['sys_s']:.3f} | {m['peak_above_start_mb']:.0f} |")
    f, c = mean["full_logits"], mean["chunked_head"]
    print(f"chunked vs full: {f['wall_s'] / c['wall_s']:.2f}x wall, "
          f"{(f['user_s'] + f['sys_s']) / (c['user_s'] + c['sys_s']):.2f}x CPU, "
          f"{c['peak_above_start_mb'] / max(f['peak_above_start_mb'], 1):.3f}x peak memory")


if __name__ == "__main__":
    main()
