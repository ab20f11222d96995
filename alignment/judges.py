"""AI judges: which of two responses to a prompt is better, as a soft label (RLAIF).

Method (Lee et al. 2023, "RLAIF vs RLHF"; Bai et al. 2022, Constitutional AI):
- the judge sees a preamble (a constitution file of principles), optional few-shot examples, the
  conversation, response A and response B, then the answer slot;
- the soft label is the judge's probability of answering "A" vs "B", read from the log-probabilities of
  the two label tokens and renormalised over just those two (so it is a label even from a small judge);
  a judge without log-probabilities is parsed from its text, and calls that yield neither are counted;
- position bias: each pair is judged in both orders and the two P(a better) averaged; the rate at which
  the orders pick different winners is the position-bias rate;
- optional chain of thought: the judge first writes a rationale, then gives the verdict after it;
- optional clamping of the final label (CAI clamps CoT labels to [0.4, 0.6]: CoT verdicts are overconfident).

- optional per-constraint checklist (`checklist: true`, local judges): the request's explicit instructions become
  yes/no questions asked about each response alone (TICK, Cook et al. 2024; CheckEval, Lee et al. 2024);
  a response's score is its mean P(yes), and P(a better) = sigmoid((score_a - score_b) / checklist_temperature).
  Each response is read alone, so the verdict cannot depend on the order the pair is shown in.

Kinds: `local` (a transformers causal LM in-process), `openai` (any OpenAI-compatible chat-completions
endpoint, `alignment/judge_openai.py`), `reward_model` (sigmoid of a reward-model score difference) and
`ensemble` (the weighted mean of its `members`' P(first better)).
Tests register rule-based kinds with `register_judge`; shipped configs never use those.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from alignment.config import Section
from alignment.errors import AlignError, ConfigError

BUILTIN_KINDS = ("local", "openai", "reward_model", "ensemble")
DEFAULT_CONSTITUTION = (
    "You are a careful evaluator. Compare two assistant responses to the same conversation and decide which one "
    "is better: more helpful, more accurate, and more faithful to every instruction in the user's request.")


class JudgeError(AlignError):
    """The judge could not be reached or answered nonsense (one line, names the endpoint)."""


class JudgeSpec(Section):
    """Which judge labels the pairs and how it is asked (the `judge:` section)."""

    kind: str = "local"
    """openai | local | reward_model (+ kinds tests register)."""
    model: str | None = None
    """openai: the served model name; local: a hub id, model folder, artifact folder, or 'sft'/'base' (the run's artifact)."""
    base_url: str | None = None
    """openai: e.g. http://127.0.0.1:8080/v1 (the /chat/completions path is appended)."""
    api_key_env: str | None = None
    """openai: NAME of the environment variable holding the API key; the key itself is never stored or logged."""
    reward_artifact: str | None = None
    """reward_model: artifact folder; None: the run's `reward` artifact."""
    constitution: str | None = None
    """Path of the preamble/principles file (Markdown); None: a one-paragraph generic preamble."""
    few_shot: str | None = None
    """Preference pairs (JSONL, the preference contract) shown as worked examples before the question."""
    few_shot_n: int = 2
    labels: tuple[str, str] = ("A", "B")
    """The answer tokens for the first- and second-shown response ("A"/"B" or "1"/"2")."""
    both_orders: bool = True
    chain_of_thought: bool = False
    cot_max_tokens: int = 128
    clamp: tuple[float, float] | None = None
    """Clamp the final P(a better) into [lo, hi], e.g. [0.4, 0.6] for CoT labels (CAI)."""
    max_tokens: int = 1
    """openai: tokens to generate for the verdict (1 reads the answer token's log-probabilities)."""
    top_logprobs: int = 10
    timeout_s: float = 60.0
    retries: int = 4
    """openai: retries on 429/5xx and connection errors, with exponential backoff from backoff_s."""
    backoff_s: float = 0.5
    concurrency: int = 4
    """openai: requests in flight at once."""
    batch_size: int = 8
    """local / reward_model: sequences per forward pass."""
    max_length: int = 1024
    """local / reward_model: judge prompts longer than this (tokens) keep their end."""
    checklist: bool = False
    """local: judge each response alone against a checklist of the request's explicit instructions (yes/no per
    item) instead of showing the pair; order-free, so no position bias."""
    checklist_temperature: float = 0.1
    """checklist: P(a better) = sigmoid((score_a - score_b) / this); scores are mean P(yes) in [0, 1]."""
    members: list["JudgeSpec"] | None = None
    """ensemble: the judges whose P(first better) is averaged (each a full judge section)."""
    weights: list[float] | None = None
    """ensemble: one weight per member (default: equal)."""

    def problems(self, prefix: str = "judge") -> list[tuple[str, str]]:
        out = []
        if self.kind not in _FACTORIES:
            out.append((f"{prefix}.kind", f"expected one of {', '.join(_FACTORIES)}, got {self.kind!r}"))
        if self.kind == "ensemble":
            if not self.members:
                out.append((f"{prefix}.members", "kind 'ensemble' needs at least one member judge"))
            for i, m in enumerate(self.members or []):
                out += m.problems(f"{prefix}.members.{i}")
            if self.weights is not None and (len(self.weights) != len(self.members or [])
                                             or any(w < 0 for w in self.weights) or not sum(self.weights) > 0):
                out.append((f"{prefix}.weights", "expected one non-negative weight per member, not all zero"))
        elif self.members is not None or self.weights is not None:
            out.append((f"{prefix}.members", f"members/weights apply to kind 'ensemble' only, not '{self.kind}'"))
        if self.checklist and self.kind != "local":
            out.append((f"{prefix}.checklist", f"the checklist is asked by a local judge, not kind '{self.kind}'"))
        if self.checklist_temperature <= 0:
            out.append((f"{prefix}.checklist_temperature", "expected > 0"))
        if self.kind == "openai" and not (self.base_url and self.model):
            out.append((f"{prefix}.base_url", "kind 'openai' needs base_url and model"))
        if self.clamp is not None and not 0.0 <= self.clamp[0] <= 0.5 <= self.clamp[1] <= 1.0:
            out.append((f"{prefix}.clamp", f"expected [lo, hi] with 0 <= lo <= 0.5 <= hi <= 1, got {list(self.clamp)}"))
        if self.labels[0] == self.labels[1] or not all(x.strip() for x in self.labels):
            out.append((f"{prefix}.labels", "expected two different non-empty answer tokens"))
        for key in ("constitution", "few_shot"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                out.append((f"{prefix}.{key}", f"{path}: file not found"))
        if self.retries < 0 or self.concurrency < 1 or self.batch_size < 1 or self.timeout_s <= 0:
            out.append((prefix, "retries >= 0, concurrency >= 1, batch_size >= 1 and timeout_s > 0 expected"))
        return out


@dataclass
class Verdict:
    p_a: float
    """P(response a is better), averaged over both orders when both_orders (then clamped)."""
    p_ab: float
    """P(first-shown better) with a shown first (0.5 when that order was unparseable)."""
    p_ba: float | None
    """P(first-shown better) with b shown first (None when both_orders is False)."""
    parsed: bool
    """False when neither order yielded a usable answer (then p_a = 0.5)."""
    disagree: bool
    """The two orders picked different winners (position bias)."""
    unparsed_calls: int = 0
    """How many of the (one or two) judge calls yielded no usable answer."""

    def to_json(self) -> dict:
        return {"p_a": self.p_a, "p_ab": self.p_ab, "p_ba": self.p_ba, "parsed": self.parsed,
                "disagree": self.disagree, "unparsed_calls": self.unparsed_calls}


def combine(p_ab: float | None, p_ba: float | None, *, both_orders: bool,
            clamp: tuple[float, float] | None = None) -> Verdict:
    """One verdict from P(first-shown better) in each order (None: that call was unparseable).

    With b shown first, P(a better) = 1 - p_ba; the label is the mean of the usable orders' P(a better).
    """
    votes = [p for p in (p_ab, None if p_ba is None else 1.0 - p_ba) if p is not None]
    unparsed = (p_ab is None) + (both_orders and p_ba is None)
    p_a = sum(votes) / len(votes) if votes else 0.5
    if clamp is not None:
        p_a = min(max(p_a, clamp[0]), clamp[1])
    disagree = False
    if both_orders and p_ab is not None and p_ba is not None:
        # Winner a in the first order iff p_ab > 0.5; in the second iff p_ba < 0.5. Exact ties pick no one.
        w1, w2 = _winner(p_ab), _winner(1.0 - p_ba)
        disagree = w1 is not None and w2 is not None and w1 != w2
    return Verdict(p_a=p_a, p_ab=0.5 if p_ab is None else p_ab,
                   p_ba=(0.5 if p_ba is None else p_ba) if both_orders else None,
                   parsed=bool(votes), disagree=disagree, unparsed_calls=int(unparsed))


def _winner(p_a: float) -> str | None:
    return "a" if p_a > 0.5 else "b" if p_a < 0.5 else None


def two_way(logp_first: float, logp_second: float) -> float:
    """P(first) from the two label log-probabilities, renormalised over just those two (Lee et al. 2023)."""
    m = max(logp_first, logp_second)
    e1, e2 = math.exp(logp_first - m), math.exp(logp_second - m)
    return e1 / (e1 + e2)


def parse_choice(text: str, labels: tuple[str, str]) -> int | None:
    """0/1 for the first/second label found as a whole word in the judge's text, None when neither or both."""
    if not text:
        return None
    verdict = re.search(r"(?:preferred|better|answer|verdict)[^A-Za-z0-9]{0,20}(?:response\s+)?(\S+)", text, re.I)
    candidates = [verdict.group(1)] if verdict else []
    candidates.append(text.strip().split()[0] if text.strip() else "")
    for word in candidates:
        word = word.strip(" .:*\"'()[]")
        if word in labels:
            return labels.index(word)
    found = {i for i, lab in enumerate(labels) if re.search(rf"(?<![A-Za-z0-9]){re.escape(lab)}(?![A-Za-z0-9])", text)}
    return found.pop() if len(found) == 1 else None


# -- the prompt the judge reads -----------------------------------------------------------------


def render_conversation(messages: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


class Template:
    """Builds the judge's chat messages; its hash is part of the judge's name (and so of cache keys)."""

    def __init__(self, spec: JudgeSpec):
        self.labels = spec.labels
        self.cot = spec.chain_of_thought
        self.checklist = spec.checklist
        self.preamble = Path(spec.constitution).read_text(encoding="utf-8").strip() if spec.constitution \
            else DEFAULT_CONSTITUTION
        self.examples = self._few_shot(spec) if spec.few_shot else ""

    def _few_shot(self, spec: JudgeSpec) -> str:
        from alignment.preferences import load_pairs

        blocks = []
        for i, p in enumerate(load_pairs(spec.few_shot)[: spec.few_shot_n]):
            # Alternate which slot holds the chosen response so the examples teach no position.
            first, second = (p["chosen"], p["rejected"]) if i % 2 == 0 else (p["rejected"], p["chosen"])
            blocks.append(self._body(p["prompt"], first[0]["content"], second[0]["content"])
                          + f"\nBetter response: {self.labels[i % 2]}")
        return "Examples:\n\n" + "\n\n".join(blocks)

    def _body(self, prompt: list[dict], first: str, second: str) -> str:
        a, b = self.labels
        return (f"Conversation:\n{render_conversation(prompt)}\n\nResponse {a}:\n{first}\n\n"
                f"Response {b}:\n{second}")

    def question(self) -> str:
        a, b = self.labels
        return f"Which response is better? Answer with a single letter: {a} or {b}."

    def messages(self, prompt: list[dict], first: str, second: str) -> list[dict]:
        """The user turn asking for the verdict (or, with chain of thought, for the rationale first)."""
        ask = ("First explain briefly, in two or three sentences, which response follows the principles better. "
               "Do not give the verdict yet.") if self.cot else self.question()
        parts = [self.preamble] + ([self.examples] if self.examples else []) + [self._body(prompt, first, second), ask]
        return [{"role": "user", "content": "\n\n".join(parts)}]

    def verdict_messages(self, prompt: list[dict], first: str, second: str, rationale: str) -> list[dict]:
        """After a rationale: the conversation continues with a request for the one-token verdict."""
        return self.messages(prompt, first, second) + [{"role": "assistant", "content": rationale.strip() or "-"},
                                                       {"role": "user", "content": self.question()}]

    def check_messages(self, prompt: list[dict], response: str, item: str) -> list[dict]:
        """One checklist question about one response alone (answered with the first/second label = yes/no)."""
        yes, no = CHECK_LABELS
        return [{"role": "user", "content": "\n\n".join([
            self.preamble, f"Conversation:\n{render_conversation(prompt)}", f"Response:\n{response}",
            f"Requirement: {item}",
            f"Does the response meet this requirement? Answer with a single word: {yes} or {no}."])}]

    def digest(self) -> str:
        extra = [CHECKLIST_VERSION] if self.checklist else []  # older judges keep their names (and caches)
        text = json.dumps([self.preamble, self.examples, self.labels, self.cot, self.question(), *extra])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- per-constraint checklists -----------------------------------------------------------------

CHECK_LABELS = ("Yes", "No")
CHECKLIST_VERSION = "checklist-v1"
"""Part of every template digest: a change to how items are extracted or asked must miss the verdict cache."""
_INSTRUCTION = re.compile(
    r"\b(must|should|use|using|include|includes|including|mention|end|ends|start|begin|do not|don't|never|avoid|"
    r"only|exactly|at least|at most|no more|fewer|less than|more than|maximum|minimum|words?|sentences?|"
    r"paragraphs?|bullets?|list|lowercase|uppercase|capital|letters?|format|json|title|quote|reply|answer|"
    r"respond|write|keep|make sure|limit)\b", re.I)


def checklist_items(prompt: list[dict]) -> list[str]:
    """The explicit instructions of the last user turn, one per sentence, as checklist items.

    A sentence counts as an instruction when it uses instruction vocabulary (must, use, include, end with,
    at most, words, bullets, lowercase, ...) and is not a question: the question is the task, the rest are
    the constraints on how to answer it. A request without any gets one generic item.
    """
    user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", user) if s.strip()]
    items = [s for s in sentences if not s.endswith("?") and _INSTRUCTION.search(s)]
    # The first sentence is usually the task itself ("Tell me about rivers."); keep it only when it is all there is.
    if len(items) > 1 and items[0] == sentences[0]:
        items = items[1:]
    return items or ["The response answers the user's request helpfully and accurately."]


# -- the judge protocol ---------------------------------------------------------------------------


class Judge:
    """Subclasses implement `first_better`: P(first-shown better) per item, None where unusable."""

    name: str = "judge"

    def __init__(self, spec: JudgeSpec):
        self.spec = spec

    def first_better(self, prompts: list[list[dict]], first: list[str], second: list[str]) -> list[float | None]:
        raise NotImplementedError

    def compare(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> list[Verdict]:
        if not (len(prompts) == len(a) == len(b)):
            raise ValueError(f"compare: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        if not prompts:
            return []
        if self.spec.both_orders:
            # One call for both orders, so batched/concurrent judges fill their batches.
            both = self.first_better(prompts + prompts, list(a) + list(b), list(b) + list(a))
            ab, ba = both[: len(prompts)], both[len(prompts):]
        else:
            ab, ba = self.first_better(prompts, list(a), list(b)), [None] * len(prompts)
        return [combine(x, y, both_orders=self.spec.both_orders, clamp=self.spec.clamp) for x, y in zip(ab, ba)]

    def check(self) -> None:
        """Fail fast (JudgeError) when the judge cannot answer, before any sampling; a no-op in-process."""

    def close(self) -> None:
        """Release models/connections (a no-op unless a judge holds something)."""


def spec_digest(spec: JudgeSpec, *extra: str) -> str:
    """What changes verdicts besides the template: the averaging, clamping and the judge's own knobs."""
    keys = ("both_orders", "clamp", "max_tokens", "cot_max_tokens", "max_length")
    keys += ("checklist", "checklist_temperature") if spec.checklist else ()  # older judges keep their names
    text = json.dumps([{k: getattr(spec, k) for k in keys}, *extra], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class EnsembleJudge(Judge):
    """The weighted mean of its members' P(first better) (members that could not answer an item are left out)."""

    def __init__(self, spec: JudgeSpec, inputs: dict, precision: str):
        super().__init__(spec)
        self.members = [build_judge(m, inputs, precision) for m in spec.members or []]
        self.weights = list(spec.weights or [1.0] * len(self.members))
        digest = hashlib.sha256(json.dumps([[m.name for m in self.members], self.weights]).encode()).hexdigest()[:12]
        self.name = f"ensemble:{digest}:{spec_digest(spec)}"

    def first_better(self, prompts, first, second) -> list[float | None]:
        votes = [m.first_better(prompts, first, second) for m in self.members]
        out: list[float | None] = []
        for i in range(len(prompts)):
            got = [(w, v[i]) for w, v in zip(self.weights, votes) if v[i] is not None and w > 0]
            total = sum(w for w, _ in got)
            out.append(sum(w * p for w, p in got) / total if got else None)
        return out

    def check(self) -> None:
        for m in self.members:
            m.check()

    def close(self) -> None:
        for m in self.members:
            m.close()


JudgeFactory = Callable[[JudgeSpec, dict, str], Judge]
_FACTORIES: dict[str, JudgeFactory] = {}


def register_judge(kind: str, factory: JudgeFactory) -> None:
    """Make `kind` buildable: factory(spec, inputs, precision) -> Judge. Tests register rule-based judges."""
    _FACTORIES[kind] = factory


def build_judge(spec: JudgeSpec, inputs: dict | None = None, precision: str = "auto") -> Judge:
    if spec.kind not in _FACTORIES:
        raise ConfigError([f"judge.kind: expected one of {', '.join(_FACTORIES)}, got {spec.kind!r}"])
    return _FACTORIES[spec.kind](spec, inputs or {}, precision)


def _local(spec, inputs, precision):
    from alignment.judge_local import LocalJudge

    return LocalJudge(spec, inputs, precision)


def _reward_model(spec, inputs, precision):
    from alignment.judge_local import RewardModelJudge

    return RewardModelJudge(spec, inputs, precision)


def _openai(spec, inputs, precision):
    from alignment.judge_openai import OpenAIJudge

    return OpenAIJudge(spec)


register_judge("local", _local)
register_judge("openai", _openai)
register_judge("reward_model", _reward_model)
register_judge("ensemble", EnsembleJudge)
