"""The eval stage's answer cache: a model's answers (and their scores) kept by a hash of everything that decides them.

Why: the eval stage answers the same prompts with the same baseline in every run of a chain, and a report that
gains a policy (`policies=[dpo]` -> `[dpo,ppo]`) used to re-answer all of them. Keyed by content, an entry is
reused only when the model's artifact (its manifest hash), the tokenizer, the prompts, the generation settings,
the precision, the seed and this code's version are the same, so a hit is the answer the stage would write
again. The default pipeline relies on it: eval first runs for dpo while ppo trains, then once more with ppo at
the end, answering only ppo (docs/pipeline.md, "Eval beside ppo").

Layout: `<artifact root>/.cache/eval/<key>.json` (beside the judge's verdict cache), JSON only, each file
written whole and renamed into place, so a kill never leaves half an entry. A file that does not parse, names
another key or has the wrong shape is ignored (and rewritten), never trusted. Deleting the folder is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger("align")

FORMAT = 1
"""Bumped when what an entry holds changes meaning (it is part of every key)."""


def digest(material) -> str:
    """sha256 of JSON data (keys sorted), the form every cache key is made from."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@functools.cache
def code_version() -> list:
    """This package's version and git commit: a code change may change an answer, so it misses the cache."""
    from alignment import __version__
    from alignment.manifest import git_commit

    return [__version__, git_commit()]


class AnswerCache:
    """get / put JSON values by key in `folder` (None: a cache that never hits and keeps nothing)."""

    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder)
        self.reused: dict[str, list[str]] = {}
        """What the last run took from the cache: {kind: [model name, ...]} (for the stage's metrics)."""

    def get(self, kind: str, name: str, key: str, valid: Callable[[object], bool]):
        """The value stored under `key` when it passes `valid`, else None. `kind` / `name` (answers / sft) only
        label the log line and `reused`."""
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("[eval] cache: %s does not read as JSON (%s); computing it again", path, e)
            return None
        value = entry.get("value") if isinstance(entry, dict) and entry.get("key") == key else None
        try:
            ok = value is not None and valid(value)
        except (TypeError, KeyError, ValueError, AttributeError):
            ok = False
        if not ok:
            log.warning("[eval] cache: %s is not a valid %s entry; computing it again", path, kind)
            return None
        self.reused.setdefault(kind, []).append(name)
        return value

    def summary(self) -> str:
        """What was reused, for the log: `answers of sft, dpo; rewards of sft`."""
        return "; ".join(f"{kind} of {', '.join(names)}" for kind, names in self.reused.items())

    def put(self, key: str, value) -> None:
        """Keep `value` under `key`. A cache that cannot be written (a full disk, no permission) is a warning and
        then off for this run: the stage's own outputs matter more than the next run's shortcut."""
        if self.folder is None:
            return
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"format": FORMAT, "key": key, "value": value}, ensure_ascii=False),
                           encoding="utf-8")
            os.replace(tmp, self.folder / f"{key}.json")
        except OSError as e:
            log.warning("[eval] cache: cannot write %s (%s); not caching in this run", self.folder, e)
            self.folder = None
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


# -- shapes (a cached value is data from disk: check it before use) --------------------------------------


def is_answers(value, counts: dict[str, int]) -> bool:
    """{"responses": {set: {"text": [str], "tokens": [int], "eos": [bool]}}, "ppl": dict|None, "kl": dict|None},
    one answer per prompt of every set in `counts` ({set: prompts})."""
    if not isinstance(value, dict) or set(value.get("responses", {})) != set(counts):
        return False
    for s, n in counts.items():
        r = value["responses"][s]
        if not (isinstance(r, dict) and all(isinstance(r.get(k), list) and len(r[k]) == n
                                            for k in ("text", "tokens", "eos"))):
            return False
        if not (all(isinstance(t, str) for t in r["text"]) and all(type(t) is int for t in r["tokens"])
                and all(isinstance(e, bool) for e in r["eos"])):
            return False
    return all(value.get(k) is None or isinstance(value[k], dict) for k in ("ppl", "kl"))


def is_numbers(value, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
