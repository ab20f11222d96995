"""`align data inspect` / `align data clean`: hand-worked similarity and imbalance figures, a planted near duplicate,
an exact duplicate and an eval-overlapping row dropped (and named), the PNG written, bad input in one line."""

from __future__ import annotations

import json
import math

import pytest

from alignment.cli import main
from alignment.data_quality import imbalance, jaccard, row_texts, shingles

TRAIN, EVAL = "data/instruct/train.jsonl", "data/instruct/eval.jsonl"


def test_shingles_jaccard_and_imbalance_by_hand():
    assert shingles("ABCDEF") == {"abcde", "bcdef"}
    assert shingles("a  b\nc", k=3) == {"a b", " b ", "b c"}  # whitespace collapsed, lower-cased
    assert jaccard({"x", "y", "z"}, {"y", "z", "w"}) == pytest.approx(2 / 4)
    got = imbalance({"a": 30, "b": 10})
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert got["ratio"] == 3.0 and got["entropy"] == pytest.approx(h, abs=1e-4)
    assert imbalance({"a": 5, "b": 5, "c": 5}) == {"ratio": 1.0, "entropy": 1.0}
    assert row_texts({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}) == ("p", "c")


def _rows(path: str, n: int) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture
def planted(tmp_path):
    """20 bundled rows + a near duplicate of row 3 (one word changed), an exact copy of row 5, an eval prompt."""
    rows = _rows(TRAIN, 20)
    near = json.loads(json.dumps(rows[2]))
    answer = near["messages"][-1]["content"]
    word = answer.split()[1]
    near["messages"][-1]["content"] = answer.replace(word, word + "s", 1)
    near["id"] = "planted-near"
    exact = dict(rows[4], id="planted-exact")
    leaked = dict(_rows(EVAL, 1)[0], id="planted-eval")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [near, exact, leaked]))
    return path, rows


def test_clean_drops_the_planted_duplicates_and_the_eval_row(planted, tmp_path, capsys):
    path, rows = planted
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(path), "--out", str(out), "--against", EVAL]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "clean.jsonl.report.json").read_text())
    assert kept == rows  # the 20 originals, verbatim and in order
    by_id = {d["row"].split("(")[-1].rstrip(")"): d for d in report["rows"]}
    assert set(by_id) == {"planted-near", "planted-exact", "planted-eval"}
    assert by_id["planted-near"]["kind"] == "near_duplicate" and by_id["planted-near"]["of"].endswith(
        f"row 3 ({rows[2]['id']})")
    assert by_id["planted-exact"]["kind"] == "exact_duplicate" and "row 5" in by_id["planted-exact"]["of"]
    assert by_id["planted-eval"]["kind"] == "eval_overlap"
    assert report["dropped_by_reason"] == {"near_duplicate": 1, "exact_duplicate": 1, "eval_overlap": 1}
    assert "kept 20 of 23 rows" in capsys.readouterr().out


def _clean(path, out, *flags) -> dict[str, str]:
    assert main(["data", "clean", str(path), "--out", str(out), *flags]) == 0
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    return {d["row"].split("(")[-1].rstrip(")"): d["kind"] for d in report["rows"]}


def test_clean_keeps_the_near_duplicate_below_the_threshold_and_drops_by_length(planted, tmp_path):
    path, _ = planted
    # The planted pair is ~0.86 similar: a 0.99 threshold keeps it; the exact copy still goes.
    assert _clean(path, tmp_path / "strict.jsonl", "--threshold", "0.99") == {"planted-exact": "exact_duplicate"}
    kinds = _clean(path, tmp_path / "short.jsonl", "--max-words", "60")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    long = {r["id"] for r in rows if sum(len(m["content"].split()) for m in r["messages"]) > 60}
    assert long and {k for k, v in kinds.items() if v == "length"} == long
    assert len((tmp_path / "short.jsonl").read_text().splitlines()) == len(rows) - len(kinds)


def test_inspect_prints_the_table_and_writes_the_png(planted, tmp_path, capsys):
    path, _ = planted
    png, js = tmp_path / "inspect.png", tmp_path / "inspect.json"
    assert main(["data", "inspect", str(path), EVAL, "--out", str(png), "--json", str(js)]) == 0
    assert png.stat().st_size > 10_000
    report = json.loads(js.read_text())
    mine = report["files"][str(path)]
    assert mine["rows"] == 23 and mine["exact_duplicates"] == 1 and mine["near_duplicates"] == 1
    assert sum(mine["categories"].values()) == 23 and report["unit"] == "words"
    ev = report["files"][EVAL]["overlap_with"][str(path)]
    assert ev["same_prompt"] >= 1  # the leaked eval row
    out = capsys.readouterr().out
    assert "data inspect" in out and "exact dup" in out


def test_bad_rows_and_paths_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "text": "no contract"}) + "\n")
    assert main(["data", "inspect", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}: row 1:" in err and not (tmp_path / "x.png").exists()
    assert main(["data", "clean", TRAIN, "--out", TRAIN]) == 2
    assert "would overwrite an input" in capsys.readouterr().err


def test_q_and_v_come_after_the_sub_command_and_q_keeps_only_the_table(planted, tmp_path, capsys):
    path, _ = planted
    assert main(["data", "inspect", "-q", str(path), "--out", str(tmp_path / "q.png")]) == 0
    out = capsys.readouterr().out
    assert "exact dup" in out  # the table is the command's answer, as with `align status -q`
    assert "\n  duplicate: " not in out and "plot:" not in out and (tmp_path / "q.png").is_file()
    assert main(["data", "clean", str(path), "--out", str(tmp_path / "q.jsonl"), "--quiet"]) == 0
    assert capsys.readouterr().out == "" and (tmp_path / "q.jsonl.report.json").is_file()
    assert main(["data", "inspect", str(path), "-v", "--out", str(tmp_path / "v.png")]) == 0
    out = capsys.readouterr().out
    assert "\n  duplicate: " in out and "plot:" in out
