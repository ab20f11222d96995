"""The gold judge: exact, rule-based checks of verifiable instruction constraints.

The default chain never trains on this function: reward models, DPO and PPO see preference
labels (human or AI), so evaluation measures how well each stage learned to follow
instructions without the training signal leaking into it. The verifiable-reward recipes
(RLVR: `reward_sources.gold_reward`, `gold_reward_graded`) do train on it; their honest
figures are the held-out phrasings and kinds, whose prompts and kinds they never see.

A constraint is a dict with a ``type`` and that type's parameters. The types follow IFEval's
families (Zhou et al. 2023), with the checks spelled out here rather than borrowed:

=====================  ======================  ==========================================================
type                   parameters              satisfied when
=====================  ======================  ==========================================================
``max_words``          ``n``                   the response has at most ``n`` words
``min_words``          ``n``                   the response has at least ``n`` words
``max_sentences``      ``n``                   the response has at most ``n`` sentences
``min_sentences``      ``n``                   the response has at least ``n`` sentences
``paragraphs``         ``n``                   exactly ``n`` paragraphs, separated by blank lines
``keyword``            ``word``                ``word`` appears as a whole word (or phrase), ignoring case
``forbidden_words``    ``words`` (list)        none of ``words`` appears as a whole word, ignoring case
``keyword_frequency``  ``word``, ``n``         ``word`` appears at least ``n`` times (whole word, any case)
``letter_frequency``   ``letter``, ``n``,      the letter (any case) appears at least ``n`` times, or
                       ``relation``            fewer than ``n`` times (``relation``: "at least" / "less than")
``bullets``            ``n``                   exactly ``n`` lines start with ``"- "``
``lowercase``          (none)                  the response has no uppercase letters
``uppercase``          (none)                  the response has letters and none of them is lowercase
``no_commas``          (none)                  the response has no comma
``start_with``         ``phrase``              the response, less leading whitespace, starts with ``phrase``
``end_with``           ``phrase``              the response, less trailing whitespace, ends with ``phrase``
``quotation``          (none)                  the response, stripped, is wrapped in double quotes ``"..."``
``title``              (none)                  a title in double angle brackets ``<<like this>>`` on one line
``highlights``         ``n``                   at least ``n`` sections highlighted ``*like this*`` (one line each)
``json_format``        (none)                  the whole response parses as JSON (a ```json fence is allowed)
``postscript``         ``marker``              a line starts with ``marker`` ("P.S.", any case)
``placeholders``       ``n``                   at least ``n`` square-bracket placeholders ``[like this]``
=====================  ======================  ==========================================================

A *word* is a run of letters/digits, optionally joined by an apostrophe, dot or hyphen
(``don't``, ``well-known``, ``3.5``), so a bullet marker ``-`` is not counted as a word.
A *sentence* is a piece of text holding a word, ended by ``.``, ``!`` or ``?`` followed by
whitespace, by a line break, or by the end of the text (so each bullet line is one sentence,
and ``3.5`` does not end one).
"""

from __future__ import annotations

import json
import re
from typing import Callable

_WORD_RE = re.compile(r"\w+(?:['’.\-]\w+)*")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_HIGHLIGHT_RE = re.compile(r"\*([^\n*]+)\*")
_PLACEHOLDER_RE = re.compile(r"\[[^\[\]\n]*\w[^\[\]\n]*\]")
_TITLE_RE = re.compile(r"<<[^\n<>]*\w[^\n<>]*>>")
_FENCE_RE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
RELATIONS = ("at least", "less than")


def count_words(text: str) -> int:
    """Number of words in `text`, as defined in the module docstring."""
    return len(_WORD_RE.findall(text))


def count_sentences(text: str) -> int:
    """Number of sentences in `text`, as defined in the module docstring."""
    return sum(1 for part in _SENTENCE_SPLIT.split(text) if count_words(part))


def count_paragraphs(text: str) -> int:
    """Number of non-empty blocks of `text` separated by blank lines."""
    return sum(1 for block in re.split(r"\n\s*\n", text.strip()) if block.strip())


def count_word(text: str, word: str) -> int:
    """Whole-word (or phrase) occurrences of `word` in `text`, ignoring case."""
    # Lookarounds rather than \b so keywords that start or end with punctuation still work.
    return len(re.findall(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, flags=re.IGNORECASE))


