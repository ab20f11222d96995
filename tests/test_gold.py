"""The gold judge on hand-worked cases, and the bundled instruct data against it."""

import json
from pathlib import Path

import pytest

from alignment.gold import CHECKS, check, count_words, passes, score

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", 0),
        ("The moon is bright.", 4),
        ("- one bullet\n- two bullets", 4),  # the '-' marker is not a word
        ("Don't split well-known words like 3.5 or e.g.", 8),
        ("  spaced   out\n\ttext  ", 3),
    ],
)
def test_count_words(text, words):
    assert count_words(text) == words


@pytest.mark.parametrize(
    ("response", "constraint", "ok"),
    [
        ("One two three.", {"type": "max_words", "n": 3}, True),
        ("One two three four.", {"type": "max_words", "n": 3}, False),
        ("", {"type": "max_words", "n": 0}, True),
        ("One two three.", {"type": "min_words", "n": 3}, True),
        ("One two.", {"type": "min_words", "n": 3}, False),
        ("The River is wide.", {"type": "keyword", "word": "river"}, True),
        ("Rivers are wide.", {"type": "keyword", "word": "river"}, False),  # whole word only
        ("A riverbank.", {"type": "keyword", "word": "river"}, False),
        ("We reached the river.", {"type": "keyword", "word": "river"}, True),
        ("The solar system is big.", {"type": "keyword", "word": "Solar System"}, True),
        ("Intro:\n- a\n- b\nOutro", {"type": "bullets", "n": 2}, True),
        ("- a\n- b\n- c", {"type": "bullets", "n": 2}, False),
        ("* a\n* b", {"type": "bullets", "n": 2}, False),  # only '- ' counts
        ("-a\n-b", {"type": "bullets", "n": 2}, False),
        ("plain prose.", {"type": "bullets", "n": 0}, True),
        ("all lower case, 42 times!", {"type": "lowercase"}, True),
        ("not quite Lower.", {"type": "lowercase"}, False),
        ("accented é ü are lowercase too", {"type": "lowercase"}, True),
        ("almost É", {"type": "lowercase"}, False),
        ("Some text. Hope this helps.  \n", {"type": "end_with", "phrase": "Hope this helps."}, True),
        ("Some text. Hope this helps", {"type": "end_with", "phrase": "Hope this helps."}, False),
        ("Hope this helps. More text.", {"type": "end_with", "phrase": "Hope this helps."}, False),
        ("Some text. hope this helps.", {"type": "end_with", "phrase": "Hope this helps."}, False),  # exact case
    ],
)
def test_check(response, constraint, ok):
    assert check(response, constraint) is ok


def test_check_covers_every_known_type():
    assert set(CHECKS) == {"max_words", "min_words", "keyword", "bullets", "lowercase", "end_with"}


def test_unknown_type_names_the_type():
    with pytest.raises(ValueError, match="unknown constraint type 'rhyme'"):
        check("text", {"type": "rhyme"})


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        ({"n": 3}, "must be a dict with a 'type'"),
        ({"type": "max_words"}, "'max_words' needs 'n'"),
        ({"type": "min_words", "n": -1}, "'min_words' needs 'n'"),
        ({"type": "bullets", "n": True}, "'bullets' needs 'n'"),
        ({"type": "keyword", "word": " "}, "'keyword' needs 'word'"),
        ({"type": "end_with"}, "'end_with' needs 'phrase'"),
    ],
)
def test_bad_parameters_raise(constraint, message):
    with pytest.raises(ValueError, match=message):
        check("text", constraint)


def test_score_and_passes():
    constraints = [{"type": "max_words", "n": 5}, {"type": "lowercase"}, {"type": "keyword", "word": "moon"}]
    assert score("the moon is bright.", constraints) == 1.0
    assert passes("the moon is bright.", constraints)
    assert score("The moon is bright.", constraints) == pytest.approx(2 / 3)
    assert not passes("The moon is bright.", constraints)
    assert score("The sun is very bright today.", constraints) == 0.0
    assert score("anything", []) == 1.0 and passes("anything", [])


def test_passes_checks_every_constraint_even_after_a_failure():
    with pytest.raises(ValueError, match="unknown constraint type 'nope'"):
        passes("Too Long for one word", [{"type": "max_words", "n": 1}, {"type": "nope"}])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize(("split", "size"), [("train", 400), ("eval", 80)])
def test_bundled_instruct_responses_pass_their_constraints(split, size):
    rows = _rows(DATA / "instruct" / f"{split}.jsonl")
    assert len(rows) == size
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert 1 <= len(row["constraints"]) <= 2
        assert row["category"] == row["constraints"][0]["type"]
        assert passes(assistant["content"], row["constraints"]), row["id"]
        assert count_words(assistant["content"]) <= 75, row["id"]
    categories = [row["category"] for row in rows]
    counts = [categories.count(t) for t in CHECKS]
    assert max(counts) - min(counts) <= 1  # balanced across constraint types


def test_bundled_instruct_eval_prompts_not_in_train():
    prompts = {split: {r["messages"][0]["content"] for r in _rows(DATA / "instruct" / f"{split}.jsonl")}
               for split in ("train", "eval")}
    assert not prompts["train"] & prompts["eval"]
