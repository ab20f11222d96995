"""Instruction mixtures: realised counts follow weights and caps; held-out data never trains."""

from __future__ import annotations

import json

import pytest

from alignment.cli import main
from alignment.config import load_config
from alignment.errors import ConfigError
from alignment.mixture import MAIN_EVAL, mixing_counts, realise_mixture
from alignment.schema import SFTData


@pytest.mark.parametrize(("available", "weights", "total", "want"), [
    # Rates 3:1, no total: the largest mixture with exact rates that repeats nothing.
    ({"a": 400, "b": 80}, {"a": 3, "b": 1}, None, {"a": 240, "b": 80}),
    # Equal rates but b has only 80: b gives all it has, a takes the rest of the 300.
    ({"a": 400, "b": 80}, {"a": 1, "b": 1}, 300, {"a": 220, "b": 80}),
    # No weights: examples-proportional (T5/FLAN), everything, or scaled down to the total.
    ({"a": 400, "b": 80}, None, None, {"a": 400, "b": 80}),
    ({"a": 400, "b": 80}, None, 240, {"a": 200, "b": 40}),
    # Rounding never loses or adds an example: 10 over three equal shares.
    ({"a": 100, "b": 100, "c": 100}, None, 10, {"a": 4, "b": 3, "c": 3}),
    # A total beyond the data is clipped to it; an empty source gets nothing.
    ({"a": 5, "b": 0}, {"a": 1, "b": 1}, 50, {"a": 5, "b": 0}),
])
def test_mixing_counts_by_hand(available, weights, total, want):
    assert mixing_counts(available, weights, total) == want


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _row(i, category=None, tag="a"):
    row = {"id": f"{tag}-{i}", "messages": [{"role": "user", "content": f"{tag} question {i}"},
                                            {"role": "assistant", "content": f"{tag} answer {i}"}]}
    if category:
        row["category"] = category
    return row


@pytest.fixture
def sources(tmp_path):
    """a: 150 train rows, 50 each of categories x/y/z (+ 30 eval); b: 50 rows without a category field
    (+ 10 eval), labelled 'w' by its source; c: 20 rows, evaluation only."""
    cats = ["x", "y", "z"]
    return {
        "a_train": _write(tmp_path / "a_train.jsonl", [_row(i, cats[i % 3], "a") for i in range(150)]),
        "a_eval": _write(tmp_path / "a_eval.jsonl", [_row(i, cats[i % 3], "a-eval") for i in range(30)]),
        "b_train": _write(tmp_path / "b_train.jsonl", [_row(i, tag="b") for i in range(50)]),
        "b_eval": _write(tmp_path / "b_eval.jsonl", [_row(i, tag="b-eval") for i in range(10)]),
        "c": _write(tmp_path / "c.jsonl", [_row(i, "x", "c") for i in range(20)]),
    }


def _data(sources, total=None, **extra):
    return SFTData.model_validate({
        "sources": [
            {"name": "a", "train": sources["a_train"], "eval": sources["a_eval"], "weight": 2},
            {"name": "b", "train": sources["b_train"], "eval": sources["b_eval"], "weight": 1, "cap": 30,
             "category": "w"},
            {"name": "c", "eval": sources["c"], "held_out": True},
        ],
        "held_out_categories": ["z"], "max_train_examples": total, **extra})


def test_realised_mixture_follows_weights_and_caps(sources):
    mix = realise_mixture(_data(sources), seed=0)
    used = {n: s["used"] for n, s in mix.report["sources"].items()}
    # a has 100 rows left once z is held out, b is capped at 30: rates 2:1 give 60 + 30.
    assert mix.report["sources"]["a"]["available"] == 100 and mix.report["sources"]["b"]["available"] == 50
    assert used == {"a": 60, "b": 30}
    assert sum(1 for ex in mix.train if ex["source"] == "a") == 60 and len(mix.train) == 90
    assert mix.report["sources"]["a"]["rate"] == pytest.approx(2 / 3, abs=1e-3)

    # A total larger than the rates allow: b stops at its cap, a takes the remainder.
    capped = realise_mixture(_data(sources, total=120), seed=0)
    assert {n: s["used"] for n, s in capped.report["sources"].items()} == {"a": 90, "b": 30}


