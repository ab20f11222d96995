"""A tiny chat LM for the generation tests (hf and vllm backends): real BPE tokenizer, ChatML, random weights.

Head size 32 (vLLM's CPU attention supports 32 and up) and weights drawn with std 0.2 instead of the usual
0.02, so next-token logits have clear gaps and a greedy choice never hinges on float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(folder: Path, seed: int = 0):
    """(model, tokenizer), also saved to `folder` (safetensors + tokenizer files)."""
    import torch

    from alignment.models import build_tiny_random

    texts = [json.loads(line)["messages"][0]["content"]
             for line in (REPO / "data/instruct/train.jsonl").read_text().splitlines()[:200] if line.strip()]
    model, tok = build_tiny_random(texts, vocab_size=384, hidden_size=64, layers=2, heads=2, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


PROMPTS = [[{"role": "user", "content": c}] for c in (
    "Name a colour.",
    "What should I know about clocks? Use no fewer than 20 words. Do not use any capital letters.",
    "Tell me about rivers.",
    "I am curious about mountains and the weather on them. What can you tell me? Reply in two sentences.",
    "Hi.",
)]
