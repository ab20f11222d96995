"""How a policy's greedy answers end against its sampled ones: share cut at the budget without an EOS, strict gold
(every constraint met and an EOS) and mean length, on training prompts the SFT stage never saw.

Why: the eval stage answers greedily, GRPO / PPO learn from samples. A small model's greedy answers can loop
until the budget where its samples end, and then a sampled group never shows the failure the evaluation counts
(docs/algorithms.md, "GRPO's greedy member"). Rows `--skip` .. `--skip + --prompts` of data/instruct/train.jsonl
(configs/smollm2/sft.yaml trains on the first 400), never the eval splits.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/greedy_vs_sampled.py \\
        artifacts/smollm2/sft --temperatures 1.0 0.7
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def summary(rows: list[dict], roll, k: int) -> dict:
    from alignment import gold

    eos = roll.has_eos.tolist()
    strict = [float(e and gold.passes(t, rows[i // k]["constraints"])) for i, (t, e) in enumerate(zip(roll.texts, eos))]
    return {"cut": 1 - sum(eos) / len(eos), "strict_gold": sum(strict) / len(strict),
            "tokens": sum(roll.lengths) / len(eos)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path, help="a policy artifact folder (<root>/<run>/<stage>)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--skip", type=int, default=2000, help="training rows to skip (the SFT stage's are the first)")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per prompt and temperature")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args(argv)

    from alignment.artifacts import ArtifactStore
    from alignment.generation import GenerationSpec, generate
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.prompts import load_prompts

    art = ArtifactStore(args.artifact.parent.parent).read(args.artifact)
    model, tok = load_policy(art, "auto").eval(), load_tokenizer(art.model_dir)
    rows = [p for p in load_prompts(str(REPO / "data/instruct/train.jsonl"), None) if p.get("constraints")]
    rows = rows[args.skip:args.skip + args.prompts]
    prompts = [r["prompt"] for r in rows]
    base = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=64)
    print(f"{args.artifact}: {len(rows)} training prompts (rows {args.skip}+), {args.max_new_tokens} new tokens")
    print("| decoding | cut (no EOS) | strict gold | tokens |\n|---|---:|---:|---:|")
    runs = [("greedy", base, 1, True)] + [
        (f"sampled, T={t}, x{args.samples}", base.model_copy(update={
            "do_sample": True, "temperature": t, "num_return_sequences": args.samples}), args.samples, False)
        for t in args.temperatures]
    for name, spec, k, greedy in runs:
        s = summary(rows, generate(model, tok, prompts, spec, seed=None if greedy else 1, greedy=greedy or None), k)
        print(f"| {name} | {s['cut']:.3f} | {s['strict_gold']:.3f} | {s['tokens']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