def test_held_out_categories_and_sources_never_train(sources):
    mix = realise_mixture(_data(sources), seed=0)
    assert {ex["category"] for ex in mix.train} == {"x", "y", "w"}
    assert not any(ex["source"] == "c" for ex in mix.train)
    assert mix.report["train_categories"]["w"] == 30 and "z" not in mix.report["train_categories"]
    assert mix.report["held_out_categories"]["z"] == {"train_rows_dropped": 50, "eval_examples": 10}
    # Evaluation: per source, per held-out category (only its rows), held-out sources apart from the eval set.
    assert {ex["category"] for ex in mix.eval_groups["category:z"]} == {"z"}
    assert len(mix.eval_groups["source:c"]) == 20
    assert {ex["source"] for ex in mix.eval_groups[MAIN_EVAL]} == {"a", "b"}
    assert not any(ex["category"] == "z" for ex in mix.eval_groups[MAIN_EVAL])
    train_prompts = {ex["prompt"][0]["content"] for ex in mix.train}
    assert not train_prompts & {ex["prompt"][0]["content"] for g in mix.eval_groups.values() for ex in g}


def test_sampling_is_seeded(sources):
    def ids(seed):
        return [ex["prompt"][0]["content"] for ex in realise_mixture(_data(sources), seed=seed).train]

    assert ids(0) == ids(0) and ids(0) != ids(1)


def test_one_source_form_is_the_first_rows(tmp_path, sources):
    data = SFTData(train=sources["a_train"], eval=sources["a_eval"], max_train_examples=7, max_eval_examples=5)
    mix = realise_mixture(data, seed=0)
    assert [ex["prompt"][0]["content"] for ex in mix.train] == [f"a question {i}" for i in range(7)]
    assert list(mix.eval_groups) == [MAIN_EVAL] and len(mix.eval_groups[MAIN_EVAL]) == 5


@pytest.mark.parametrize(("body", "message"), [
    ("data:\n  train: x.jsonl\n  sources: [{name: a, train: a.jsonl}]\n",
     "data.train: use either data.train/data.eval (one source) or data.sources"),
    ("data:\n  sources: [{name: a, train: a.jsonl, weight: 1}, {name: b, train: b.jsonl}]\n",
     "data.sources: give every training source a weight"),
    ("data:\n  sources: [{name: a, train: a.jsonl}, {name: e, eval: e.jsonl}]\n",
     "data.sources.1.held_out: a source without train rows is eval-only"),
    ("data:\n  sources: [{name: a, train: a.jsonl, cap: 0}, {name: a, train: b.jsonl}]\n",
     "data.sources.0.cap: expected at least 1 example"),
])
def test_mixture_config_mistakes_are_refused_at_load(tmp_path, body, message):
    from stages.sft import Config

    path = tmp_path / "sft.yaml"
    path.write_text("stage: sft\n" + body)
    with pytest.raises(ConfigError) as e:
        load_config(Config, path)
    assert any(f"{path}: {message}" in p for p in e.value.problems), e.value.problems


def test_stage_records_the_realised_mixture_and_per_group_losses(tiny_store):
    root, _ = tiny_store
    assert main(["run", "sft", "-c", "configs/tiny/sft-mixture.yaml", "--artifacts", str(root), "--run", "mixture",
                 f"inputs.base={root}/tiny/base", "train.max_steps=3"]) == 0
    manifest = json.loads((root / "mixture" / "sft" / "manifest.json").read_text())
    m = manifest["metrics"]
    sources = m["mixture"]["sources"]
    assert sources["length"]["used"] == 3 * sources["format"]["used"] and m["train_examples"] == 64
    assert "end_with" not in m["mixture"]["train_categories"]
    assert m["mixture"]["held_out_categories"]["end_with"]["train_rows_dropped"] == 250  # 4,000 rows / 16 kinds
    assert set(m["eval_loss_by_source"]) == {"length", "format"}
    assert set(m["eval_loss_by_heldout_category"]) == set(m["eval_loss_before_by_heldout_category"]) == {"end_with"}
    assert m["packed_rows"] < m["train_examples"]
