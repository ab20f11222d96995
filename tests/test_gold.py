"""The gold judge on hand-worked cases, and the bundled instruct data against it."""

import json
import re
import sys
from pathlib import Path

import pytest

from alignment import gold
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


CASES = [
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
        # sentences: '.', '!' or '?' then whitespace / line break / end; '3.5' does not end one
        ("One. Two! Three?", {"type": "max_sentences", "n": 3}, True),
        ("One. Two! Three? Four.", {"type": "max_sentences", "n": 3}, False),
        ("Pi is about 3.14 today. Next.", {"type": "max_sentences", "n": 2}, True),
        ("- a line\n- another line", {"type": "min_sentences", "n": 2}, True),  # each line is a sentence
        ("Only one sentence here.", {"type": "min_sentences", "n": 2}, False),
        ("... !", {"type": "min_sentences", "n": 1}, False),  # punctuation without a word is no sentence
        ("First part.\n\nSecond part.", {"type": "paragraphs", "n": 2}, True),
        ("First part.\n  \nSecond.\n\n\nThird.", {"type": "paragraphs", "n": 3}, True),
        ("First part.\nSame paragraph.", {"type": "paragraphs", "n": 2}, False),
        ("Cats and dogs.", {"type": "forbidden_words", "words": ["dog", "bird"]}, True),  # whole words only
        ("Cats and Dogs.", {"type": "forbidden_words", "words": ["dogs", "bird"]}, False),
        ("Tea, tea and more TEA.", {"type": "keyword_frequency", "word": "tea", "n": 3}, True),
        ("Tea and teapots.", {"type": "keyword_frequency", "word": "tea", "n": 2}, False),
        ("Seven eels.", {"type": "letter_frequency", "letter": "e", "n": 4, "relation": "at least"}, True),  # 4 e's
        ("Seven eels.", {"type": "letter_frequency", "letter": "E", "n": 5}, False),  # default: at least
        ("Seven eels.", {"type": "letter_frequency", "letter": "s", "n": 3, "relation": "less than"}, True),  # 2 s's
        ("Sassy.", {"type": "letter_frequency", "letter": "s", "n": 3, "relation": "less than"}, False),  # 3 s's
        ("LOUD AND CLEAR, 42!", {"type": "uppercase"}, True),
        ("LOUD AND CLEAr", {"type": "uppercase"}, False),
        ("42 !", {"type": "uppercase"}, False),  # no letters at all is not 'in capitals'
        ("No commas here.", {"type": "no_commas"}, True),
        ("One, two.", {"type": "no_commas"}, False),
        ("  Sure. The moon is grey.", {"type": "start_with", "phrase": "Sure."}, True),
        ("The moon is grey. Sure.", {"type": "start_with", "phrase": "Sure."}, False),
        ("sure. the moon.", {"type": "start_with", "phrase": "Sure."}, False),  # exact case
        ('"The moon is grey."\n', {"type": "quotation"}, True),
        ('"The moon is grey.', {"type": "quotation"}, False),
        ('""', {"type": "quotation"}, False),
        ("<<The Moon>>\nIt is grey.", {"type": "title"}, True),
        ("<The Moon>\nIt is grey.", {"type": "title"}, False),
        ("<<>> and << >>", {"type": "title"}, False),
        ("It is *grey* and *dusty*.", {"type": "highlights", "n": 2}, True),
        ("It is *grey* and dusty.", {"type": "highlights", "n": 2}, False),
        ("5 * 3 is 15.", {"type": "highlights", "n": 1}, False),
        ("A **** line.", {"type": "highlights", "n": 1}, False),
        ('{"topic": "moon", "facts": ["It is grey."]}', {"type": "json_format"}, True),
        ('```json\n{"a": 1}\n```', {"type": "json_format"}, True),
        ('{"topic": "moon",}', {"type": "json_format"}, False),
        ("The moon is grey.", {"type": "json_format"}, False),
        ("The moon.\nP.S. Look up tonight.", {"type": "postscript", "marker": "P.S."}, True),
        ("the moon.\np.s. look up tonight.", {"type": "postscript", "marker": "P.S."}, True),  # any case
        ("The moon. P.S. look up.", {"type": "postscript", "marker": "P.S."}, False),  # must start a line
        ("The moon.\nP.P.S. Look up.", {"type": "postscript", "marker": "P.S."}, False),
        ("Write to [name] at [address].", {"type": "placeholders", "n": 2}, True),
        ("Write to [name] at [ ].", {"type": "placeholders", "n": 2}, False),  # an empty bracket is no placeholder
]


