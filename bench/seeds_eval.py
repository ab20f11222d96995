"""Several seeds of one policy against its baseline, per eval split: gold pass rates and the paired gain with a
bootstrap 95% CI, from eval-stage artifacts (their samples.jsonl and samples_sets.jsonl).

Each eval artifact holds one seed's policy and the same baseline (greedy, so the baseline's answers are the same
in every artifact). Per split and prompt, the policy's gold outcome is averaged over the seeds (seeds are repeated
measurements of one prompt, not more prompts), then the per-prompt difference to the baseline is bootstrapped over
prompts, as bench/algorithms.py does.

    .venv/bin/python bench/seeds_eval.py --policy grpo --baseline sft \\
        /tmp/runs/grpo-s0/smollm2/eval /tmp/runs/grpo-s1/smollm2/eval /tmp/runs/grpo-s2/smollm2/eval
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from alignment.evaluation import bootstrap_ci

FILES = ("samples.jsonl", "samples_sets.jsonl")
N_BOOT = 10_000


def outcomes(eval_dir: Path, policy: str) -> dict[tuple[str, str], float]:
    """{(split, prompt id): gold} of `policy` in one eval artifact (prompts without constraints left out)."""
    out = {}
    for name in FILES:
        path = eval_dir / name
        if not path.is_file():
            raise SystemExit(f"{path}: missing (is {eval_dir} an eval artifact?)")
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["policy"] == policy and row.get("gold") is not None:
                out[(row["split"], row["id"])] = float(row["gold"])
    if not out:
        raise SystemExit(f"{eval_dir}: no gold outcomes of '{policy}'")
    return out


def summary(dirs: list[Path], policy: str, baseline: str) -> dict:
    seeds = [outcomes(d, policy) for d in dirs]
    base = outcomes(dirs[0], baseline)
    keys = set(base).intersection(*seeds)
    out: dict = defaultdict(dict)
    for split in sorted({s for s, _ in keys}):
        ids = sorted(i for s, i in keys if s == split)
        pol = [sum(seed[(split, i)] for seed in seeds) / len(seeds) for i in ids]
        ref = [base[(split, i)] for i in ids]
        diff = [a - b for a, b in zip(pol, ref)]
        out[split] = {"prompts": len(ids), "seeds": len(seeds), baseline: sum(ref) / len(ref),
                      policy: sum(pol) / len(pol), f"{policy}_ci": bootstrap_ci(pol, n_boot=N_BOOT), "gain": sum(diff) / len(diff),
                      "gain_ci": bootstrap_ci(diff, n_boot=N_BOOT),
                      "per_seed": [sum(seed[(split, i)] for i in ids) / len(ids) for seed in seeds]}
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dirs", nargs="+", type=Path, help="eval artifacts, one per seed")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--baseline", default="sft")
    a = ap.parse_args()
    res = summary(a.eval_dirs, a.policy, a.baseline)
    print(f"| split (prompts) | {a.baseline} | {a.policy}, mean of {len(a.eval_dirs)} seeds [95% CI] | per seed | "
          f"gain, paired per prompt [95% CI] |")
    print("|---|---|---|---|---|")
    for split, r in res.items():
        lo, hi = r[f"{a.policy}_ci"]
        glo, ghi = r["gain_ci"]
        print(f"| {split} ({r['prompts']}) | {r[a.baseline]:.3f} | {r[a.policy]:.3f} [{lo:.3f}, {hi:.3f}] | "
              f"{', '.join(f'{x:.3f}' for x in r['per_seed'])} | {r['gain']:+.3f} [{glo:+.3f}, {ghi:+.3f}] |")


if __name__ == "__main__":
    main()
