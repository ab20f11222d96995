"""Peak RSS and training tokens/s of the DPO stage against the SFT stage, measured in one run.

Each stage runs as its own `align run` subprocess with the profile's config and only the step
count cut (`train.max_steps`), so both include everything the stage does (loading, training,
evaluation, saving). Peak RSS is the child's own ru_maxrss from wait4, not the stage's self-report.
DPO reads the SFT artifact this script has just built, so the two rows share base and data.

    .venv/bin/python bench/dpo_memory.py --artifacts /tmp/bench --steps 8 --lock /tmp/heavy.lock

Rows: sft (LoRA), dpo (LoRA, the reference = adapter disabled), dpo with
precompute_ref_log_probs, and dpo with all 8 pairs of a step in one micro-batch.
Writes bench/out/dpo_memory.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # the benches' shared helpers
from _child import run_align  # noqa: E402


@contextlib.contextmanager
def held(lock: Path | None):
    """One heavy job at a time on a shared machine: hold `lock` (flock) around each stage run."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_stage(stage: str, profile: str, root: Path, run: str, steps: int, extra: list[str],
              lock: Path | None = None) -> dict:
    args = ["run", stage, "-c", f"configs/{profile}/{stage}.yaml", "--artifacts", str(root), "--run", run,
            f"train.max_steps={steps}", "train.save_steps=100000", "--force", *extra]
    with held(lock):
        done = run_align(args)
    if done.code != 0:
        sys.exit(f"align {' '.join(args)} failed ({done.code}):\n{done.err[-3000:]}")
    metrics = json.loads((root / run / stage / "manifest.json").read_text())["metrics"]
    return {"peak_rss_mib": round(done.usage.ru_maxrss / 1024, 1), "wall_s": round(done.wall_s, 1),
            "train_seconds": metrics.get("train_seconds"), "train_tokens": metrics.get("train_tokens"),
            "tokens_per_s": metrics.get("tokens_per_s"), "steps": metrics.get("steps"),
            "trainable_params": metrics.get("trainable_params")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True, type=Path, help="artifact root for the bench runs")
    p.add_argument("--profile", default="smollm2", choices=("smollm2", "tiny"))
    p.add_argument("--steps", type=int, default=8, help="optimiser steps per stage")
    p.add_argument("--lock", type=Path, help="flock this file around each stage (shared machines)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "dpo_memory.json")
    a = p.parse_args()
    root = a.artifacts.resolve()

    base_run = {"smollm2": "smollm2", "tiny": "tiny"}[a.profile]
    # The base import is not measured: it is the same for both stages (and skipped when up to date).
    with held(a.lock):
        res = subprocess.run([sys.executable, "-m", "alignment.cli", "run", "base", "-c",
                              f"configs/{a.profile}/base.yaml", "--artifacts", str(root), "--run", base_run],
                             cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        sys.exit(res.stderr[-3000:])
    base = root / base_run / "base"
    rows = {"sft": run_stage("sft", a.profile, root, "bench", a.steps, [f"inputs.base={base}"], a.lock)}
    sft = root / "bench" / "sft"
    rows["dpo"] = run_stage("dpo", a.profile, root, "bench", a.steps, [f"inputs.sft={sft}"], a.lock)
    rows["dpo_precompute"] = run_stage("dpo", a.profile, root, "bench-pre", a.steps,
                                       [f"inputs.sft={sft}", "dpo.precompute_ref_log_probs=true"], a.lock)
    # 8 pairs in one micro-batch: 16 sequences per forward, twice SFT's 8 (what the default avoids).
    rows["dpo_microbatch8"] = run_stage("dpo", a.profile, root, "bench-mb8", a.steps,
                                        [f"inputs.sft={sft}", "train.batch_size=8", "train.grad_accum=1",
                                         "train.eval_batch_size=16"], a.lock)
    ratio = {k: round(v["peak_rss_mib"] / rows["sft"]["peak_rss_mib"], 3) for k, v in rows.items()}
    report = {"profile": a.profile, "steps": a.steps, "rows": rows, "peak_rss_vs_sft": ratio,
              "goal": "dpo peak RSS <= 1.1x sft (LoRA)", "met": ratio["dpo"] <= 1.1,
              "cpu_threads": os.cpu_count()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(f"profile {a.profile}, {a.steps} steps per stage\n")
    print("| stage | peak RSS (MiB) | vs sft | train tokens/s | train s | wall s |")
    print("|---|---|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['peak_rss_mib']} | {ratio[k]}x | {v['tokens_per_s']} | {v['train_seconds']} | "
              f"{v['wall_s']} |")
    print(f"\ngoal dpo <= 1.1x sft: {'met' if report['met'] else 'NOT met'} ({ratio['dpo']}x)")


if __name__ == "__main__":
    main()