@pytest.mark.parametrize(("response", "constraint", "ok"), CASES)
def test_check(response, constraint, ok):
    assert check(response, constraint) is ok


def test_check_covers_every_known_type():
    covered = {c["type"] for _, c, _ in CASES}
    assert covered == set(CHECKS) and len(CHECKS) >= 14


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
        ({"type": "max_sentences", "n": 0}, "'max_sentences' needs 'n' as an integer >= 1"),
        ({"type": "forbidden_words", "words": "dog"}, "'forbidden_words' needs 'words'"),
        ({"type": "forbidden_words", "words": []}, "'forbidden_words' needs 'words'"),
        ({"type": "letter_frequency", "letter": "ab", "n": 2}, "needs 'letter' as one letter"),
        ({"type": "letter_frequency", "letter": "a", "n": 2, "relation": "exactly"}, "needs 'relation'"),
        ({"type": "postscript"}, "'postscript' needs 'marker'"),
        ({"type": "highlights", "n": 0}, "'highlights' needs 'n'"),
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


FILES = {  # file -> (split, at least this many rows)
    "instruct/train.jsonl": ("train", 2000), "instruct/eval.jsonl": ("eval", 150),
    "instruct/eval_heldout_phrasings.jsonl": ("eval_heldout_phrasings", 150),
    "instruct/eval_heldout_kinds.jsonl": ("eval_heldout_kinds", 150),
    "prefs/train.jsonl": ("train", 1000), "prefs/eval.jsonl": ("eval", 150),
    "prefs/eval_heldout_phrasings.jsonl": ("eval_heldout_phrasings", 150),
    "prefs/train_one_edit.jsonl": ("train", 1000),
    "sealed/phrasings.jsonl": ("sealed_phrasings", 200), "sealed/phrasings2.jsonl": ("sealed2_phrasings", 200),
}


def _prompt(row: dict) -> str:
    return (row.get("messages") or row["prompt"])[0]["content"]


@pytest.mark.parametrize("name", FILES)
def test_bundled_rows_meet_their_constraints(name):
    """SFT responses and chosen responses pass every constraint; a rejected one fails exactly its category."""
    split, size = FILES[name]
    rows = _rows(DATA / name)
    assert len(rows) >= size
    for row in rows:
        assert row["split"] == split and 1 <= len(row["constraints"]) <= 3, row["id"]
        assert row["category"] == row["constraints"][0]["type"] and row["template"].startswith("task/"), row["id"]
        if "messages" in row:
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert passes(assistant["content"], row["constraints"]), row["id"]
            assert count_words(assistant["content"]) <= 75, row["id"]
        else:
            assert passes(row["chosen"][0]["content"], row["constraints"]), row["id"]
            rejected = row["rejected"][0]["content"]
            assert [c["type"] for c in row["constraints"] if not check(rejected, c)] == [row["category"]], row["id"]
    categories = [row["category"] for row in rows]
    counts = [categories.count(t) for t in set(categories)]
    assert max(counts) - min(counts) <= 1  # balanced across constraint kinds
    first = categories[: len(set(categories))]
    assert len(set(first)) == len(first)  # any prefix (a config's cap) cycles through the kinds


