"""Reading rows through one door: local files and `datasets` sources, converted to the chat contract, numbered.

A source is a path string (the short form every data section accepted before) or a `DataSource` mapping:

    train: data/instruct/train.jsonl                 # JSONL (line numbers), .json (lines or one array), .parquet,
                                                     # .csv/.tsv, .arrow, a save_to_disk folder, or a hub id
    train: {path: csv, data_files: {train: a.csv, test: b.csv}, columns: {question: prompt, answer: completion}}
    train: {path: org/name, name: subset, revision: 3f2a..., split: train[:1000], format: sharegpt}

Rows in Alpaca (`instruction`, `input`, `output` [, `system`, `history`]; or `chosen`/`rejected` for pairs) and
ShareGPT (`conversations: [{from, value}, ...]` [, `system`]; or `chosen`/`rejected` as {from, value}) layouts are
converted to the chat contract (`messages` / `prompt` + `chosen` + `rejected`); `format: auto` recognises them by
their columns. A row that cannot be converted comes back as `{ROW_PROBLEM: "what is wrong"}`, which every data
contract (`sft_data`, `prompts`, `preferences`) reports as "{source}: row {n}: {problem}" like its own problems.

Row numbers are 1-based line numbers for JSONL and CSV (CSV's header is line 1, so they match an editor and a
spreadsheet) and 1-based record indices otherwise.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Annotated, Iterator, Literal, Union

from pydantic import Discriminator, Tag

from alignment.config import Section
from alignment.errors import DataError

ROW_PROBLEM = "__align_row_problem__"
"""Key of a row that could not be converted to the chat contract; its value says why."""
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
"""Local files read through a `datasets` builder (JSONL/JSON/Parquet have readers with exact row numbers)."""
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
PASSTHROUGH = ("id", "category", "constraints", "p_chosen", "margin", "label_source", "reference", "turns")
"""Optional contract fields kept from an Alpaca or ShareGPT row."""


class DataSource(Section):
    """A dataset read through `datasets` with the options a bare path cannot carry."""

    path: str
    """A local file or folder, a `datasets` builder (csv, json, parquet) with `data_files`, or a hub dataset id."""
    name: str | None = None
    """Subset (config) name of a hub dataset, as `datasets.load_dataset(path, name)`."""
    revision: str | None = None
    """Git revision (branch, tag or commit) of a hub dataset: pins what is read."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """Files for the builder, e.g. {train: a.csv, test: b.csv} (a split picks its files)."""
    split: str | None = None
    """Which split to read (slicing such as `train[:1000]` works); unset: the data section's train_split/eval_split."""
    columns: dict[str, str] = {}
    """Rename columns before reading: {column in the data: field of the contract}, e.g. {question: prompt}."""
    format: Literal["auto", "chat", "alpaca", "sharegpt"] = "auto"
    """Row layout: chat (the contract as is), alpaca, sharegpt; auto recognises Alpaca and ShareGPT by their columns."""

    def __str__(self) -> str:
        extra = [f"{k}={v}" for k, v in (("name", self.name), ("revision", self.revision),
                                         ("data_files", self.data_files)) if v]
        return self.path + (f" ({', '.join(extra)})" if extra else "")

    def __fspath__(self) -> str:  # where a caller hashes or records a source as a path
        return self.path


def _source_kind(value) -> str:
    return "source[mapping]" if isinstance(value, (dict, DataSource)) else "source[path]"


# The tags end in [...] so config errors name the key path without the union branch (alignment.config._loc).
Source = Annotated[Union[Annotated[str, Tag("source[path]")], Annotated[DataSource, Tag("source[mapping]")]],
                   Discriminator(_source_kind)]
"""A data section's source: a path string, or a DataSource mapping."""


