"""Files a user names (`--out`, `--json`) through alignment/outputs.py: never an input, never inside a published
artifact, an existing file replaced only when it is of the kind the command writes (or with `--force`), and every
refusal one line naming the option, with nothing written. Each case is a finding of a fuzzing audit, run through
the real CLI on small files."""

from __future__ import annotations

import json
import shutil

import pytest

from alignment.cli import main
from alignment.judges import Judge, register_judge
from alignment.outputs import PNG_MAGIC, atomic_target

TRAIN, PREFS = "data/instruct/train.jsonl", "data/prefs/eval.jsonl"
LABEL = "configs/tiny/label.yaml"


class FirstJudge(Judge):
    """Rule-based (tests only): always a little for the response shown first."""

    def __init__(self, spec, inputs, precision):
        super().__init__(spec)
        self.name = "test-outputs-first:v1"

    def first_better(self, prompts, first, second):
        return [0.6] * len(first)


register_judge("test-outputs-first", FirstJudge)


def _copy(src: str, dest, n: int):
    """The first `n` lines of `src` as a new file `dest` (small inputs the test may see overwritten)."""
    with open(src) as f:
        dest.write_text("".join(line for _, line in zip(range(n), f)))
    return dest


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("align: error: "), err
    assert all(n in err for n in needles), err
    return err


# -- align data inspect --------------------------------------------------------------------------------------------
def test_inspect_refuses_its_input_as_json_or_out(tmp_path, capsys):
    data = _copy(TRAIN, tmp_path / "g3.jsonl", 12)
    before = data.read_bytes()
    assert main(["data", "inspect", str(data), "--out", str(tmp_path / "i2.png"), "--json", str(data)]) == 2
    _one_line_error(capsys, f"--json {data}", "input")
    assert main(["data", "inspect", str(data), "--out", str(data)]) == 2
    _one_line_error(capsys, f"--out {data}", "input")
    assert data.read_bytes() == before and not (tmp_path / "i2.png").exists()


def test_inspect_json_replaces_a_json_file_only(tmp_path, capsys):
    data, notes, old = _copy(TRAIN, tmp_path / "g.jsonl", 12), tmp_path / "notes.txt", tmp_path / "old.json"
    notes.write_text("mine")
    old.write_text("{}")
    png = tmp_path / "i.png"
    assert main(["data", "inspect", str(data), "--out", str(png), "--json", str(notes)]) == 2
    _one_line_error(capsys, f"--json {notes}", ".json")
    assert notes.read_text() == "mine" and not png.exists()
    assert main(["data", "inspect", str(data), "--out", str(png), "--json", str(old)]) == 0
    assert json.loads(old.read_text())["files"][str(data)]["rows"] == 12
    assert png.read_bytes()[:8] == PNG_MAGIC and not list(tmp_path.glob(".*.tmp"))


def test_inspect_default_png_replaces_its_own_plot_only(tmp_path, monkeypatch, capsys):
    data = _copy(TRAIN, tmp_path / "g.jsonl", 12)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["data", "inspect", str(data)]) == 0
    assert main(["data", "inspect", str(data)]) == 0  # a re-run refreshes its own PNG
    assert (work / "data_inspect.png").read_bytes()[:8] == PNG_MAGIC
    capsys.readouterr()
    (work / "data_inspect.png").write_text("a user's notes, named .png")
    assert main(["data", "inspect", str(data)]) == 2
    _one_line_error(capsys, "--out data_inspect.png", "not a PNG")
    assert (work / "data_inspect.png").read_text() == "a user's notes, named .png"


def test_inspect_out_must_be_png_and_inputs_files(tmp_path, capsys):
    data = _copy(TRAIN, tmp_path / "g.jsonl", 12)
    assert main(["data", "inspect", str(data), "--out", str(tmp_path / "plot.pdf")]) == 2
    _one_line_error(capsys, "--out", "plot.pdf", ".png")
    assert main(["data", "inspect", str(tmp_path), "--out", str(tmp_path / "i.png")]) == 2
    _one_line_error(capsys, f"{tmp_path}: is a folder", "name a JSONL")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl"]