def _int_param(constraint: dict, key: str, low: int = 0) -> int:
    """The integer parameter `key` (at least `low`); a bad one is a data bug worth stopping for."""
    value = constraint.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a non-negative integer" if low == 0 else f"an integer >= {low}"
        raise ValueError(f"constraint '{constraint['type']}' needs '{key}' as {what}, got {value!r}")
    return value


def _str_param(constraint: dict, key: str) -> str:
    """The non-empty string parameter `key`; an empty one would make every response pass."""
    value = constraint.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"constraint '{constraint['type']}' needs '{key}' as a non-empty string, got {value!r}")
    return value


def _max_words(response: str, constraint: dict) -> bool:
    return count_words(response) <= _int_param(constraint, "n")


def _min_words(response: str, constraint: dict) -> bool:
    return count_words(response) >= _int_param(constraint, "n")


def _max_sentences(response: str, constraint: dict) -> bool:
    return count_sentences(response) <= _int_param(constraint, "n", 1)


def _min_sentences(response: str, constraint: dict) -> bool:
    return count_sentences(response) >= _int_param(constraint, "n", 1)


def _paragraphs(response: str, constraint: dict) -> bool:
    return count_paragraphs(response) == _int_param(constraint, "n", 1)


def _keyword(response: str, constraint: dict) -> bool:
    return count_word(response, _str_param(constraint, "word")) > 0


def _forbidden_words(response: str, constraint: dict) -> bool:
    words = constraint.get("words")
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"constraint 'forbidden_words' needs 'words' as a list of non-empty strings, got {words!r}")
    return not any(count_word(response, w) for w in words)


def _keyword_frequency(response: str, constraint: dict) -> bool:
    return count_word(response, _str_param(constraint, "word")) >= _int_param(constraint, "n", 1)


def _letter_frequency(response: str, constraint: dict) -> bool:
    letter = _str_param(constraint, "letter")
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"constraint 'letter_frequency' needs 'letter' as one letter, got {letter!r}")
    relation = constraint.get("relation", "at least")
    if relation not in RELATIONS:
        raise ValueError(f"constraint 'letter_frequency' needs 'relation' in {RELATIONS}, got {relation!r}")
    count = count_letter(response, letter)
    n = _int_param(constraint, "n", 1)
    return count >= n if relation == "at least" else count < n


def count_letter(text: str, letter: str) -> int:
    return text.lower().count(letter.lower())


def count_bullets(text: str) -> int:
    return sum(line.startswith("- ") for line in text.splitlines())


def count_highlights(text: str) -> int:
    return sum(1 for m in _HIGHLIGHT_RE.findall(text) if count_words(m))


def _bullets(response: str, constraint: dict) -> bool:
    return count_bullets(response) == _int_param(constraint, "n")


def _lowercase(response: str, constraint: dict) -> bool:
    return not any(ch.isupper() for ch in response)


def _uppercase(response: str, constraint: dict) -> bool:
    return any(ch.isalpha() for ch in response) and not any(ch.islower() for ch in response)


def _no_commas(response: str, constraint: dict) -> bool:
    return "," not in response and "，" not in response


def _start_with(response: str, constraint: dict) -> bool:
    return response.lstrip().startswith(_str_param(constraint, "phrase").strip())


def _end_with(response: str, constraint: dict) -> bool:
    return response.rstrip().endswith(_str_param(constraint, "phrase").rstrip())


def _quotation(response: str, constraint: dict) -> bool:
    text = response.strip()
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"' and count_words(text) > 0


def _title(response: str, constraint: dict) -> bool:
    return _TITLE_RE.search(response) is not None


def _highlights(response: str, constraint: dict) -> bool:
    return count_highlights(response) >= _int_param(constraint, "n", 1)


def _json_format(response: str, constraint: dict) -> bool:
    text = response.strip()
    fenced = _FENCE_RE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


def _postscript(response: str, constraint: dict) -> bool:
    marker = re.escape(_str_param(constraint, "marker").strip())
    return re.search(rf"^\s*{marker}", response, flags=re.IGNORECASE | re.MULTILINE) is not None


def _placeholders(response: str, constraint: dict) -> bool:
    return len(_PLACEHOLDER_RE.findall(response)) >= _int_param(constraint, "n", 1)


