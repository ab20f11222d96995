"""The cost of merging a LoRA adapter for a rollout and putting the base back, on SmolLM2-135M-Instruct (bf16).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/lora_merge.py [--repeat 5]

A LoRA r=16 on every linear layer (210 layers, B random so the merge is not a no-op), fp32 adapter weights as peft
makes them. One merge + restore per repeat, all variants in one process, interleaved, one thread:

- `peft`: peft's own `merge_adapter()` + `unmerge_adapter()` (the baseline: the maintained API; its unmerge does
  not give the base back bit for bit, which is why the PPO trainer does not use it);
- `merged`: `alignment.generation.merged_lora` into copies (`ppo.rollout_weights: merged`);
- `merged_in_place`: `merged_lora` with a `WeightStash` (`ppo.rollout_weights: merged_in_place`); its first
  repeat also writes the stash, so the table reports the median.

Prints median wall ms, user and system CPU ms per merge + restore, and the ratio to `peft`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    import torch
    from generation import ensure_model
    from peft import LoraConfig, get_peft_model

    from alignment import generation as G
    from alignment.models import load_causal_lm

    torch.set_num_threads(1)
    peft = get_peft_model(load_causal_lm(ensure_model(), "bf16"),
                          LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    stash = G.WeightStash()

    def peft_merge():
        peft.merge_adapter()
        peft.unmerge_adapter()

    def ours(stash=None):
        with torch.no_grad(), G.merged_lora(peft, "default", stash=stash):
            pass

    variants = {"peft": peft_merge, "merged": ours, "merged_in_place": lambda: ours(stash)}
    times = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, run in variants.items():
            t0, c0 = time.perf_counter(), os.times()
            run()
            c1 = os.times()
            times[name].append((time.perf_counter() - t0, c1.user - c0.user, c1.system - c0.system))
    print(f"{len(G._adapted_layers(peft, 'default'))} adapted layers, {args.repeat} repeats, medians")
    print("| variant | wall ms | user ms | sys ms | wall / peft |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(t[0] for t in times["peft"])
    for name, rows in times.items():
        wall, user, sys_ = (statistics.median(t[i] for t in rows) for i in range(3))
        print(f"| {name} | {1000 * wall:.0f} | {1000 * user:.0f} | {1000 * sys_:.0f} | {wall / base:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