def test_bundled_splits_hold_out_kinds_phrasings_and_prompts():
    rows = {name: _rows(DATA / name) for name in FILES}
    kinds = {name: {c["type"] for r in rs for c in r["constraints"]} for name, rs in rows.items()}
    held_kinds = {r["category"] for r in rows["instruct/eval_heldout_kinds.jsonl"]}
    assert len(held_kinds) >= 4 and len(kinds["instruct/train.jsonl"]) >= 14
    for name, used in kinds.items():
        if name != "instruct/eval_heldout_kinds.jsonl":
            assert not used & held_kinds, name  # no training, preference or other eval row uses a held-out kind
    # Template ids: kind/tN (training phrasing) or kind/hN (held-out); held-out ones never train.
    train_ids = {t for name in ("instruct/train.jsonl", "prefs/train.jsonl", "prefs/train_one_edit.jsonl")
                 for r in rows[name] for t in r["template"].split("+")}
    for name in ("instruct/eval_heldout_phrasings.jsonl", "prefs/eval_heldout_phrasings.jsonl"):
        for r in rows[name]:
            ids = r["template"].split("+")
            assert not set(ids) & train_ids and all("/h" in t for t in ids), r["id"]
    assert not any("/h" in t for t in train_ids)
    # The sealed splits: each its own wordings (kind/sN, task/sN, frame/sN; the second /vN), which no other file uses.
    for name, tag in (("sealed/phrasings.jsonl", "/s"), ("sealed/phrasings2.jsonl", "/v")):
        sealed = {t for r in rows[name] for t in r["template"].split("+")}
        assert sealed and all(tag in t for t in sealed)
        assert not any(tag in t for other, rs in rows.items() if other != name
                       for r in rs for t in r["template"].split("+"))
    prompts = [_prompt(r) for rs in rows.values() for r in rs]
    assert len(prompts) == len(set(prompts))  # no prompt shared within or across files