# -- align data clean ----------------------------------------------------------------------------------------------
def test_clean_refuses_an_existing_out_or_report_unless_force(tmp_path, capsys):
    data = _copy(TRAIN, tmp_path / "c1.jsonl", 12)
    out, report = tmp_path / "existing.jsonl", tmp_path / "existing.jsonl.report.json"
    out.write_text("keep me\n")
    assert main(["data", "clean", str(data), "--out", str(out)]) == 2
    _one_line_error(capsys, f"--out {out}", "--force")
    out.unlink()
    report.write_text("keep me too")
    assert main(["data", "clean", str(data), "--out", str(out)]) == 2
    _one_line_error(capsys, f"--out {report}", "--force")
    assert not out.exists() and report.read_text() == "keep me too"
    user_tmp = tmp_path / "existing.jsonl.tmp"  # the old fixed temporary name: a user's file may have it
    user_tmp.write_text("mine")
    assert main(["data", "clean", str(data), "--out", str(out), "--force"]) == 0
    assert len(out.read_text().splitlines()) == json.loads(report.read_text())["kept"] == 12
    assert user_tmp.read_text() == "mine" and not list(tmp_path.glob(".*.tmp"))


def test_clean_out_folder_and_word_bounds_are_one_line(tmp_path, capsys):
    data = _copy(TRAIN, tmp_path / "c1.jsonl", 12)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["data", "clean", str(data), "--out", str(folder)]) == 2
    _one_line_error(capsys, f"--out {folder}: is a folder")
    out = tmp_path / "new.jsonl"
    assert main(["data", "clean", str(data), "--out", str(out), "--min-words", "100", "--max-words", "5"]) == 2
    _one_line_error(capsys, "--min-words 100", "--max-words 5")
    assert not out.exists() and not list(folder.iterdir())


def test_atomic_target_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "t.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_target(target, "--json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk gone")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


# -- align judge audit ---------------------------------------------------------------------------------------------
def _audit(tmp_path, data, *extra: str) -> int:
    return main(["judge", "audit", "-c", LABEL, "judge.kind=test-outputs-first", "judge.model=null",
                 "--artifacts", str(tmp_path / "art"), "--data", str(data), *extra])


def test_audit_refuses_its_data_as_json_and_a_limit_below_one(tmp_path, capsys):
    data = _copy(PREFS, tmp_path / "p6.jsonl", 6)
    before, png, js = data.read_bytes(), tmp_path / "j7.png", tmp_path / "a.json"
    assert _audit(tmp_path, data, "--json", str(data), "--out", str(png)) == 2
    _one_line_error(capsys, f"--json {data}", "input")
    for limit in ("0", "-5"):
        assert _audit(tmp_path, data, "--limit", limit, "--out", str(png)) == 2
        _one_line_error(capsys, f"--limit {limit}", ">= 1")
    assert data.read_bytes() == before and not png.exists()
    assert _audit(tmp_path, data, "--limit", "4", "--out", str(png), "--json", str(js)) == 0
    assert json.loads(js.read_text())["pairs"] == 4 and png.read_bytes()[:8] == PNG_MAGIC


# -- align export --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    from alignment.runner import run_stage

    root = tmp_path_factory.mktemp("store")
    run_stage("base", "configs/tiny/base.yaml", root=root, run="tiny")
    return root


def test_export_refuses_a_target_inside_a_published_stage(base_store, tmp_path, capsys):
    root = tmp_path / "art"
    shutil.copytree(base_store, root)
    inside = root / "tiny" / "base" / "exported"
    assert main(["export", "tiny", "base", "--artifacts", str(root), "--out", str(inside)]) == 2
    _one_line_error(capsys, f"--out {inside}", "published artifact")
    assert not inside.exists() and not [p for p in (root / "tiny" / "base").iterdir() if p.name.startswith(".")]
    assert main(["verify", "tiny", "--artifacts", str(root)]) == 0
    assert main(["export", "tiny", "base", "--artifacts", str(root), "--out", str(root / "tiny" / "base")]) == 2
    _one_line_error(capsys, "already exists")
