"""bench/greedy_vs_sampled.py's summary on hand-worked rows: cut share, strict gold (EOS and every constraint
met), tokens; sampled rows map back to their prompt (prompt-major, k per prompt)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_greedy_vs_sampled", REPO / "bench" / "greedy_vs_sampled.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_summary_counts_cut_answers_as_failed_and_maps_samples_to_their_prompt():
    rows = [{"constraints": [{"type": "lowercase"}]}, {"constraints": [{"type": "max_words", "n": 3}]}]
    # k = 2: rows 0, 1 answer prompt 0 (lowercase), rows 2, 3 prompt 1 (at most 3 words)
    texts = ["all lower here", "all lower but cut", "Two words", "far too many words here"]
    roll = SimpleNamespace(texts=texts, has_eos=torch.tensor([True, False, True, True]), lengths=[4, 128, 3, 6])
    s = bench.summary(rows, roll, 2)
    # passing: row 0 (lowercase, EOS) and row 2 (2 words, EOS); row 1 meets lowercase but was cut
    assert s == {"cut": 0.25, "strict_gold": 0.5, "tokens": (4 + 128 + 3 + 6) / 4}
