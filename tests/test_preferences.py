"""The preference-data contract: validation, loading, normalisation, TRL datasets, bundled files."""

import json
import logging
import math
from pathlib import Path

import pytest

from alignment.errors import DataError
from alignment.gold import passes
from alignment.preferences import (
    MAX_LISTED_ROWS,
    load_pairs,
    normalise_pair,
    response_text,
    to_trl_dataset,
    validate_pair,
)

DATA = Path(__file__).resolve().parents[1] / "data"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD_STRING = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I like turtles."}
GOOD_MESSAGES = {
    "prompt": [{"role": "system", "content": "Be brief."}, user("Name a colour.")],
    "chosen": [assistant("Blue.")],
    "rejected": [assistant("I like turtles.")],
}
GOOD_CONVERSATION = {  # Anthropic-HH layout: chosen/rejected repeat the prompt
    "prompt": [user("Hi.")],
    "chosen": [user("Hi."), assistant("Hello!"), user("Name a colour."), assistant("Blue.")],
    "rejected": [user("Hi."), assistant("Hello!"), user("Name a colour."), assistant("I like turtles.")],
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("row", [GOOD_STRING, GOOD_MESSAGES, GOOD_CONVERSATION])
def test_valid_rows_have_no_problems(row):
    assert validate_pair(row) == []


def test_valid_optional_fields():
    row = dict(GOOD_STRING, id="a-1", label_source="ai", p_chosen=0.75, margin=-1, category="x",
               constraints=[{"type": "keyword", "word": "blue"}])
    assert validate_pair(row) == []
    assert validate_pair(dict(GOOD_STRING, id=7, p_chosen=1, margin=None, label_source=None)) == []


BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "missing 'prompt'"),
    ({"prompt": "p", "rejected": "b"}, "missing 'chosen'"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "missing 'rejected'"),
    (dict(GOOD_STRING, chosen=5), "'chosen' must be a string or a list of chat messages, got int"),
    (dict(GOOD_STRING, prompt="  "), "'prompt' is empty"),
    (dict(GOOD_STRING, rejected=""), "'rejected' is empty"),
    (dict(GOOD_STRING, chosen=[]), "chosen: expected a non-empty list of messages"),
    (dict(GOOD_STRING, prompt=["hi"]), "prompt[0]: expected a message object, got str"),
    (dict(GOOD_STRING, prompt=[{"role": "bot", "content": "hi"}]), "prompt[0].role: expected one of system, user, assistant, got 'bot'"),
    (dict(GOOD_STRING, chosen=[{"role": "assistant", "content": ""}]), "chosen[0].content: empty or not a string"),
    (dict(GOOD_STRING, rejected=[{"role": "assistant"}]), "rejected[0].content: empty or not a string"),
    (dict(GOOD_STRING, chosen=[user("Blue.")]), "'chosen' must end with an assistant turn, got role 'user'"),
    (dict(GOOD_CONVERSATION, rejected=[user("Hey."), assistant("Hello!"), user("Name a colour."), assistant("Red.")]),
     "prompt mismatch between chosen and rejected"),
    (dict(GOOD_CONVERSATION, rejected=[assistant("Red.")]), "prompt mismatch between chosen and rejected"),
    (dict(GOOD_CONVERSATION, prompt="Something else."), "'prompt' does not match the start of the chosen/rejected conversation"),
    (dict(GOOD_STRING, rejected=" Blue. "), "chosen == rejected"),
    (dict(GOOD_MESSAGES, rejected=[assistant("Blue.")]), "chosen == rejected"),
    (dict(GOOD_STRING, label_source="crowd"), "'label_source' must be one of human/ai, got 'crowd'"),
    (dict(GOOD_STRING, p_chosen=1.5), "'p_chosen' must be a number in [0, 1], got 1.5"),
    (dict(GOOD_STRING, p_chosen=True), "'p_chosen' must be a number in [0, 1], got True"),
    (dict(GOOD_STRING, p_chosen=math.nan), "'p_chosen' must be a number in [0, 1]"),
    (dict(GOOD_STRING, margin="big"), "'margin' must be a finite number, got 'big'"),
    (dict(GOOD_STRING, id=[1]), "'id' must be a string or an integer"),
    (dict(GOOD_STRING, category=3), "'category' must be a string, got 3"),
    (dict(GOOD_STRING, constraints=[{"type": "rhyme"}]), "'constraints' must be a list of objects whose 'type' is one of"),
]


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS)
def test_each_bad_row_kind_is_reported(row, problem):
    assert any(problem in p for p in validate_pair(row)), validate_pair(row)


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS)
def test_load_pairs_names_file_row_and_reason(tmp_path, row, problem):
    source = write_jsonl(tmp_path / "tmp.jsonl", [GOOD_STRING, row, GOOD_MESSAGES])
    with pytest.raises(DataError) as info:
        load_pairs(source)
    (line,) = str(info.value).splitlines()  # one bad row where none is allowed: just that row's line
    assert line.startswith(f"{source}: row 2: ") and problem in line


def test_all_problems_of_a_row_are_on_its_line(tmp_path):
    source = write_jsonl(tmp_path / "tmp.jsonl", [{"prompt": "", "chosen": "a", "rejected": "b", "margin": "x"}])
    with pytest.raises(DataError, match=r"tmp.jsonl: row 1: 'prompt' is empty; 'margin' must be a finite number"):
        load_pairs(source, max_bad_fraction=1.0)


