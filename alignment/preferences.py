"""The preference-data contract shared by the reward, DPO and PPO stages and the RLAIF labeller.

A preference row holds a ``prompt`` and two responses, ``chosen`` and ``rejected``. Each of
the three is either a non-empty string or a list of chat messages
(``{"role": "system" | "user" | "assistant", "content": str}``). ``chosen``/``rejected`` may
also be whole conversations that repeat the prompt (the Anthropic-HH layout): then the turns
before the final assistant turn must be the same in both and must start with ``prompt``.

Optional fields: ``id``, ``label_source`` (``"human"`` or ``"ai"``), ``p_chosen`` (the
labeller's probability that ``chosen`` is better, in [0, 1]), ``margin`` (a number),
``constraints`` (gold-checkable constraints, see `alignment.gold`) and ``category``.
A ``None`` optional field counts as absent, because Parquet and `datasets` fill missing
columns with nulls.

Every stage goes through `load_pairs`, so one bad row is reported the same way everywhere:
``"{source}: row {n}: {problem}"``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from alignment import gold
from alignment.chat import message_problems
from alignment.config import Section
from alignment.data import ROW_PROBLEM, Source, read_rows, seeded_split
from alignment.errors import DataError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

LABEL_SOURCES = ("human", "ai")
OPTIONAL_FIELDS = ("id", "label_source", "p_chosen", "margin", "constraints", "category")
MAX_LISTED_ROWS = 50
"""Bad rows listed in a DataError; more would bury the summary line in a wrong-format dataset."""


def response_text(msgs_or_str: str | list[dict]) -> str:
    """The text being judged: the string itself, or the content of the final message."""
    if isinstance(msgs_or_str, str):
        return msgs_or_str
    return msgs_or_str[-1]["content"] if msgs_or_str else ""


def validate_pair(row: dict) -> list[str]:
    """Every problem with one preference row (an empty list when it is usable).

    All problems are collected rather than the first, so a user fixes a file in one pass.
    """
    if ROW_PROBLEM in row:  # an Alpaca/ShareGPT row that did not convert (alignment.data)
        return [row[ROW_PROBLEM]]
    problems: list[str] = []
    for key in ("prompt", "chosen", "rejected"):
        if key not in row or row[key] is None:
            problems.append(f"missing '{key}'")
        else:
            problems += _field_problems(key, row[key])
    if not problems:
        problems += _pair_problems(row)
    return problems + _optional_problems(row)


def _field_problems(key: str, value: Any) -> list[str]:
    """Shape problems of `prompt`, `chosen` or `rejected`."""
    if isinstance(value, str):
        return [] if value.strip() else [f"'{key}' is empty"]
    if not isinstance(value, list):
        return [f"'{key}' must be a string or a list of chat messages, got {type(value).__name__}"]
    problems = message_problems(value, key)
    if not problems and key != "prompt" and value[-1]["role"] != "assistant":
        problems.append(f"'{key}' must end with an assistant turn, got role {value[-1]['role']!r}")
    return problems


def _pair_problems(row: dict) -> list[str]:
    """Problems between the fields of a row whose fields are each well-formed."""
    problems = []
    chosen_prefix, rejected_prefix = _prefix(row["chosen"]), _prefix(row["rejected"])
    if _strip_messages(chosen_prefix) != _strip_messages(rejected_prefix):
        problems.append("prompt mismatch between chosen and rejected")
    elif chosen_prefix and not _starts_with(chosen_prefix, _as_messages(row["prompt"])):
        problems.append("'prompt' does not match the start of the chosen/rejected conversation")
    if response_text(row["chosen"]).strip() == response_text(row["rejected"]).strip():
        problems.append("chosen == rejected")
    return problems


def _optional_problems(row: dict) -> list[str]:
    """Problems with the optional fields that are present."""
    problems = []
    value = row.get("label_source")
    if value is not None and value not in LABEL_SOURCES:
        problems.append(f"'label_source' must be one of {'/'.join(LABEL_SOURCES)}, got {value!r}")
    value = row.get("p_chosen")
    if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
        problems.append(f"'p_chosen' must be a number in [0, 1], got {value!r}")
    value = row.get("margin")
    if value is not None and not _is_number(value):
        problems.append(f"'margin' must be a finite number, got {value!r}")
    value = row.get("id")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        problems.append(f"'id' must be a string or an integer, got {value!r}")
    value = row.get("category")
    if value is not None and not isinstance(value, str):
        problems.append(f"'category' must be a string, got {value!r}")
    value = row.get("constraints")
    if value is not None and not _constraints_ok(value):
        problems.append(f"'constraints' must be a list of objects whose 'type' is one of {', '.join(gold.CHECKS)}")
    return problems


def _is_number(value: Any) -> bool:
    """A finite int/float; bools are excluded since `True` is an int but never a probability."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _constraints_ok(value: Any) -> bool:
    """Constraints the gold judge can score, so evaluation never trips over them later."""
    return isinstance(value, list) and all(isinstance(c, dict) and c.get("type") in gold.CHECKS for c in value)


