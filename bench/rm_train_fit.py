"""Per-kind accuracy of a trained reward model on the training pairs it saw (the first 1,200 of a file): does a kind
fail because the RM never fitted it, or because what it fitted does not carry to new wordings? (docs/reward.md)

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/rm_train_fit.py RM_ARTIFACT/model PAIRS.jsonl KIND,KIND
"""
import json, sys
from collections import defaultdict
import torch
torch.set_num_threads(2)
from alignment.reward import load_reward_model, score_pairs
from alignment.preferences import load_pairs
rm_dir, path, kinds = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
pairs = [p for p in load_pairs(path)[:1200] if p.get("category") in kinds]
model, tok = load_reward_model(rm_dir)
with torch.no_grad():
    s = score_pairs(model, tok, pairs, batch_size=16, max_length=512)
acc = defaultdict(list)
for p, c, r in zip(pairs, s["chosen"], s["rejected"]):
    acc[p["category"]].append(c > r)
print(json.dumps({k: [round(sum(v) / len(v), 3), len(v)] for k, v in sorted(acc.items())}))