def test_bad_rows_within_tolerance_are_dropped_with_a_warning(tmp_path, caplog):
    source = write_jsonl(tmp_path / "tmp.jsonl", [GOOD_STRING, dict(GOOD_STRING, chosen=""), GOOD_MESSAGES, GOOD_STRING])
    with caplog.at_level(logging.WARNING, logger="alignment.preferences"):
        pairs = load_pairs(source, max_bad_fraction=0.25)
    assert [p["row"] for p in pairs] == [1, 3, 4]
    assert "dropped 1 of 4 bad rows" in caplog.text and "tmp.jsonl: row 2: 'chosen' is empty" in caplog.text
    with pytest.raises(DataError, match=r"1 of 4 rows are bad \(max_bad_fraction=0.2\)"):
        load_pairs(source, max_bad_fraction=0.2)


def test_no_rows_or_no_good_rows_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_pairs(str(empty))
    source = write_jsonl(tmp_path / "tmp.jsonl", [dict(GOOD_STRING, chosen="")])
    with pytest.raises(DataError, match="1 of 1 rows are bad"):
        load_pairs(source, max_bad_fraction=1.0)


def test_long_error_lists_are_capped_but_counted(tmp_path):
    rows = [dict(GOOD_STRING, chosen="")] * (MAX_LISTED_ROWS + 5)
    source = write_jsonl(tmp_path / "tmp.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_pairs(source)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{source}: {MAX_LISTED_ROWS + 5} of {MAX_LISTED_ROWS + 5} rows are bad")
    assert len(lines) == MAX_LISTED_ROWS + 2 and lines[-1] == f"{source}: ... and 5 more bad rows"


def test_max_bad_fraction_out_of_range():
    with pytest.raises(ValueError, match="max_bad_fraction"):
        load_pairs("unused.jsonl", max_bad_fraction=1.5)


def test_string_form_is_normalised_to_messages():
    pair = normalise_pair(dict(GOOD_STRING, p_chosen=0.9, extra="dropped"), 3)
    assert pair == {
        "prompt": [user("Name a colour.")],
        "chosen": [assistant("Blue.")],
        "rejected": [assistant("I like turtles.")],
        "p_chosen": 0.9,
        "row": 3,
    }


def test_messages_form_keeps_prompt_and_strips_extra_keys():
    row = dict(GOOD_MESSAGES, chosen=[dict(assistant("Blue."), name="bot")], label_source="human", id="x")
    pair = normalise_pair(row)
    assert pair["prompt"] == GOOD_MESSAGES["prompt"]
    assert pair["chosen"] == [assistant("Blue.")]
    assert (pair["label_source"], pair["id"]) == ("human", "x") and "row" not in pair


def test_full_conversations_are_split_into_prompt_and_final_response(tmp_path):
    source = write_jsonl(tmp_path / "tmp.jsonl", [GOOD_CONVERSATION])
    (pair,) = load_pairs(source)
    assert pair["prompt"] == [user("Hi."), assistant("Hello!"), user("Name a colour.")]
    assert pair["chosen"] == [assistant("Blue.")]
    assert pair["rejected"] == [assistant("I like turtles.")]
    assert pair["row"] == 1


def test_response_text():
    assert response_text("plain") == "plain"
    assert response_text([user("q"), assistant("a")]) == "a"
    assert response_text([]) == ""


def test_to_trl_dataset_conversational_format():
    pairs = [normalise_pair(GOOD_STRING), normalise_pair(GOOD_CONVERSATION)]
    ds = to_trl_dataset(pairs)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[1]["prompt"] == [user("Hi."), assistant("Hello!"), user("Name a colour.")]
    assert ds[0]["chosen"] == [assistant("Blue.")]


def test_to_trl_dataset_soft_labels_only_when_every_pair_has_them():
    soft = [normalise_pair(dict(GOOD_STRING, p_chosen=0.8, margin=1)), normalise_pair(dict(GOOD_MESSAGES, p_chosen=1))]
    ds = to_trl_dataset(soft)
    assert ds.column_names == ["prompt", "chosen", "rejected", "p_chosen"]
    assert ds["p_chosen"] == [0.8, 1.0]
    with pytest.raises(ValueError, match="no preference pairs"):
        to_trl_dataset([])


def _prompts(pairs: list[dict]) -> set[str]:
    return {p["prompt"][-1]["content"] for p in pairs}


@pytest.fixture(scope="module")
def bundled() -> dict[str, list[dict]]:
    return {split: load_pairs(str(DATA / "prefs" / f"{split}.jsonl")) for split in ("train", "eval")}


def test_bundled_prefs_sizes_and_labels(bundled):
    # Every row of the bundled files is a valid pair (none dropped); data/build.py sets how many there are.
    for split, pairs in bundled.items():
        lines = [x for x in (DATA / "prefs" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        assert len(pairs) == len(lines) > 0, split
    assert all(p["label_source"] == "human" and p["constraints"] for ps in bundled.values() for p in ps)


def test_bundled_chosen_passes_and_rejected_fails(bundled):
    for pair in bundled["train"] + bundled["eval"]:
        assert passes(response_text(pair["chosen"]), pair["constraints"]), pair["id"]
        assert not passes(response_text(pair["rejected"]), pair["constraints"]), pair["id"]


def test_bundled_eval_prompts_are_held_out(bundled):
    instruct = [json.loads(line) for split in ("train", "eval")
                for line in (DATA / "instruct" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert not _prompts(bundled["eval"]) & _prompts(bundled["train"])
    assert not _prompts(bundled["eval"]) & {r["messages"][0]["content"] for r in instruct}


def test_bundled_length_does_not_predict_preference(bundled):
    for pairs in bundled.values():
        longer = sum(len(response_text(p["chosen"])) > len(response_text(p["rejected"])) for p in pairs)
        assert 0.25 <= longer / len(pairs) <= 0.6
