"""The rollout regime of PPO on a policy artifact: at each response budget, the share of answers cut without an
EOS, their mean length and their gold score (alignment.gold), on training prompts, sampled at T=1 as PPO's
rollouts are (and greedy at the largest budget). Chooses `ppo.max_new_tokens` from evidence (docs/ppo.md).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo_regime.py --artifacts artifacts \
        --run smollm2 --stage sft --budgets 40 128 --prompts 64
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--run", default="smollm2")
    ap.add_argument("--stage", default="sft", help="the policy artifact (sft; base for the instruct model alone)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[40, 128])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()

    from alignment.artifacts import ArtifactStore
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.ppo import PPOSpec, PPOTrainer, fields_of, lora_config
    from alignment.prompts import load_prompts
    from alignment.reward_sources import gold_reward
    from alignment.schema import PeftSpec

    art = ArtifactStore(a.artifacts).read_stage(a.run, a.stage)
    rows = load_prompts("data/instruct/train.jsonl", a.prompts)
    trainer = PPOTrainer(load_policy(art, "auto"), load_tokenizer(art.model_dir), gold_reward, PPOSpec(),
                         lora_config(PeftSpec(r=16, alpha=32, dropout=0.0, target_modules="all-linear")))
    out = {}
    for budget in a.budgets:
        for greedy in (False, True) if budget == max(a.budgets) else (False,):
            t0 = time.perf_counter()
            m, _ = trainer.evaluate([r["prompt"] for r in rows], fields_of(rows), batch_size=a.prompts,
                                    greedy=greedy, max_new_tokens=budget, seed=0)
            key = f"{budget} tokens, {'greedy' if greedy else 'sampled T=1'}"
            out[key] = {"missing_eos_rate": round(m["eval/missing_eos_rate"], 3),
                        "mean_length": round(m["eval/response_length"], 1), "gold": round(m["eval/reward"], 3),
                        "seconds": round(time.perf_counter() - t0, 1)}
            print(key, out[key], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
