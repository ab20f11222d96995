"""Per-kind accuracy of a trained reward model on the training pairs it saw (the first 1,200 of a file, by default):
does a kind fail because the RM never fitted it, or because what it fitted does not carry to new wordings?
(docs/reward.md, "One-edit pairs"). Prints one JSON object: kind -> [accuracy, pairs].

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/rm_train_fit.py RM_ARTIFACT/model PAIRS.jsonl KIND,KIND
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a published reward model folder (<artifact>/model)")
    ap.add_argument("pairs", type=Path, help="the preference pairs it trained on (jsonl)")
    ap.add_argument("kinds", help="comma-separated categories to report")
    ap.add_argument("--first", type=int, default=1200, help="pairs of the file the RM trained on (its data cap)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        return _fail(f"{args.model}: not a reward model folder (no config.json)")
    if not args.pairs.is_file():
        return _fail(f"{args.pairs}: no such pairs file")

    import torch

    from alignment.preferences import load_pairs
    from alignment.reward import load_reward_model, pairwise_accuracy, score_pairs

    torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    pairs = [p for p in load_pairs(str(args.pairs))[: args.first] if p.get("category") in kinds]
    missing = sorted(set(kinds) - {p["category"] for p in pairs})
    if missing:
        return _fail(f"{args.pairs}: no pair of kind {', '.join(missing)} among its first {args.first}")
    model, tok = load_reward_model(args.model)
    with torch.no_grad():
        s = score_pairs(model, tok, pairs, batch_size=16, max_length=512)
    by_kind = defaultdict(list)
    for i, p in enumerate(pairs):
        by_kind[p["category"]].append(i)
    print(json.dumps({k: [round(pairwise_accuracy([s["chosen"][i] for i in idx], [s["rejected"][i] for i in idx]), 3),
                          len(idx)] for k, idx in sorted(by_kind.items())}))
    return 0


def _fail(message: str) -> int:
    print(f"rm_train_fit: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
