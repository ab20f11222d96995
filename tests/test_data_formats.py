"""Inputs through `datasets`: CSV, JSON arrays, Parquet, builder + data_files, subset names, column mappings, and
Alpaca / ShareGPT rows converted to the chat contract, with one-line row-level errors naming file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from alignment.config import load_config
from alignment.data import DataSource, read_rows
from alignment.errors import ConfigError, DataError
from alignment.preferences import load_pairs
from alignment.prompts import load_prompts
from alignment.sft_data import load_examples


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_csv_sft_rows_load_and_cells_holding_json_become_values(tmp_path):
    src = write_csv(tmp_path / "sft.csv", ["prompt", "completion", "category"],
                    [["Say hi.", "Hi!", "greeting"], ["Count to two.", "One, two.", "count"]])
    rows = load_examples(str(src), None, 0.0)
    assert rows[0]["prompt"] == [{"role": "user", "content": "Say hi."}]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "One, two."}]
    assert [r["category"] for r in rows] == ["greeting", "count"]

    cons = [{"type": "max_words", "n": 5}]
    prompts = write_csv(tmp_path / "prompts.csv", ["prompt", "constraints"], [["Be brief.", json.dumps(cons)]])
    (rec,) = load_prompts(str(prompts))
    assert rec["constraints"] == cons and rec["row"] == 2  # CSV rows are line numbers: the header is line 1


def test_csv_bad_row_names_file_and_line(tmp_path):
    src = write_csv(tmp_path / "pairs.csv", ["prompt", "chosen", "rejected"],
                    [["Q1", "good", "bad"], ["Q2", "same", "same"], ["Q3", "", "bad"]])
    with pytest.raises(DataError) as e:
        load_pairs(str(src))
    lines = str(e.value).splitlines()
    assert lines[1] == f"{src}: row 3: chosen == rejected"
    assert lines[2].startswith(f"{src}: row 4: missing 'chosen'")  # an empty CSV cell is a missing value


def test_parquet_prompts_with_a_column_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"question": ["What is rain?", "Why is the sky blue?"], "answer": ["Water.", "Light."]}),
                   path)
    rows = load_prompts(DataSource(path=str(path), columns={"question": "prompt", "answer": "reference"}))
    assert rows[1]["prompt"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert rows[1]["reference"] == "Light."
    with pytest.raises(DataError, match=r"q.parquet: row 1: columns: no column 'query' to rename \(has: answer, "):
        load_prompts(DataSource(path=str(path), columns={"query": "prompt"}))


def test_builder_with_data_files_picks_the_split(tmp_path):
    a = write_csv(tmp_path / "a.csv", ["prompt", "completion"], [["train q", "train a"]])
    b = write_csv(tmp_path / "b.csv", ["prompt", "completion"], [["test q", "test a"], ["test q2", "test a2"]])
    spec = DataSource(path="csv", data_files={"train": str(a), "test": str(b)})
    assert [r["prompt"][0]["content"] for r in load_examples(spec, "test", 0.0)] == ["test q", "test q2"]
    assert [r["prompt"][0]["content"] for r in load_examples(spec, "train", 0.0)] == ["train q"]
    # The source's own split wins over the section's.
    pinned = spec.model_copy(update={"split": "test[:1]"})
    assert [r["prompt"][0]["content"] for r in load_examples(pinned, "train", 0.0)] == ["test q"]


def test_subset_name_selects_a_config_of_a_hub_layout_folder(tmp_path):
    repo = tmp_path / "repo"
    (repo / "small").mkdir(parents=True)
    (repo / "big").mkdir()
    write_jsonl(repo / "small" / "train.jsonl", [{"prompt": "small one"}])
    write_jsonl(repo / "big" / "train.jsonl", [{"prompt": "big one"}, {"prompt": "big two"}])
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n"
                                    "    path: small/*.jsonl\n- config_name: big\n  data_files:\n  - split: train\n"
                                    "    path: big/*.jsonl\n---\n")
    assert [r["prompt"][0]["content"] for r in load_prompts(DataSource(path=str(repo), name="big"))] == \
        ["big one", "big two"]
    assert len(load_prompts(DataSource(path=str(repo), name="small"))) == 1
    with pytest.raises(DataError) as e:
        load_prompts(DataSource(path=str(repo), name="medium"))
    assert len(str(e.value).splitlines()) == 1 and "name=medium" in str(e.value) and "medium" in str(e.value)


def test_alpaca_json_array_becomes_chat(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "Be terse."},
            {"instruction": "And dog?", "input": "", "output": "chien", "history": [["Translate cat.", "chat"]]}]
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(rows, indent=1))
    first, second = load_examples(str(src), None, 0.0)
    assert first["prompt"] == [{"role": "system", "content": "Be terse."},
                               {"role": "user", "content": "Translate to French.\n\ncat"}]
    assert first["completion"] == [{"role": "assistant", "content": "chat"}]
    assert second["prompt"] == [{"role": "user", "content": "Translate cat."},
                                {"role": "assistant", "content": "chat"}, {"role": "user", "content": "And dog?"}]
    # As prompts, the output is the reference answer.
    assert load_prompts(str(src))[0]["reference"] == "chat"


def test_alpaca_and_sharegpt_preference_pairs(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Greet.", "input": "", "chosen": "Hello!",
                                                 "rejected": "Go away."}])
    (pair,) = load_pairs(str(alpaca))
    assert pair["prompt"] == [{"role": "user", "content": "Greet."}]
    assert pair["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    share = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "Greet."}],
                                                "chosen": {"from": "gpt", "value": "Hello!"},
                                                "rejected": {"from": "gpt", "value": "Go away."}}])
    assert load_pairs(str(share))[0]["rejected"] == [{"role": "assistant", "content": "Go away."}]


def test_sharegpt_rows_become_chat_and_bad_rows_are_one_line_each(tmp_path):
    good = {"system": "You are kind.", "conversations": [{"from": "human", "value": "Hi"},
                                                         {"from": "gpt", "value": "Hello!"}]}
    src = write_jsonl(tmp_path / "sg.jsonl", [good])
    (ex,) = load_examples(str(src), None, 0.0)
    assert ex["prompt"] == [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"}]
    assert ex["completion"] == [{"role": "assistant", "content": "Hello!"}]

    bad = write_jsonl(tmp_path / "bad.jsonl", [
        good, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "tool", "value": "{}"}]},
        {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}]},
        {"instruction": "Do it.", "output": 3}])
    with pytest.raises(DataError) as e:
        load_examples(str(bad), None, 0.0)
    assert str(e.value).startswith(f"{bad}: row 2: sharegpt: conversations[1].from: 'tool' is not a chat role")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(DataError) as e:
        load_prompts(str(bad))
    lines = str(e.value).splitlines()
    assert lines[0] == f"{bad}: 3 bad rows:"
    assert lines[2] == f"{bad}: row 3: sharegpt: conversations[0].value: empty or not a string"
    assert lines[3] == f"{bad}: row 4: alpaca: 'output' must be a string, got int"


def test_explicit_format_overrides_detection(tmp_path):
    # A chat-layout file that happens to have an `instruction` column stays chat unless told otherwise.
    src = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "note", "output": "kept",
                                              "messages": [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Yo"}]}])
    assert next(read_rows(DataSource(path=str(src), format="chat")))[1]["instruction"] == "note"
    assert next(read_rows(str(src)))[1]["messages"][-1]["content"] == "kept"  # auto: Alpaca


def test_stage_configs_accept_a_source_mapping_and_name_bad_keys(tmp_path):
    from stages.dpo import Config as DPOConfig
    from stages.sft import Config as SFTConfig

    cfg = load_config(SFTConfig, "configs/tiny/sft.yaml",
                      ["data.train={path: csv, data_files: {train: a.csv}, columns: {q: prompt, a: completion}}"])
    assert isinstance(cfg.data.train, DataSource) and cfg.data.train.columns == {"q": "prompt", "a": "completion"}
    assert load_config(SFTConfig, "configs/tiny/sft.yaml").data.train == "data/instruct/train.jsonl"  # old form
    with pytest.raises(ConfigError) as e:
        load_config(DPOConfig, "configs/tiny/dpo.yaml", ["data.train={path: x.csv, colums: {}}",
                                                         "data.eval={path: y.csv, format: xml}"])
    assert e.value.problems == [
        "configs/tiny/dpo.yaml (command line): data.train.colums: unknown key",
        "configs/tiny/dpo.yaml (command line): data.eval.format: expected one of "
        "'auto', 'chat', 'alpaca' or 'sharegpt', got 'xml'"]


def test_dpo_stage_trains_on_a_csv_file(tiny_store, tmp_path):
    """The real entry point on CSV pairs (messages and constraints as JSON cells): it used to fail with
    "Couldn't find any data file"."""
    from alignment.artifacts import ArtifactStore
    from alignment.cli import main

    keys = ["prompt", "chosen", "rejected", "constraints", "category"]
    rows = [json.loads(line) for line in Path("data/prefs/train.jsonl").read_text().splitlines()[:24]]
    src = write_csv(tmp_path / "pairs.csv", keys, [[r[k] if isinstance(r[k], str) else json.dumps(r[k]) for k in keys]
                                                   for r in rows])
    root, run = tiny_store
    assert main(["run", "dpo", "-c", "configs/tiny/dpo.yaml", "--artifacts", str(tmp_path / "store"), "--run", "csv",
                 f"inputs.sft={root / run / 'sft'}", f"data.train={src}", "data.eval=null", "train.max_steps=2",
                 "eval.kl_prompts=0"]) == 0
    art = ArtifactStore(tmp_path / "store").read_stage("csv", "dpo")
    pref = art.manifest.lineage["preferences"]["train"]
    assert pref["source"] == str(src) and pref["rows"] == 22 and pref["sha256"]  # 24 rows, 2 held out
    assert art.manifest.metrics["steps"] == 2
