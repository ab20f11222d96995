"""The tiny chain on a GPU machine: every stage runs, and runs on the GPU (not silently on the CPU beside it).

    ALIGN_TRACKING=none HF_HUB_OFFLINE=1 python bench/gpu_smoke.py --artifacts /tmp/gpu-art --out gpu_smoke.json

Runs `align pipeline` on configs/tiny/pipeline.yaml (base, sft, reward, dpo, eval, ppo, eval), then label (RLAIF,
local judge), grpo, online_dpo, generate (Self-Instruct) and PPO again in bf16 (`precision=auto`), each as its own
`python -m alignment.cli` process. Then it reads every manifest: the stage's `versions.device` and its
`metrics.cuda_peak_memory_mb` (a stage whose model stayed on the CPU reports none). Exit 1 when a step fails, or
when a stage that holds a model reports no GPU memory. On a machine without a GPU it runs the same chain and says
so (its wall times are not a baseline for the GPU's: another machine, another run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TINY = Path("configs/tiny")


def steps(root: Path) -> list[tuple[str, str, list[str]]]:
    """(step name, run name, align arguments before the artifacts/run flags); the last reuses run tiny's sft and
    reward artifacts under its own run, so it does not replace tiny's fp32 PPO."""
    tiny = root / "tiny"
    return [
        ("pipeline", "tiny", ["pipeline", "-c", str(TINY / "pipeline.yaml")]),
        ("label", "tiny", ["run", "label", "-c", str(TINY / "label.yaml")]),
        ("grpo", "tiny", ["run", "grpo", "-c", str(TINY / "grpo.yaml")]),
        ("online_dpo", "tiny", ["run", "online_dpo", "-c", str(TINY / "online_dpo.yaml")]),
        ("generate", "tiny", ["run", "generate", "-c", str(TINY / "generate.yaml")]),
        ("ppo bf16", "tiny-bf16", ["run", "ppo", "-c", str(TINY / "ppo.yaml"), "precision=auto",
                                   f"inputs.sft={tiny / 'sft'}", f"inputs.reward={tiny / 'reward'}"]),
    ]


# base imports weights and writes them out: it holds no model on the GPU by design
NO_MODEL_ON_GPU = {"base"}


def run_steps(root: Path) -> list[dict]:
    rows = []
    for name, run, args in steps(root):
        cmd = [sys.executable, "-m", "alignment.cli", *args, "--artifacts", str(root), "--run", run]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        rows.append({"step": name, "rc": res.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                     "stderr": res.stderr.strip().splitlines()[-60:] if res.returncode else []})
        print(f"{name:12s} rc={res.returncode} {rows[-1]['wall_s']:7.1f}s", *rows[-1]["stderr"][-3:], sep="\n  ",
              flush=True)
    return rows


def stage_rows(root: Path) -> list[dict]:
    out = []
    for manifest in sorted(root.glob("*/*/manifest.json")):
        m = json.loads(manifest.read_text())
        out.append({"run": m["run"], "stage": m["stage"], "device": m["versions"].get("device"),
                    "cuda_peak_memory_mb": m["metrics"].get("cuda_peak_memory_mb"),
                    "precision": m["config"].get("precision")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    print("GPU:", torch.cuda.get_device_name(0) if gpu else "none (CPU run)", flush=True)
    root = Path(a.artifacts)
    steps = run_steps(root)
    stages = stage_rows(root)
    for s in stages:
        print(f"{s['run']:10s} {s['stage']:11s} {s['precision']!s:5s} {s['device']!s:24s} "
              f"cuda peak {s['cuda_peak_memory_mb']} MB")
    bad = [r["step"] for r in steps if r["rc"]]
    if gpu:
        bad += [f"{s['run']}/{s['stage']} (no GPU memory)" for s in stages
                if s["stage"] not in NO_MODEL_ON_GPU and not s["cuda_peak_memory_mb"]]
    if a.out:
        Path(a.out).write_text(json.dumps({"gpu": gpu, "steps": steps, "stages": stages, "failed": bad}, indent=1))
    print("FAILED: " + ", ".join(bad) if bad else "all steps ran" + (" on the GPU" if gpu else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
