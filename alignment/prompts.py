"""The prompt-data contract: what PPO, GRPO/RLOO, evaluation and the RLAIF labeller sample responses for.

A prompt row is one of (any source `alignment.data.read_rows` reads; Alpaca and ShareGPT rows arrive converted):

- ``prompt``: a string (one user turn) or a list of chat messages ending before the assistant's turn;
- ``messages``: a chat (the SFT layout). A final assistant turn is taken off and kept as ``reference``
  (a known-good answer: the `judge` reward compares against it, evaluation may show it);
- a preference pair (``prompt`` + ``chosen`` + ``rejected``): the prompt, with ``chosen`` as ``reference``.

Optional fields kept when present: ``id``, ``constraints`` (gold-checkable, see `alignment.gold`),
``category``, ``reference`` (a string or a one-message list; wins over one derived from the row).

Every prompt is returned as chat messages, never token ids: each consumer applies its own tokenizer's
chat template. A bad row raises `DataError` naming the source and the row (1-based line number for JSONL).
"""

from __future__ import annotations

from alignment.chat import as_messages, message_problems
from alignment.config import Section
from alignment.data import ROW_PROBLEM, Source, read_rows
from alignment.errors import DataError

MAX_LISTED_ROWS = 20


class PromptData(Section):
    """Where a stage's prompts come from (the config section `prompts:` of ppo, label, eval)."""

    train: Source = "data/instruct/train.jsonl"
    """A file (JSONL/JSON/CSV/Parquet), folder or hub id, or a mapping (alignment.data.DataSource: data_files,
    name, revision, split, columns, format); rows with `prompt` (text or messages), `messages`, Alpaca or ShareGPT."""
    eval: Source | None = "data/instruct/eval.jsonl"
    """Held-out prompts (the held-out reward curve); None: no held-out evaluation."""
    max_prompts: int | None = None
    """Use at most the first N training prompts (and N held-out prompts)."""
    train_split: str = "train"
    eval_split: str = "test"

    def problems(self, prefix: str = "prompts") -> list[tuple[str, str]]:
        if self.max_prompts is not None and self.max_prompts < 1:
            return [(f"{prefix}.max_prompts", "expected at least 1 (or leave unset)")]
        return []


def convert_row(row: dict) -> tuple[dict | None, str | None]:
    """(prompt record, None) or (None, problem) for one row; see the module docstring for the layouts."""
    if ROW_PROBLEM in row:  # an Alpaca/ShareGPT row that did not convert (alignment.data)
        return None, row[ROW_PROBLEM]
    reference = None
    if row.get("prompt") is not None:
        prompt = as_messages(row["prompt"], "user")
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
            return None, "prompt: ends with an assistant turn; a prompt stops before the response"
        chosen = row.get("chosen")
        if chosen is not None:
            reference = chosen if isinstance(chosen, str) else (chosen[-1].get("content") if chosen else None)
        field = "prompt"
    elif row.get("messages") is not None:
        msgs = row["messages"]
        problems = message_problems(msgs, "messages")
        if problems:
            return None, problems[0]
        if msgs[-1]["role"] == "assistant":
            prompt, reference = msgs[:-1], msgs[-1]["content"]
        else:
            prompt = msgs
        if not prompt:
            return None, "messages: only an assistant turn, no prompt"
        field = "messages"
    else:
        keys = ", ".join(sorted(row)) or "nothing"
        return None, f"missing field: expected 'prompt' (text or messages) or 'messages' (has: {keys})"
    problems = message_problems(prompt, field)
    if problems:
        return None, problems[0]
    out: dict = {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt]}
    if row.get("reference") is not None:
        ref = row["reference"]
        reference = ref if isinstance(ref, str) else (ref[-1].get("content") if isinstance(ref, list) and ref
                                                      and isinstance(ref[-1], dict) else None)
        if not isinstance(reference, str):
            return None, "reference: expected a string or a list of messages"
    if isinstance(reference, str) and reference.strip():
        out["reference"] = reference
    for key in ("id", "category", "template"):  # template: the wording's id (the eval's CI over wordings)
        if row.get(key) is not None:
            out[key] = row[key] if key == "id" else str(row[key])
    constraints = row.get("constraints")
    if constraints is not None:
        from alignment import gold

        if not (isinstance(constraints, list)
                and all(isinstance(c, dict) and c.get("type") in gold.CHECKS for c in constraints)):
            return None, f"constraints: expected a list of objects whose 'type' is one of {', '.join(gold.CHECKS)}"
        out["constraints"] = constraints
    return out, None


def load_prompts(source: str, limit: int | None = None, split: str | None = None) -> list[dict]:
    """Every prompt of `source` (the first `limit`), each as
    ``{"prompt": [messages], "row": int, "id"?, "constraints"?, "category"?, "reference"?: str}``.

    Any bad row is fatal: the DataError lists each (``"{source}: row {n}: {problem}"``), so a file is fixed
    in one pass. Rows past `limit` are not read.
    """
    good, bad = [], []
    for rowno, row in read_rows(source, split):
        if limit is not None and len(good) + len(bad) >= limit:
            break
        rec, problem = convert_row(row)
        if problem:
            bad.append(f"{source}: row {rowno}: {problem}")
        else:
            rec["row"] = rowno
            good.append(rec)
    if not good and not bad:
        raise DataError(f"{source}: no rows")
    if bad:
        lines = bad[:MAX_LISTED_ROWS] + ([f"{source}: ... and {len(bad) - MAX_LISTED_ROWS} more bad rows"]
                                         if len(bad) > MAX_LISTED_ROWS else [])
        raise DataError(lines[0] if len(bad) == 1 else f"{source}: {len(bad)} bad rows:\n" + "\n".join(lines))
    return good


def train_eval_prompts(data: PromptData) -> tuple[list[dict], list[dict]]:
    """The training prompts and the held-out prompts (empty when `data.eval` is None)."""
    train = load_prompts(data.train, data.max_prompts, data.train_split)
    held_out = load_prompts(data.eval, data.max_prompts, data.eval_split) if data.eval else []
    return train, held_out
