"""Reading rows from local JSONL/Parquet files or a `datasets` name/path, with row numbers.

Row numbers are 1-based line numbers for JSONL (so an editor jumps to them) and 1-based
record indices for Parquet and `datasets`; every error names the source and the row.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterator

from alignment.errors import DataError


def read_rows(source: str, split: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (row_number, row) from a .jsonl/.json/.parquet file or a `datasets` name/path."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        yield from _read_jsonl(path)
    elif path.suffix == ".parquet" and path.is_file():
        yield from _read_parquet(path)
    elif path.suffix in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{source}: file not found")
    else:
        yield from _read_datasets(source, split or "train")


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


def _read_datasets(source: str, split: str) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        if Path(source).is_dir() and (Path(source) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(source)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types; the user needs the source and the reason
        raise DataError(f"{source}: cannot load dataset split '{split}': {e}") from None
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def seeded_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded shuffle, then at least one row held out. Shuffles `rows` in place."""
    random.Random(seed).shuffle(rows)
    cut = max(1, int(len(rows) * fraction))
    return rows[cut:], rows[:cut]