def read_rows(source: str | DataSource, split: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (row_number, row in the chat contract) from a source (see the module docstring)."""
    spec = source if isinstance(source, DataSource) else DataSource(path=str(source))
    for n, row in _raw_rows(spec, spec.split or split or "train"):
        yield n, convert_layout(_renamed(row, spec.columns), spec.format)


def _raw_rows(spec: DataSource, split: str) -> Iterator[tuple[int, dict]]:
    path = Path(spec.path)
    plain = spec.name is None and spec.revision is None and spec.data_files is None
    if plain and path.suffix in (".jsonl", ".json", ".parquet", *FILE_BUILDERS):
        if not path.is_file():
            raise DataError(f"{spec.path}: file not found")
        if path.suffix == ".parquet":
            yield from _read_parquet(path)
        elif path.suffix in FILE_BUILDERS:
            yield from _read_builder(spec, path, split)
        else:
            yield from _read_json(path)
    else:
        yield from _read_datasets(spec, split)


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    """JSON Lines (row = line number), or one JSON array of objects (Alpaca's layout; row = index + 1)."""
    with path.open("rb") as f:  # sniffed as bytes: a bad byte is reported by the row reader, with its row
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
    if first == b"[" and path.suffix != ".jsonl":  # a .jsonl file is rows, even when its first row is a list
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
            yield i, row
        return
    yield from _read_jsonl(path)


MAX_ROW_BYTES = int(os.environ.get("ALIGN_MAX_ROW_BYTES", 1 << 20))
"""A JSONL row over this size is refused by name (an 8 MB row would triple the stage's memory); raise it with
$ALIGN_MAX_ROW_BYTES for genuinely long documents."""


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        # readline with a cap: a huge row is refused without reading all of it into memory.
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_ROW_BYTES + 1), b""), start=1):
            if len(raw) > MAX_ROW_BYTES:
                raise DataError(f"{path}: row {lineno}: longer than the {MAX_ROW_BYTES} byte limit per row "
                                "(ALIGN_MAX_ROW_BYTES raises it)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: row {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield i, row


def _read_builder(spec: DataSource, path: Path, split: str) -> Iterator[tuple[int, dict]]:
    """A local CSV/TSV/Arrow file through its `datasets` builder. CSV rows are numbered by line (header = 1)."""
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    ds = _load(spec, FILE_BUILDERS[path.suffix], "train", data_files=str(path), **kwargs)
    offset = 2 if FILE_BUILDERS[path.suffix] == "csv" else 1
    for i, row in enumerate(ds):
        yield i + offset, _decode_cells(dict(row)) if offset == 2 else dict(row)


def _read_datasets(spec: DataSource, split: str) -> Iterator[tuple[int, dict]]:
    import datasets

    folder = Path(spec.path)
    if folder.is_dir() and any((folder / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        try:
            ds = datasets.load_from_disk(spec.path)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the source and why
            raise DataError(f"{spec}: cannot load split '{split}' saved with save_to_disk: {_first_line(e)}") from None
    else:
        ds = _load(spec, spec.path, split, data_files=spec.data_files, name=spec.name, revision=spec.revision)
    csv = spec.path == "csv" or str(spec.data_files or "").endswith((".csv", ".tsv"))
    for i, row in enumerate(ds, start=1):
        yield i, _decode_cells(dict(row)) if csv else dict(row)


def _load(spec: DataSource, path: str, split: str, **kwargs):
    import datasets

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the source and why
        raise DataError(f"{spec}: cannot load split '{split}': {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _decode_cells(row: dict) -> dict:
    """CSV cells are text: a cell holding a JSON list or object (messages, constraints) becomes that value."""
    out = {}
    for k, v in row.items():
        if isinstance(v, str) and v[:1] in "[{" and v.rstrip()[-1:] in "]}":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


# -- layouts -------------------------------------------------------------------------------------------------------
def _renamed(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    missing = [c for c in columns if c not in row]
    if missing:
        return {ROW_PROBLEM: f"columns: no column '{missing[0]}' to rename (has: {', '.join(sorted(row))})"}
    out = {k: v for k, v in row.items() if k not in columns}
    out.update({new: row[old] for old, new in columns.items()})
    return out


def layout_of(row: dict, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and any(k in row for k in ("output", "chosen", "rejected")):
        return "alpaca"
    return "chat"


def convert_layout(row: dict, fmt: str = "auto") -> dict:
    """The row in the chat contract, or {ROW_PROBLEM: why} when it does not fit its layout."""
    if ROW_PROBLEM in row:
        return row
    kind = layout_of(row, fmt)
    if kind == "chat":
        return row
    messages, problem = (_alpaca if kind == "alpaca" else _sharegpt)(row)
    if problem:
        return {ROW_PROBLEM: f"{kind}: {problem}"}
    out = {k: row[k] for k in PASSTHROUGH if row.get(k) is not None}
    if "chosen" in messages:  # a preference pair
        out.update(messages)
    else:
        out["messages"] = messages["messages"]
    return out


def _text(row: dict, key: str, *, required: bool = True) -> tuple[str | None, str | None]:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, (f"'{key}' is missing or empty" if required else None)
    if not isinstance(value, str):
        return None, f"'{key}' must be a string, got {type(value).__name__}"
    return value, None


def _alpaca(row: dict) -> tuple[dict, str | None]:
    instruction, problem = _text(row, "instruction")
    extra, problem2 = _text(row, "input", required=False)
    system, problem3 = _text(row, "system", required=False)
    if problem or problem2 or problem3:
        return {}, problem or problem2 or problem3
    msgs = [{"role": "system", "content": system}] if system else []
    history = row.get("history") or []
    if not isinstance(history, list):
        return {}, f"'history' must be a list of [instruction, response] pairs, got {type(history).__name__}"
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) and t.strip()
                                                                           for t in turn)):
            return {}, f"history[{i}]: expected [instruction, response], two non-empty strings"
        msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    msgs.append({"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")})
    if "chosen" in row or "rejected" in row:
        pair = {}
        for key in ("chosen", "rejected"):
            text, problem = _text(row, key)
            if problem:
                return {}, problem
            pair[key] = text
        return {"prompt": msgs, **pair}, None
    output, problem = _text(row, "output")
    if problem:
        return {}, problem
    return {"messages": msgs + [{"role": "assistant", "content": output}]}, None


def _sharegpt_turn(turn, where: str) -> tuple[dict | None, str | None]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        return None, f"{where}: expected an object with 'from' and 'value'"
    role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        return None, (f"{where}.from: {turn['from']!r} is not a chat role (human, gpt, system; tool and function "
                      "calls are not supported)")
    if not isinstance(turn["value"], str) or not turn["value"].strip():
        return None, f"{where}.value: empty or not a string"
    return {"role": role, "content": turn["value"]}, None


def _sharegpt(row: dict) -> tuple[dict, str | None]:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        return {}, "'conversations' must be a non-empty list of {from, value} turns"
    msgs = []
    system, problem = _text(row, "system", required=False)
    if problem:
        return {}, problem
    if system:
        msgs.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        msg, problem = _sharegpt_turn(turn, f"conversations[{i}]")
        if problem:
            return {}, problem
        msgs.append(msg)
    if "chosen" in row or "rejected" in row:
        pair = {}
        for key in ("chosen", "rejected"):
            value = row.get(key)
            msg, problem = _sharegpt_turn(value, key) if isinstance(value, dict) else (
                ({"role": "assistant", "content": value}, None) if isinstance(value, str) and value.strip()
                else (None, f"'{key}' must be a {{from, value}} turn or a non-empty string"))
            if problem:
                return {}, problem
            pair[key] = msg["content"]
        return {"prompt": msgs, **pair}, None
    return {"messages": msgs}, None




def seeded_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded shuffle, then at least one row held out. Shuffles `rows` in place."""
    random.Random(seed).shuffle(rows)
    cut = max(1, int(len(rows) * fraction))
    return rows[cut:], rows[:cut]
