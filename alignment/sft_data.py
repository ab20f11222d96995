"""SFT rows -> TRL's conversational prompt/completion format, with every bad row named.

Mixing several sources is `alignment.mixture`; this module reads one.

Accepted rows: `messages` (the last turn must be the assistant's: it is the completion), or
`prompt` + `completion` (strings or message lists), or any layout `alignment.data` converts to those (Alpaca,
ShareGPT, renamed columns). Loss is on the completion only.
"""

from __future__ import annotations

import logging

from alignment.chat import as_messages, message_problems
from alignment.data import ROW_PROBLEM, read_rows
from alignment.errors import DataError

log = logging.getLogger("align")


def convert_row(row: dict) -> tuple[dict | None, str | None]:
    """(example, None) or (None, problem)."""
    if ROW_PROBLEM in row:  # an Alpaca/ShareGPT row that did not convert (alignment.data)
        return None, row[ROW_PROBLEM]
    if "messages" in row:
        msgs = row["messages"]
        problems = message_problems(msgs, "messages")
        if problems:
            return None, problems[0]
        if msgs[-1]["role"] != "assistant":
            return None, f"messages[{len(msgs) - 1}].role: the last turn must be 'assistant' (it is the completion)"
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}, None
    if "prompt" in row and "completion" in row:
        prompt, completion = as_messages(row["prompt"], "user"), as_messages(row["completion"], "assistant")
        problems = message_problems(prompt, "prompt") + message_problems(completion, "completion")
        if problems:
            return None, problems[0]
        return {"prompt": prompt, "completion": completion}, None
    return None, f"missing field: expected 'messages' or 'prompt' + 'completion' (has: {', '.join(sorted(row)) or 'nothing'})"


def load_examples(source: str, split: str | None, max_bad_fraction: float) -> list[dict]:
    """Convert every row; refuse when bad rows exceed the allowed fraction, naming each one."""
    good, bad = [], []
    for rowno, row in read_rows(source, split):
        example, problem = convert_row(row)
        if problem:
            bad.append(f"{source}: row {rowno}: {problem}")
        else:
            example["source"] = str(source)
            # Instruction mixtures hold out and report by category (the bundled rows: the constraint type).
            category = row.get("category")
            example["category"] = None if category is None else str(category)
            good.append(example)
    total = len(good) + len(bad)
    if total == 0:
        raise DataError(f"{source}: no rows")
    if bad and len(bad) / total > max_bad_fraction:
        head = bad[0] if len(bad) == 1 else f"{bad[0]} (and {len(bad) - 1} more bad rows)"
        raise DataError(head + (f"; max_bad_fraction={max_bad_fraction}" if max_bad_fraction else ""))
    for line in bad:
        log.warning("skipping %s", line)
    return good