def test_build_is_deterministic_and_reports_length_balance(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(DATA / "build.py"), "--out", str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    for name in [*FILES, "general/heldout.jsonl"]:  # the committed files are exactly its output
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    corr = [float(line.split("length/preference corr ")[1].split(",")[0])
            for line in out.splitlines() if "length/preference corr" in line]
    assert len(corr) == 4 and all(abs(c) < 0.1 for c in corr)


def _new_and_dropped_words(row: dict) -> tuple[int, int]:
    """Words (a multiset) the rejected response adds to the chosen one, and words it drops."""
    from collections import Counter
    chosen, rejected = (Counter(re.findall(r"[a-z']+", row[k][0]["content"].lower())) for k in ("chosen", "rejected"))
    return sum((rejected - chosen).values()), sum((chosen - rejected).values())


def test_one_edit_pairs_differ_only_in_the_facts_the_violated_check_reads():
    """prefs/train_one_edit.jsonl: in the four one-edit kinds the rejected answer is the chosen one with one or two
    facts (<= 15 words each) swapped, or for min_words its last facts dropped; in prefs/train.jsonl the same kinds'
    rejected answers are composed afresh, so many differ by more (the contrast this file exists to remove)."""
    sys.path.insert(0, str(DATA))
    import build

    edits = {"one_edit": [], "train": []}
    for name, key in (("prefs/train_one_edit.jsonl", "one_edit"), ("prefs/train.jsonl", "train")):
        for row in _rows(DATA / name):
            if row["category"] in build.ONE_EDIT_KINDS:
                edits[key].append((row["category"], *_new_and_dropped_words(row)))
    assert len(edits["one_edit"]) >= 4 * 187  # 3,000 rows over 16 kinds: 187-188 each
    for kind, new, dropped in edits["one_edit"]:
        assert (new, dropped > 0) == (0, True) if kind == "min_words" else 0 < new <= 30, (kind, new, dropped)
    assert sum(new > 30 for kind, new, _ in edits["train"] if kind != "min_words") > 50


def test_length_does_not_predict_preference_within_a_free_kind():
    """Where the violation leaves the direction free, no kind's chosen answer is mostly the longer or the shorter
    one in the training pairs (mean sign of len(chosen) - len(rejected) per kind; a file-wide balance once left
    bullets at -0.47 and no_commas at -0.60)."""
    from collections import defaultdict

    sign = defaultdict(list)
    for line in (DATA / "prefs/train.jsonl").read_text().splitlines():
        r = json.loads(line)
        c, j = (count_words(r[k][0]["content"]) for k in ("chosen", "rejected"))
        sign[r["category"]].append((c > j) - (c < j))
    forced = {"max_words": -1, "min_words": 1, "min_sentences": 1}
    for kind, signs in sign.items():
        mean = sum(signs) / len(signs)
        if kind in forced:
            assert mean == forced[kind], kind
        else:
            assert abs(mean) < 0.35, (kind, mean)


def test_graded_score_gives_count_constraints_partial_credit():
    # 6 words, 2 sentences, no bullets, three 'o's ("one", "two", "four"), no comma.
    r = "one two three. four five six."
    cons = [{"type": "min_words", "n": 10},      # 6 / 10 = 0.6
            {"type": "max_words", "n": 3},       # 3 / 6 = 0.5
            {"type": "no_commas"},               # passes: 1
            {"type": "bullets", "n": 2},         # 0 bullets, exactly 2: min / max = 0
            {"type": "letter_frequency", "letter": "o", "n": 3, "relation": "less than"}]  # 3 'o's: 3 / (3 + 1)
    assert [gold.credit(r, c) for c in cons] == [0.6, 0.5, 1.0, 0.0, 0.75]
    assert gold.graded_score(r, cons) == pytest.approx(2.85 / 5)
    assert gold.score(r, cons) == pytest.approx(1 / 5)  # the pass/fail score of the same response
    # exactly n: 3 bullets for 2 -> 2 / 3; a passing count always scores 1; binary kinds stay 0 / 1
    assert gold.credit("- a\n- b\n- c", {"type": "bullets", "n": 2}) == pytest.approx(2 / 3)
    assert gold.credit("- a\n- b", {"type": "bullets", "n": 2}) == 1.0
    assert gold.credit("Hello", {"type": "lowercase"}) == 0.0
    assert gold.graded_score("anything", []) == 1.0


def test_graded_score_rejects_bad_parameters_like_check():
    with pytest.raises(ValueError, match="letter_frequency"):
        gold.credit("abc", {"type": "letter_frequency", "letter": "ab", "n": 2})
    with pytest.raises(ValueError, match="unknown constraint type"):
        gold.graded_score("abc", [{"type": "min_wordz", "n": 2}])


def test_sealed_wordings_are_new_and_no_config_reads_the_sealed_split():
    """The sealed split stays sealed: none of its wordings is a training or held-out one, and no stage config
    (hence no eval stage's prompt sets, no training data) names it; only bench/gold_splits.py --sealed reads it."""
    sys.path.insert(0, str(DATA))
    import build

    seen = set(build.TASKS[0] + build.TASKS[1] + build.FRAMES[0] + build.FRAMES[1])
    seen |= {p for train, held in build.PHRASINGS.values() for p in train + held}
    new = set(build.SEALED_TASKS + build.SEALED_FRAMES) | {p for v in build.SEALED_PHRASINGS.values() for p in v}
    new2 = set(build.SEALED2_TASKS + build.SEALED2_FRAMES) | {p for v in build.SEALED2_PHRASINGS.values() for p in v}
    assert not new & seen and not new2 & (seen | new) and len(new2) == 5 + 2 + 2 * 16
    import yaml

    def strings(node):
        if isinstance(node, dict):
            return [x for k, v in node.items() for x in strings(k) + strings(v)]
        if isinstance(node, list):
            return [x for v in node for x in strings(v)]
        return [node] if isinstance(node, str) else []

    configs = Path(__file__).resolve().parents[1] / "configs"
    values = {f: strings(yaml.safe_load(f.read_text())) for f in configs.rglob("*.yaml")}
    assert len(values) > 20 and any("data/prefs/eval_heldout_phrasings.jsonl" in v for v in values.values())
    assert not [f for f, v in values.items() if any("sealed" in x for x in v)]  # comments may mention it