def _as_messages(value: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a bare string is a single user turn."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


def _prefix(value: str | list[dict]) -> list[dict]:
    """The turns before the final response (empty for a string or a lone response)."""
    return [] if isinstance(value, str) else value[:-1]


def _strip_messages(messages: list[dict]) -> list[dict]:
    """Only role and content, so extra keys (names, ids) neither break comparison nor Arrow schemas."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _starts_with(messages: list[dict], head: list[dict]) -> bool:
    return _strip_messages(messages[: len(head)]) == _strip_messages(head)


def normalise_pair(row: dict, row_number: int | None = None) -> dict:
    """One valid row in the form every stage consumes.

    ``prompt`` becomes a list of messages (a conversation's shared turns when chosen/rejected
    were full conversations), ``chosen``/``rejected`` a one-element list holding the final
    assistant message; optional fields that are set are kept, plus ``row`` when given.
    """
    prompt = _prefix(row["chosen"]) or _as_messages(row["prompt"])
    pair: dict = {
        "prompt": _strip_messages(prompt),
        "chosen": [{"role": "assistant", "content": response_text(row["chosen"])}],
        "rejected": [{"role": "assistant", "content": response_text(row["rejected"])}],
    }
    pair.update({k: row[k] for k in OPTIONAL_FIELDS if row.get(k) is not None})
    if row_number is not None:
        pair["row"] = row_number
    return pair


def pairs_that_fit(pairs: list[dict], tok, max_length: int | None, source) -> list[dict]:
    """The pairs whose chat-templated prompt leaves room for a response within `max_length` tokens.

    TRL's DPO trainer drops the others itself (their prompt would fill the whole sequence), silently, and with none
    left it fails deep inside a sampler; here the drop is counted and logged with the first row, and a file with no
    pair left is one DataError naming it and the setting to change."""
    if max_length is None:
        return pairs
    ids = tok.apply_chat_template([p["prompt"] for p in pairs], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    kept = [p for p, x in zip(pairs, ids, strict=True) if len(x) < max_length]
    if len(kept) == len(pairs):
        return kept
    first = next(p for p, x in zip(pairs, ids) if len(x) >= max_length)
    where = f"row {first['row']}" if "row" in first else "?"
    if not kept:
        raise DataError(f"{source}: every one of the {len(pairs)} pairs has a prompt of at least train.max_length "
                        f"({max_length}) tokens, leaving no room for a response; raise train.max_length")
    log.warning("%s: dropped %d of %d pairs whose prompt alone fills train.max_length (%d tokens); first: %s",
                source, len(pairs) - len(kept), len(pairs), max_length, where)
    return kept


def load_pairs(source, split: str | None = None, max_bad_fraction: float = 0.0) -> list[dict]:
    """Read, validate and normalise the preference pairs in `source`.

    Every row is validated before deciding: if more than `max_bad_fraction` of the rows are
    bad, a DataError lists them (``"{source}: row {n}: {problem}"``); otherwise bad rows are
    dropped with a warning. Tolerating a few bad rows is opt-in, because silently training on
    a smaller dataset than intended is worse than stopping.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    pairs, bad, total = [], [], 0
    for n, row in read_rows(source, split):
        total += 1
        problems = validate_pair(row)
        if problems:
            bad.append(f"{source}: row {n}: {'; '.join(problems)}")
        else:
            pairs.append(normalise_pair(row, n))
    if total == 0:
        raise DataError(f"{source}: no rows")
    if len(bad) / total > max_bad_fraction or not pairs:
        raise DataError(_bad_rows_message(source, bad, total, max_bad_fraction))
    if bad:
        log.warning("%s: dropped %d of %d bad rows (max_bad_fraction=%s); first: %s",
                    source, len(bad), total, max_bad_fraction, bad[0])
    return pairs


def _bad_rows_message(source: str, bad: list[str], total: int, max_bad_fraction: float) -> str:
    """One bad row in a file that allows none: its own line. Otherwise a summary line that stands on its own, then
    one line per bad row (capped)."""
    if len(bad) == 1 and not max_bad_fraction:
        return bad[0]
    lines = [f"{source}: {len(bad)} of {total} rows are bad (max_bad_fraction={max_bad_fraction}):"]
    lines += bad[:MAX_LISTED_ROWS]
    if len(bad) > MAX_LISTED_ROWS:
        lines.append(f"{source}: ... and {len(bad) - MAX_LISTED_ROWS} more bad rows")
    return "\n".join(lines)


def to_trl_dataset(pairs: list[dict]) -> datasets.Dataset:
    """A `datasets.Dataset` in TRL's conversational preference format.

    ``p_chosen``/``margin`` columns are added only when every pair has them: a column with
    gaps would make the trainers mix soft and hard labels without saying so.
    """
    import datasets

    if not pairs:
        raise ValueError("no preference pairs to build a dataset from")
    columns: dict[str, list] = {key: [p[key] for p in pairs] for key in ("prompt", "chosen", "rejected")}
    for key in ("p_chosen", "margin"):
        if all(key in p for p in pairs):
            columns[key] = [float(p[key]) for p in pairs]
    return datasets.Dataset.from_dict(columns)


class PrefData(Section):
    """Where a stage's preference pairs come from (the config section `data:` of reward, DPO, PPO)."""

    train: Source = "data/prefs/train.jsonl"
    """Preference pairs: a file (JSONL/JSON/CSV/Parquet), folder or hub id, or a mapping (alignment.data.DataSource:
    data_files, name, revision, split, columns, format); Alpaca/ShareGPT pairs (chosen/rejected) are converted."""
    eval: Source | None = "data/prefs/eval.jsonl"
    """Held-out pairs for the metrics; None: split `eval_fraction` off the train pairs."""
    train_split: str = "train"
    eval_split: str = "test"
    eval_fraction: float = 0.1
    max_bad_fraction: float = 0.0
    """Refuse to start when more than this fraction of pairs is malformed (0: any bad row is fatal)."""
    max_train_pairs: int | None = None
    max_eval_pairs: int | None = None
    from_stage: str | None = None
    """Read the pairs from this upstream artifact instead (`label`: its pairs.jsonl and eval.jsonl); train/eval ignored."""

    def problems(self, prefix: str = "data") -> list[tuple[str, str]]:
        out = []
        if self.from_stage not in (None, *PAIR_STAGES):
            out.append((f"{prefix}.from_stage", f"expected one of {', '.join(PAIR_STAGES)} or null, got {self.from_stage!r}"))
        if not 0 <= self.max_bad_fraction < 1:
            out.append((f"{prefix}.max_bad_fraction", "expected a fraction in [0, 1)"))
        if self.eval is None and not 0 < self.eval_fraction < 1:
            out.append((f"{prefix}.eval_fraction", "expected a fraction in (0, 1) when data.eval is null"))
        return out


PAIR_STAGES = ("label",)
"""Stages whose artifact holds preference pairs: `pairs.jsonl` (train) and `eval.jsonl` (held-out)."""


def stage_sources(data: PrefData, inputs: dict) -> PrefData:
    """`data` with train/eval pointing into the `from_stage` artifact (unchanged when from_stage is unset).

    An empty or missing eval.jsonl (the labeller had no held-out prompts) means: split eval_fraction off train.
    """
    if not data.from_stage:
        return data
    folder = inputs[data.from_stage].path
    held_out = folder / "eval.jsonl"
    has_eval = held_out.is_file() and held_out.stat().st_size > 0
    return data.model_copy(update={"train": str(folder / "pairs.jsonl"), "eval": str(held_out) if has_eval else None,
                                   "eval_fraction": data.eval_fraction if 0 < data.eval_fraction < 1 else 0.1})


def train_eval_pairs(data: PrefData, seed: int, train_source: str | None = None) -> tuple[list[dict], list[dict]]:
    """Validated train and held-out pairs: the eval file, or a seeded split of the train pairs."""
    train = load_pairs(train_source or data.train, data.train_split, data.max_bad_fraction)
    if data.eval is not None:
        held_out = load_pairs(data.eval, data.eval_split, data.max_bad_fraction)
    else:
        train, held_out = seeded_split(train, data.eval_fraction, seed)
    return train[: data.max_train_pairs], held_out[: data.max_eval_pairs]
