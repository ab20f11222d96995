"""Reference curves: the loss curve and key metrics of each stage's tiny run, kept in the repository.

`tests/test_reference_curves.py` reruns the chain base -> sft -> reward -> dpo (seed 0) with the pinned configs
(`tests/reference/configs/`) and data (`tests/reference/data/`: the first rows of the bundled files, so a rebuilt
data/ does not move the curves) and compares it with `tests/reference/<stage>.json`.

Tolerance, from seed noise: the same chain runs with seeds 0, 1 and 2 (LoRA initialisation and data order
change; the base model stays the same). For the loss curve, the across-seed standard deviation at each logged
step, averaged over the steps; for each metric, its across-seed standard deviation. The tolerance is
K = 0.5 of that (at least FLOOR): a code change that moves a curve by half of what changing the seed does is
reported. A rerun with the same seed on the same kind of machine is bit-for-bit (CPU, fp32), so the margin
only absorbs library and hardware differences.

    python tests/reference/refcurves.py [--stages sft reward dpo] [--seeds 0 1 2]     (make update-reference)

rewrites the JSON files and prints what changed against the previous ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REF = Path(__file__).resolve().parent
REPO = REF.parent.parent
STAGES = ("sft", "reward", "dpo")
SEEDS = (0, 1, 2)
K = 0.5
FLOOR = 1e-4
# Timing, memory and bookkeeping figures are not the math: left out of the comparison.
NOT_MATH = ("seconds", "per_s", "runtime", "per_second", "flos", "rss", "tokens", "params", "examples", "pairs", "steps",
            "step", "prompts")


def run_chain(root: Path, seed: int, stages=STAGES) -> dict[str, dict]:
    """Run base -> sft -> the requested stages with `seed`; {stage: {"loss": [[step, loss]...], "metrics": {...}}}."""
    from alignment.runner import run_stage

    os.chdir(REPO)  # the pinned configs name data by repository-relative paths
    run = f"ref-s{seed}"
    run_stage("base", str(REF / "configs" / "base.yaml"), root=root, run=run)  # the same base for every seed
    out = {}
    for stage in ("sft",) + tuple(s for s in stages if s != "sft"):
        art = run_stage(stage, str(REF / "configs" / f"{stage}.yaml"), [f"seed={seed}"], root=root, run=run)
        if stage in stages:
            out[stage] = read_run(art)
    return out


def read_run(art: Path) -> dict:
    history = [json.loads(line) for line in (art / "log_history.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((art / "manifest.json").read_text())["metrics"]
    # One level of nesting (DPO's held-out figures live under "eval"): "eval.accuracy".
    flat = dict(metrics)
    for key, sub in metrics.items():
        if isinstance(sub, dict):
            flat.update({f"{key}.{k}": v for k, v in sub.items()})
    keep = {k: float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not any(w in k for w in NOT_MATH)
            and math.isfinite(float(v))}
    return {"loss": [[h["step"], h["loss"]] for h in history if "loss" in h], "metrics": dict(sorted(keep.items()))}


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def tolerance(runs: list[dict]) -> dict:
    """Tolerances from the across-seed spread of `runs` (the same stage, one per seed)."""
    steps = min(len(r["loss"]) for r in runs)
    step_std = [_std([r["loss"][i][1] for r in runs]) for i in range(steps)]
    loss_std = sum(step_std) / len(step_std) if step_std else 0.0
    names = sorted(set.intersection(*(set(r["metrics"]) for r in runs)))
    metric_std = {n: _std([r["metrics"][n] for r in runs]) for n in names}
    return {"loss": max(FLOOR, K * loss_std), "metrics": {n: max(FLOOR, K * s) for n, s in metric_std.items()},
            "seed_noise": {"loss_std_mean_over_steps": loss_std, "metric_std": metric_std}}


def compare(ref: dict, got: dict) -> list[str]:
    """One line per difference beyond tolerance; empty when the rerun matches the reference."""
    stage, tol, problems = ref["stage"], ref["tolerance"], []
    want, have = ref["loss"], got["loss"]
    if [s for s, _ in want] != [s for s, _ in have]:
        problems.append(f"{stage}: loss logged at steps {[s for s, _ in have]}, reference {[s for s, _ in want]}")
    for (step, a), (_, b) in zip(want, have):
        if abs(a - b) > tol["loss"]:
            problems.append(f"{stage}: loss at step {step} is {b:.6f}, reference {a:.6f} "
                            f"(|diff| {abs(a - b):.2e} > tolerance {tol['loss']:.2e})")
    for name, a in ref["metrics"].items():
        b = got["metrics"].get(name)
        if b is None:
            problems.append(f"{stage}: metric {name} missing (reference {a:.6f})")
        elif abs(a - b) > tol["metrics"].get(name, FLOOR):
            problems.append(f"{stage}: {name} is {b:.6f}, reference {a:.6f} "
                            f"(|diff| {abs(a - b):.2e} > tolerance {tol['metrics'].get(name, FLOOR):.2e})")
    return problems


def pinned_files() -> dict[str, str]:
    """sha256 of every pinned data and config file (the test refuses a reference built from other ones)."""
    files = sorted((REF / "data").glob("*.jsonl")) + sorted((REF / "configs").glob("*.yaml"))
    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def build(stage: str, per_seed: dict[int, dict], seeds) -> dict:
    import peft
    import torch
    import transformers
    import trl

    tol = tolerance([per_seed[s][stage] for s in seeds])
    ref = per_seed[seeds[0]][stage]
    return {
        "stage": stage, "config": f"tests/reference/configs/{stage}.yaml", "seed": seeds[0],
        "loss": ref["loss"], "metrics": ref["metrics"],
        "tolerance": {"loss": tol["loss"], "metrics": tol["metrics"]},
        "seed_noise": {"seeds": list(seeds), **tol["seed_noise"],
                       "rule": f"tolerance = max({FLOOR}, {K} * across-seed std); loss: the std at each logged step, "
                               "averaged over the steps; each metric: its own std"},
        "pinned": pinned_files(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__},
    }


def summary(old: dict | None, new: dict) -> str:
    if old is None:
        return f"{new['stage']}: new reference ({len(new['loss'])} loss points, {len(new['metrics'])} metrics)"
    moved = compare(old, {"loss": new["loss"], "metrics": new["metrics"]})
    dl = max((abs(a[1] - b[1]) for a, b in zip(old["loss"], new["loss"])), default=0.0)
    head = (f"{new['stage']}: max |loss diff| {dl:.2e}; loss tolerance {old['tolerance']['loss']:.2e} -> "
            f"{new['tolerance']['loss']:.2e}; {len(moved)} difference(s) beyond the old tolerance")
    return "\n".join([head] + [f"    {m}" for m in moved[:8]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="rerun the reference chain over seeds and rewrite tests/reference/*.json")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("--seeds: at least two seeds, the tolerance comes from their spread")
    with tempfile.TemporaryDirectory(prefix="align-ref-") as tmp:
        per_seed = {s: run_chain(Path(tmp), s, tuple(args.stages)) for s in args.seeds}
    for stage in args.stages:
        path = REF / f"{stage}.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        new = build(stage, per_seed, args.seeds)
        path.write_text(json.dumps(new, indent=1) + "\n")
        print(summary(old, new))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ALIGN_TRACKING", "none")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
