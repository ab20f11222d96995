"""bench/seeds_eval.py on hand-worked numbers: seeds averaged per prompt, then paired with the baseline."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_seeds_eval", REPO / "bench" / "seeds_eval.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _artifact(path: Path, gold: dict) -> Path:
    """An eval artifact's two sample files: {(split, id, policy): gold}; in_distribution rows in samples.jsonl."""
    path.mkdir()
    rows = [{"split": s, "id": i, "policy": p, "gold": g} for (s, i, p), g in gold.items()]
    for name, keep in (("samples.jsonl", True), ("samples_sets.jsonl", False)):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows
                                         if (r["split"] == "in_distribution") == keep))
    return path


def test_seeds_average_per_prompt_then_pair_with_the_baseline(tmp_path):
    sft = {("heldout", "a", "sft"): 0.0, ("heldout", "b", "sft"): 1.0, ("in_distribution", "c", "sft"): 0.0}
    s0 = _artifact(tmp_path / "s0", {**sft, ("heldout", "a", "grpo"): 1.0, ("heldout", "b", "grpo"): 1.0,
                                     ("in_distribution", "c", "grpo"): 0.0})
    s1 = _artifact(tmp_path / "s1", {**sft, ("heldout", "a", "grpo"): 0.0, ("heldout", "b", "grpo"): 0.0,
                                     ("in_distribution", "c", "grpo"): None})
    res = bench.summary([s0, s1], "grpo", "sft")
    # prompt a: seeds (1 + 0) / 2 = 0.5 vs 0 -> +0.5; prompt b: (1 + 0) / 2 = 0.5 vs 1 -> -0.5
    h = res["heldout"]
    assert h["prompts"] == 2 and h["seeds"] == 2 and h["sft"] == 0.5 and h["grpo"] == 0.5
    assert h["gain"] == 0.0 and h["per_seed"] == [1.0, 0.0]
    lo, hi = h["gain_ci"]
    assert lo == -0.5 and hi == 0.5  # two prompts: the bootstrap means are -0.5, 0 and +0.5
    assert "in_distribution" not in res  # seed 1 has no gold for its only prompt: nothing paired there
    with pytest.raises(SystemExit, match="no gold outcomes of 'ppo'"):
        bench.summary([s0], "ppo", "sft")