CHECKS: dict[str, Callable[[str, dict], bool]] = {
    "max_words": _max_words,
    "min_words": _min_words,
    "keyword": _keyword,
    "bullets": _bullets,
    "lowercase": _lowercase,
    "end_with": _end_with,
    "max_sentences": _max_sentences,
    "min_sentences": _min_sentences,
    "paragraphs": _paragraphs,
    "forbidden_words": _forbidden_words,
    "keyword_frequency": _keyword_frequency,
    "letter_frequency": _letter_frequency,
    "uppercase": _uppercase,
    "no_commas": _no_commas,
    "start_with": _start_with,
    "quotation": _quotation,
    "title": _title,
    "highlights": _highlights,
    "json_format": _json_format,
    "postscript": _postscript,
    "placeholders": _placeholders,
}
"""Constraint type -> checker; the keys are the constraint types the project knows."""


def check(response: str, constraint: dict) -> bool:
    """Whether `response` satisfies one `constraint`.

    Raises ValueError for an unknown type or bad parameters: a typo in a dataset must not
    silently count as a failed (or passed) constraint and skew the evaluation.
    """
    if not isinstance(constraint, dict) or "type" not in constraint:
        raise ValueError(f"a constraint must be a dict with a 'type', got {constraint!r}")
    checker = CHECKS.get(constraint["type"])
    if checker is None:
        raise ValueError(f"unknown constraint type '{constraint['type']}' (known: {', '.join(CHECKS)})")
    return checker(response, constraint)


def score(response: str, constraints: list[dict]) -> float:
    """Fraction of `constraints` that `response` satisfies, in [0, 1].

    An empty list scores 1.0: there is nothing to violate. Partial credit lets evaluation
    tell "missed one of two constraints" apart from "ignored the instruction entirely".
    """
    if not constraints:
        return 1.0
    return sum(check(response, c) for c in constraints) / len(constraints)


def _at_least(count: int, n: int) -> float:
    return 1.0 if count >= n else count / n


def _at_most(count: int, n: int) -> float:
    return 1.0 if count <= n else n / count


def _exactly(count: int, n: int) -> float:
    return 1.0 if count == n else min(count, n) / max(count, n)


def _letters(response: str, constraint: dict) -> float:
    count = count_letter(response, _str_param(constraint, "letter"))
    n = _int_param(constraint, "n", 1)
    return _at_least(count, n) if constraint.get("relation", "at least") == "at least" else _at_most(count + 1, n)


CREDITS: dict[str, Callable[[str, dict], float]] = {
    "max_words": lambda r, c: _at_most(count_words(r), _int_param(c, "n")),
    "min_words": lambda r, c: _at_least(count_words(r), _int_param(c, "n")),
    "max_sentences": lambda r, c: _at_most(count_sentences(r), _int_param(c, "n", 1)),
    "min_sentences": lambda r, c: _at_least(count_sentences(r), _int_param(c, "n", 1)),
    "paragraphs": lambda r, c: _exactly(count_paragraphs(r), _int_param(c, "n", 1)),
    "bullets": lambda r, c: _exactly(count_bullets(r), _int_param(c, "n")),
    "keyword_frequency": lambda r, c: _at_least(count_word(r, _str_param(c, "word")), _int_param(c, "n", 1)),
    "letter_frequency": _letters,
    "highlights": lambda r, c: _at_least(count_highlights(r), _int_param(c, "n", 1)),
    "placeholders": lambda r, c: _at_least(len(_PLACEHOLDER_RE.findall(r)), _int_param(c, "n", 1)),
}
"""Count constraints -> partial credit in [0, 1]: how far the count got toward the bound (count / n below an "at
least n", n / count above an "at most n", min / max for "exactly n"); 1 exactly when the check passes."""


def credit(response: str, constraint: dict) -> float:
    """Partial credit for one constraint: `CREDITS` for count constraints, the pass/fail check for the rest.
    `check` runs first, so bad parameters raise as they do there and a passing response always gets 1."""
    if check(response, constraint):
        return 1.0
    graded = CREDITS.get(constraint["type"])
    return graded(response, constraint) if graded else 0.0


def graded_score(response: str, constraints: list[dict]) -> float:
    """Mean partial credit over `constraints` (`credit`), in [0, 1]; `score` with count constraints graded. A
    denser training signal than `score`: a response 20 words short of "at least 50 words" earns 0.6, not 0, so
    a group of samples that all miss the bound still ranks the ones closer to it."""
    if not constraints:
        return 1.0
    return sum(credit(response, c) for c in constraints) / len(constraints)


def passes(response: str, constraints: list[dict]) -> bool:
    """Whether `response` satisfies every constraint (the strict instruction-following metric)."""
    # A list, not a generator: every constraint is checked, so a bad one always raises.
    return all([check(response, c) for c in constraints])
