"""GRPO rollouts on SmolLM2-135M-Instruct: TRL's own `generate` vs alignment.generation (`group.sampler`).

Runs the grpo stage (configs/smollm2/grpo.yaml, the gold check as reward, so no reward model is needed) for a few
optimizer steps from an existing SFT artifact, once per sampler, each in its own process, and reports wall time,
user and system CPU time (wait4), seconds per step and mean completion length (TRL's own log). Both runs
train the same way; only who samples differs (TRL recomputes every log-prob with its training forward).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/grpo_sampler.py \\
        --from /tmp/runs/pipe5/smollm2 [--steps 6] [--samplers trl engine]

`--from` is a run folder holding `base` and `sft` artifacts (e.g. `artifacts/smollm2` after `make sft`).
Output: a table on stdout and bench/out/grpo_sampler.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"


def run_stage(src: Path, sampler: str, steps: int, work: Path) -> dict:
    """One grpo stage run in a child process on a copy of `src`'s base and sft; its figures."""
    root = work / sampler
    (root / "smollm2").mkdir(parents=True)
    for stage in ("base", "sft"):
        shutil.copytree(src / stage, root / "smollm2" / stage, copy_function=os.link)
    cmd = [sys.executable, "-m", "alignment.cli", "-q", "run", "-c", "configs/smollm2/grpo.yaml", "--artifacts",
           str(root), "--run", "smollm2", "grpo", "reward.kind=function",
           "reward.function=alignment.reward_sources:gold_reward", f"group.sampler={sampler}",
           f"train.max_steps={steps}", "train.logging_steps=1", f"train.save_steps={steps}", "tracking=none"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {sampler} run failed (exit {os.waitstatus_to_exitcode(status)})")
    rows = [json.loads(x) for x in (root / "smollm2" / "grpo" / "log_history.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r]
    return {"sampler": sampler, "steps": len(rows), "wall_s": round(wall, 1), "user_s": round(usage.ru_utime, 1),
            "sys_s": round(usage.ru_stime, 1), "s_per_step": round(sum(r["step_time"] for r in rows) / len(rows), 2),
            "completion_tokens_per_row": round(sum(r["completions/mean_length"] for r in rows) / len(rows), 1),
            "reward_mean": round(sum(r["reward"] for r in rows) / len(rows), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", type=Path, required=True, help="a run folder with base/ and sft/")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--samplers", nargs="+", default=["trl", "engine"], choices=["trl", "engine"])
    a = ap.parse_args()
    for stage in ("base", "sft"):
        if not (a.src / stage / "manifest.json").is_file():
            raise SystemExit(f"{a.src / stage}: no published artifact (run `make sft` first)")
    with tempfile.TemporaryDirectory(prefix="grpo-sampler-") as work:
        rows = [run_stage(a.src, s, a.steps, Path(work)) for s in a.samplers]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "grpo_sampler.json").write_text(json.dumps({"steps": a.steps, "rows": rows}, indent=1))
    base = rows[0]
    print("| sampler | steps | wall s | user s | sys s | s / step | completion tokens / row | "
          f"s / step vs {base['sampler']} | CPU vs {base['sampler']} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu, cpu0 = r["user_s"] + r["sys_s"], base["user_s"] + base["sys_s"]
        print(f"| {r['sampler']} | {r['steps']} | {r['wall_s']} | {r['user_s']} | {r['sys_s']} | {r['s_per_step']} | "
              f"{r['completion_tokens_per_row']} | {base['s_per_step'] / r['s_per_step']:.2f}x | {cpu0 / cpu:.2f}x |")


if __name__ == "__main__":
    main()
