"""The prompt-data contract (alignment.prompts): layouts accepted, fields kept, bad rows named."""

from __future__ import annotations

import json

import pytest

from alignment.errors import DataError
from alignment.prompts import PromptData, load_prompts, train_eval_prompts


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_layouts_become_chat_messages_with_reference(tmp_path):
    src = _write(tmp_path / "p.jsonl", [
        {"prompt": "Name a colour.", "id": 7, "category": "x"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
         "constraints": [{"type": "lowercase"}]},
        {"prompt": "Q?", "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"},
        {"prompt": "Q2?", "reference": "explicit"},
    ])
    rows = load_prompts(src)
    assert [r["row"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0] == {"prompt": [{"role": "user", "content": "Name a colour."}], "id": 7, "category": "x", "row": 1}
    assert [m["role"] for m in rows[1]["prompt"]] == ["system", "user"] and "reference" not in rows[1]
    assert rows[2]["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert rows[2]["reference"] == "hi" and rows[2]["constraints"] == [{"type": "lowercase"}]
    assert rows[3]["reference"] == "good"
    assert rows[4]["reference"] == "explicit"
    assert len(load_prompts(src, limit=2)) == 2


def test_bundled_files_load():
    train, held_out = train_eval_prompts(PromptData(max_prompts=50))
    assert len(train) == 50 and len(held_out) == 50
    assert all(r["constraints"] and r["prompt"][-1]["role"] == "user" and r["reference"] for r in train)
    assert len(load_prompts("data/prefs/train.jsonl")) == 3000


@pytest.mark.parametrize("row, problem", [
    ({"text": "x"}, "row 2: missing field: expected 'prompt'"),
    ({"prompt": ""}, "row 2: prompt[0].content: empty"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "row 2: prompt: ends with an assistant turn"),
    ({"messages": [{"role": "assistant", "content": "b"}]}, "row 2: messages: only an assistant turn"),
    ({"prompt": "q", "constraints": [{"type": "nope"}]}, "row 2: constraints: expected a list"),
    ("{not json", "row 2: not valid JSON"),
])
def test_bad_row_names_file_and_row(tmp_path, row, problem):
    src = _write(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(DataError) as e:
        load_prompts(src)
    assert f"{src}: {problem}" in str(e.value)


def test_every_bad_row_is_listed_and_empty_file_refused(tmp_path):
    src = _write(tmp_path / "bad.jsonl", [{"x": 1}, {"prompt": "ok"}, {"y": 2}])
    with pytest.raises(DataError) as e:
        load_prompts(src)
    assert "2 bad rows" in str(e.value) and "row 1:" in str(e.value) and "row 3:" in str(e.value)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    assert PromptData(max_prompts=0).problems() == [("prompts.max_prompts", "expected at least 1 (or leave unset)")]
