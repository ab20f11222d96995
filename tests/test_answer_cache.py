"""alignment.answer_cache on its own: what a cached value must look like, and a cache that cannot be written.
The stage's use of it (reuse, equality with fresh figures, damaged entries) is in tests/test_eval_stage.py."""

from __future__ import annotations

from alignment.answer_cache import AnswerCache, digest, is_answers, is_numbers


def test_digest_is_order_free_over_keys_and_pins_content():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1, "b": [1, 2]}) != digest({"a": 1, "b": [2, 1]})
    assert len(digest([])) == 64


def test_answer_cache_that_cannot_be_written_warns_and_turns_off(tmp_path, caplog):
    (tmp_path / "blocker").write_text("a file where the folder would go")
    cache = AnswerCache(tmp_path / "blocker" / "eval")
    cache.put("k", [1.0])  # no exception: the stage's own outputs matter more
    assert cache.folder is None and "not caching in this run" in caplog.text
    assert cache.get("answers", "sft", "k", lambda v: True) is None
    ok = AnswerCache(tmp_path / "c")
    ok.put("k", [1.0, 2.0])
    assert ok.get("rewards", "sft", "k", lambda v: True) == [1.0, 2.0] and ok.reused == {"rewards": ["sft"]}
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["k.json"]  # the temporary file was renamed


def test_answer_cache_shapes_reject_what_the_stage_did_not_write():
    good = {"responses": {"a": {"text": ["x", "y"], "tokens": [1, 2], "eos": [True, False]}}, "ppl": None, "kl": None}
    assert is_answers(good, {"a": 2})
    assert not is_answers(good, {"a": 3}) and not is_answers(good, {"a": 2, "b": 2})
    bad_tokens = {**good, "responses": {"a": {**good["responses"]["a"], "tokens": [1, True]}}}
    bad_text = {**good, "responses": {"a": {**good["responses"]["a"], "text": ["x", 3]}}}
    assert not is_answers(bad_tokens, {"a": 2}) and not is_answers(bad_text, {"a": 2})
    assert not is_answers({**good, "ppl": [1.0]}, {"a": 2}) and not is_answers([good], {"a": 2})
    assert is_numbers([0.5, -1, 2.0], 3) and not is_numbers([0.5, True, 2.0], 3) and not is_numbers([0.5], 3)
