"""The gold judge: exact, rule-based checks of verifiable instruction constraints.

No stage trains on this function. Reward models, DPO and PPO only ever see preference
labels (human or AI); the gold function is kept apart so that evaluation can measure how
well each stage learned to follow instructions without the training signal leaking into it.

A constraint is a dict with a ``type`` and that type's parameters:

=============  ===========  =====================================================================
type           parameters   satisfied when
=============  ===========  =====================================================================
``max_words``  ``n``        the response has at most ``n`` words
``min_words``  ``n``        the response has at least ``n`` words
``keyword``    ``word``     ``word`` appears as a whole word (or phrase), ignoring case
``bullets``    ``n``        exactly ``n`` lines start with ``"- "``
``lowercase``  (none)       the response has no uppercase letters
``end_with``   ``phrase``   the response, less trailing whitespace, ends with ``phrase``
=============  ===========  =====================================================================

A *word* is a run of letters/digits, optionally joined by an apostrophe, dot or hyphen
(``don't``, ``well-known``, ``3.5``), so a bullet marker ``-`` is not counted as a word.
"""

from __future__ import annotations

import re
from typing import Callable

_WORD_RE = re.compile(r"\w+(?:['’.\-]\w+)*")


def count_words(text: str) -> int:
    """Number of words in `text`, as defined in the module docstring."""
    return len(_WORD_RE.findall(text))


def _int_param(constraint: dict, key: str) -> int:
    """The non-negative integer parameter `key`; a bad one is a data bug worth stopping for."""
    value = constraint.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"constraint '{constraint['type']}' needs '{key}' as a non-negative integer, got {value!r}")
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


def _keyword(response: str, constraint: dict) -> bool:
    # Lookarounds rather than \b so keywords that start or end with punctuation still work.
    word = re.escape(_str_param(constraint, "word").strip())
    return re.search(rf"(?<!\w){word}(?!\w)", response, flags=re.IGNORECASE) is not None


def _bullets(response: str, constraint: dict) -> bool:
    return sum(line.startswith("- ") for line in response.splitlines()) == _int_param(constraint, "n")


def _lowercase(response: str, constraint: dict) -> bool:
    return not any(ch.isupper() for ch in response)


def _end_with(response: str, constraint: dict) -> bool:
    return response.rstrip().endswith(_str_param(constraint, "phrase").rstrip())


CHECKS: dict[str, Callable[[str, dict], bool]] = {
    "max_words": _max_words,
    "min_words": _min_words,
    "keyword": _keyword,
    "bullets": _bullets,
    "lowercase": _lowercase,
    "end_with": _end_with,
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


def passes(response: str, constraints: list[dict]) -> bool:
    """Whether `response` satisfies every constraint (the strict instruction-following metric)."""
    # A list, not a generator: every constraint is checked, so a bad one always raises.
    return all([check(response, c) for c in constraints])
