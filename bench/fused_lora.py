"""peft's LoRA forward vs alignment.fused_lora's, one training step (forward + backward) at a time, interleaved.

A causal LM from MODEL_DIR (e.g. the base artifact's `model/`) gets LoRA r 16 on every linear layer (B drawn small
and non-zero, as after some training), then the same fixed batch of random token ids runs forward + backward with
each kernel in turn, `--reps` rounds, in one process, so load on the machine hits both alike. Prints CPU seconds
(user + sys), wall seconds and the ratio of the minimum and median CPU per step.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/fused_lora.py artifacts/smollm2/base/model \
        --reps 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    a = ap.parse_args()
    if not os.path.isdir(a.model_dir):
        raise SystemExit(f"{a.model_dir}: no such model folder")
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear
    from transformers import AutoModelForCausalLM

    from alignment.fused_lora import fuse_lora_layers

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(a.model_dir),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.length))

    def use(kernel: str) -> None:
        for m in model.modules():
            if isinstance(m, Linear) and "forward" in m.__dict__:
                del m.forward  # back to peft's class forward
        if kernel == "fused":
            fuse_lora_layers(model)

    cpu: dict[str, list[float]] = {"peft": [], "fused": []}
    wall: dict[str, list[float]] = {"peft": [], "fused": []}
    for _ in range(a.reps):
        for kernel in cpu:
            use(kernel)
            t0, c0 = time.perf_counter(), os.times()
            model(input_ids=ids, labels=ids).loss.backward()
            c1 = os.times()
            wall[kernel].append(time.perf_counter() - t0)
            cpu[kernel].append(c1.user - c0.user + c1.system - c0.system)
            model.zero_grad(set_to_none=True)
    print(f"{a.batch} x {a.length} tokens, {a.threads} thread(s), {a.reps} interleaved rounds")
    print("| kernel | CPU s per step: min | median | wall s: min | median |")
    print("|---|---|---|---|---|")
    for k in cpu:
        print(f"| {k} | {min(cpu[k]):.2f} | {statistics.median(cpu[k]):.2f} | {min(wall[k]):.2f} | "
              f"{statistics.median(wall[k]):.2f} |")
    print(f"fused / peft CPU: min {min(cpu['fused']) / min(cpu['peft']):.3f}, "
          f"median {statistics.median(cpu['fused']) / statistics.median(cpu['peft']):.3f}")


if __name__ == "__main__":
    main()
