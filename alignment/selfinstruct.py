"""Self-Instruct (Wang et al., 2023): a model writes new instructions from seed tasks; filters keep the good ones.

One round of the loop, per request:
1. **propose**: the generator sees `examples_per_prompt` seed tasks (plus up to `machine_examples` already
   accepted ones, as the paper mixes 6 human + 2 machine tasks) and writes one new task;
2. **constrain**: where the task family has verifiable constraints (the seeds' `constraints`, checked by
   `alignment.gold`), the new task gets the constraints of a randomly drawn seed, phrased by `PHRASES`;
3. **answer**: the generator answers the constrained task;
4. **filter**, cheapest first and before the answer is paid for where possible: `parse` (a task came back),
   `instruction_length`, `novelty` (ROUGE-L F1 against every task in the pool below `rouge_l`, 0.7 as in the
   paper), then `response_length`, `refusal` (an apology or "as an AI ..." instead of an answer) and `gold`
   (the answer meets every attached constraint).

Accepted rows join the pool (later proposals must differ from them too) and are written in the SFT contract
(`messages` + `constraints` + `category`) with their provenance: the generator, the prompt template's digest,
the seed tasks shown and the filters passed.

Generators: `local` (a causal LM in-process, through `alignment.generation.generate`) and `openai` (any
OpenAI-compatible chat-completions endpoint, through the judges' HTTP client in `alignment.judge_openai`:
the same retries, backoff, timeouts and API-key handling).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from alignment import gold
from alignment.config import Section
from alignment.generation import GenerationSpec

FILTERS = ("parse", "instruction_length", "novelty", "response_length", "refusal", "gold")
"""In the order they run; a candidate stops at the first filter it fails."""

DEFAULT_TEMPLATE = (
    "Here are some example tasks a user gave to an assistant:\n{examples}\n\n"
    "Write one new task that is different from all of them: another topic and another kind of request. "
    "Reply with the task only, in one or two sentences, without answering it.")
"""The instruction-proposal prompt; `{examples}` becomes a numbered list of example tasks."""

# One phrasing per constraint type of alignment.gold; types without a phrasing are not attached.
PHRASES = {
    "max_words": "Answer in at most {n} words.",
    "min_words": "Use at least {n} words.",
    "max_sentences": "Use at most {n} sentences.",
    "min_sentences": "Use at least {n} sentences.",
    "paragraphs": "Write exactly {n} paragraphs, separated by a blank line.",
    "keyword": "Include the word '{word}' in your answer.",
    "forbidden_words": "Do not use the words {words}.",
    "keyword_frequency": "Use the word '{word}' at least {n} times.",
    "letter_frequency": "The letter '{letter}' must appear {relation} {n} times.",
    "bullets": "Answer with exactly {n} bullet points, each line starting with '- '.",
    "lowercase": "Write only in lowercase letters.",
    "uppercase": "Write your whole answer in capital letters.",
    "no_commas": "Do not use any commas.",
    "start_with": 'Start your response with the exact phrase "{phrase}"',
    "quotation": "Wrap your whole response in double quotation marks.",
    "title": "Give your answer a title in double angle brackets, like <<title>>.",
    "highlights": "Highlight at least {n} sections with asterisks, like *this*.",
    "json_format": "Answer in JSON format.",
    "postscript": "End with a postscript starting with {marker}",
    "placeholders": "Include at least {n} placeholders in square brackets, like [name].",
    "end_with": 'End your response with the exact phrase "{phrase}"',
}
REFUSALS = re.compile(r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i cannot|i can'?t (help|assist|do)|i am unable|"
                      r"i'?m unable|as an ai|as a language model|i'?m not able to|i am not able to)\b", re.IGNORECASE)
_TOKEN = re.compile(r"[a-z0-9]+")
_LEADER = re.compile(r"^\s*(?:task\s*\d*\s*[:.)-]|\d+\s*[.):-]|[-*]\s+|new task\s*:)\s*", re.IGNORECASE)


class GeneratorSpec(Section):
    """Which model writes the tasks and answers (the `generator:` section)."""

    kind: Literal["local", "openai"] = "local"
    """local: a causal LM in-process (`model`: the run's 'base' or 'sft' artifact); openai: an endpoint."""
    model: str = "base"
    """local: 'base' or 'sft' (that artifact of the run, or inputs.<stage>); openai: the served model name."""
    base_url: str | None = None
    """openai: e.g. http://127.0.0.1:8080/v1 (the /chat/completions path is appended)."""
    api_key_env: str | None = None
    """openai: NAME of the environment variable holding the API key; the key itself is never stored or logged."""
    timeout_s: float = 120.0
    retries: int = 4
    backoff_s: float = 0.5
    concurrency: int = 4
    """openai: requests in flight at once."""
    generation: GenerationSpec = GenerationSpec(do_sample=True, temperature=0.7, top_p=0.95, batch_size=16)
    """Sampling (temperature 0.7 as in Self-Instruct); max_new_tokens is set per call (instruction/response)."""

    def problems(self, prefix: str = "generator") -> list[tuple[str, str]]:
        out = self.generation.problems(f"{prefix}.generation")
        if self.kind == "local" and self.model not in ("base", "sft"):
            out.append((f"{prefix}.model", f"a local generator is the run's 'base' or 'sft' artifact, got {self.model!r}"))
        if self.kind == "openai" and not self.base_url:
            out.append((f"{prefix}.base_url", "kind 'openai' needs base_url (and model: the served name)"))
        if self.generation.num_return_sequences != 1:
            out.append((f"{prefix}.generation.num_return_sequences", "one task per request; raise `requests` instead"))
        if self.retries < 0 or self.concurrency < 1 or self.timeout_s <= 0:
            out.append((prefix, "retries >= 0, concurrency >= 1 and timeout_s > 0 expected"))
        return out


class FilterSpec(Section):
    """What a generated row must pass to be kept (`filters:`)."""

    rouge_l: float = 0.7
    """Drop a task whose ROUGE-L F1 with any task already in the pool is at least this (Self-Instruct: 0.7)."""
    min_instruction_words: int = 3
    max_instruction_words: int = 80
    min_response_words: int = 1
    max_response_words: int = 400
    refusals: bool = True
    """Drop answers that apologise or refuse instead of answering."""
    gold: bool = True
    """Drop answers that break one of the task's verifiable constraints (alignment.gold)."""

    def problems(self, prefix: str = "filters") -> list[tuple[str, str]]:
        out = []
        if not 0 < self.rouge_l <= 1:
            out.append((f"{prefix}.rouge_l", "expected a threshold in (0, 1]"))
        for lo, hi in (("min_instruction_words", "max_instruction_words"), ("min_response_words", "max_response_words")):
            if not 0 <= getattr(self, lo) <= getattr(self, hi):
                out.append((f"{prefix}.{lo}", f"expected 0 <= {lo} <= {hi}"))
        return out


# -- ROUGE-L ------------------------------------------------------------------------------------------------
def tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens (rouge_score's default tokenizer without stemming)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one DP row, O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists: 2 * LCS / (len(a) + len(b))."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class Pool:
    """The tasks a new one must differ from, with a cheap upper bound that skips most LCS computations."""

    def __init__(self):
        self.items: list[tuple[list[str], Counter]] = []

    def add(self, text: str) -> None:
        toks = tokens(text)
        self.items.append((toks, Counter(toks)))

    def max_rouge(self, text: str, stop_at: float = 1.01) -> float:
        """Highest ROUGE-L F1 of `text` against the pool (stops early once `stop_at` is reached)."""
        toks = tokens(text)
        bag, best = Counter(toks), 0.0
        for other, other_bag in self.items:
            denom = len(toks) + len(other)
            # The LCS is at most the bag-of-words overlap: if even that cannot beat `best`, skip the DP.
            if not denom or 2 * sum((bag & other_bag).values()) / denom <= best:
                continue
            best = max(best, rouge_l(toks, other))
            if best >= stop_at:
                break
        return best


# -- prompts ------------------------------------------------------------------------------------------------
@dataclass
class Seed:
    id: str
    task: str
    """The user's request (the last user turn)."""
    constraints: list[dict] = field(default_factory=list)


def seed_from_row(row: dict, rowno: int) -> Seed | None:
    """A seed task from an SFT row (messages or prompt/completion); None when it has no user turn."""
    msgs = row.get("messages") or ([{"role": "user", "content": row["prompt"]}] if isinstance(row.get("prompt"), str)
                                   else row.get("prompt") or [])
    users = [m.get("content", "") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not str(users[-1]).strip():
        return None
    cons = row.get("constraints") or []
    # A seed whose constraints cannot all be phrased gives none: half a family would be a different task.
    ok = all(isinstance(c, dict) and c.get("type") in PHRASES for c in cons)
    return Seed(id=str(row.get("id", rowno)), task=str(users[-1]).strip(), constraints=list(cons) if ok else [])


def template_digest(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:12]


def proposal_prompt(template: str, examples: list[str]) -> list[dict]:
    listed = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, start=1))
    return [{"role": "user", "content": template.replace("{examples}", listed)}]


def clean_instruction(text: str) -> str:
    """The first non-empty line of the reply, without a leading 'Task 4:' / '5.' / '- ' and quotes."""
    for line in text.splitlines():
        line = _LEADER.sub("", line).strip().strip('"“”').strip()
        if line:
            return line
    return ""


def _param(value) -> str:
    return ", ".join(f"'{v}'" for v in value) if isinstance(value, list) else str(value)


def render_constraints(constraints: list[dict]) -> str:
    # end_with last: its phrase must be the final words, so no other instruction follows it.
    ordered = sorted(constraints, key=lambda c: c["type"] == "end_with")
    return " ".join(PHRASES[c["type"]].format(**{k: _param(v) for k, v in c.items() if k != "type"})
                    for c in ordered)


def with_constraints(instruction: str, constraints: list[dict]) -> str:
    if not constraints:
        return instruction
    sep = "" if instruction.endswith((".", "?", "!")) else "."
    return f"{instruction}{sep} {render_constraints(constraints)}"


def pick_examples(rng: random.Random, seeds: list[Seed], accepted: list[tuple[str, str]], n_seed: int,
                  n_machine: int) -> list[tuple[str, str]]:
    """(id, task) of the examples shown: seed tasks plus a few accepted machine tasks, shuffled."""
    shown = [(s.id, s.task) for s in rng.sample(seeds, min(n_seed, len(seeds)))]
    shown += rng.sample(accepted, min(n_machine, len(accepted)))
    rng.shuffle(shown)
    return shown


# -- filters ------------------------------------------------------------------------------------------------
def instruction_verdict(instruction: str, pool: Pool, spec: FilterSpec) -> tuple[str | None, float]:
    """(the first instruction filter it fails or None, its highest ROUGE-L against the pool)."""
    if not instruction:
        return "parse", 0.0
    if not spec.min_instruction_words <= gold.count_words(instruction) <= spec.max_instruction_words:
        return "instruction_length", 0.0
    score = pool.max_rouge(instruction, stop_at=spec.rouge_l)
    return ("novelty" if score >= spec.rouge_l else None), round(score, 4)


def response_verdict(response: str, constraints: list[dict], spec: FilterSpec) -> str | None:
    """The first response filter the answer fails, or None when it is kept."""
    if not spec.min_response_words <= gold.count_words(response) <= spec.max_response_words:
        return "response_length"
    if spec.refusals and REFUSALS.search(response):
        return "refusal"
    if spec.gold and constraints and not gold.passes(response, constraints):
        return "gold"
    return None


def acceptance(records: list[dict]) -> dict:
    """Per filter: candidates that reached it, passed it, and the rate (the manifest's `filters`)."""
    out, alive = {}, len(records)
    for name in FILTERS:
        failed = sum(r["dropped"] == name for r in records)
        out[name] = {"entered": alive, "passed": alive - failed,
                     "rate": round((alive - failed) / alive, 4) if alive else None}
        alive -= failed
    return out


def diversity(instructions: list[str]) -> dict:
    """Distinct first-bigram ratio (no parser offline for Self-Instruct's verb-noun pairs) and distinct-2."""
    firsts = [tuple(tokens(t)[:2]) for t in instructions if len(tokens(t)) >= 2]
    bigrams = [tuple(tk[i:i + 2]) for t in instructions for tk in [tokens(t)] for i in range(len(tk) - 1)]
    return {
        "instructions": len(instructions),
        "distinct_first_bigrams": len(set(firsts)),
        "distinct_first_bigram_ratio": round(len(set(firsts)) / len(firsts), 4) if firsts else None,
        "distinct_2": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else None,
        "top_first_bigrams": [[" ".join(k), v] for k, v in Counter(firsts).most_common(10)],
    }


def sft_row(index: int, cand: dict, provenance: dict) -> dict:
    """An accepted candidate in the SFT contract, with its provenance."""
    cons = cand["constraints"]
    return {"id": f"gen-{index:05d}", "category": cons[0]["type"] if cons else "open",
            "messages": [{"role": "user", "content": cand["prompt"]},
                         {"role": "assistant", "content": cand["response"]}],
            "constraints": cons,
            "provenance": {**provenance, "seed_ids": cand["seed_ids"], "filters_passed": list(FILTERS),
                           "rouge_l_max": cand["rouge_l_max"]}}


# -- generators ---------------------------------------------------------------------------------------------
class LocalGenerator:
    """A causal LM in-process; every call goes through `alignment.generation.generate`."""

    def __init__(self, model, tok, spec: GenerationSpec, name: str):
        self.model, self.tok, self.spec, self.name = model, tok, spec, name

    def check(self) -> None:
        pass

    def chat(self, prompts: list[list[dict]], *, max_new_tokens: int, seed: int) -> list[str]:
        from alignment.generation import generate

        if not prompts:
            return []
        return generate(self.model, self.tok, prompts, self.spec, seed=seed, max_new_tokens=max_new_tokens).texts

    def close(self) -> None:
        self.model = None


class OpenAIGenerator:
    """An OpenAI-compatible chat-completions endpoint, through the judges' HTTP client (retries, key handling)."""

    def __init__(self, spec: GeneratorSpec):
        from alignment.judge_openai import OpenAIJudge
        from alignment.judges import JudgeSpec

        self.spec = spec
        self.client = OpenAIJudge(JudgeSpec(kind="openai", base_url=spec.base_url, model=spec.model,
                                            api_key_env=spec.api_key_env, timeout_s=spec.timeout_s,
                                            retries=spec.retries, backoff_s=spec.backoff_s,
                                            concurrency=spec.concurrency))
        self.name = f"openai:{spec.base_url.rstrip('/')}:{spec.model}"

    def check(self) -> None:
        self.client.check()

    def _one(self, messages: list[dict], max_tokens: int, seed: int) -> str:
        g = self.spec.generation
        body = {"model": self.spec.model, "messages": messages, "max_tokens": max_tokens, "seed": seed,
                "temperature": g.temperature if g.do_sample else 0.0, "top_p": g.top_p if g.do_sample else 1.0}
        reply = self.client._post(body)  # the judge client's one HTTP call: retries, backoff, key scrubbing
        try:
            return (reply["choices"][0]["message"].get("content") or "").strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            return ""

    def chat(self, prompts: list[list[dict]], *, max_new_tokens: int, seed: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            # A distinct seed per request: the same prompt twice should not give the same task twice.
            return list(pool.map(self._one, prompts, [max_new_tokens] * len(prompts),
                                 [seed + i for i in range(len(prompts))]))

    def close(self) -> None:
        pass


# -- one shard ----------------------------------------------------------------------------------------------
def run_shard(generator, requests: list[dict], pool: Pool, filters: FilterSpec, *, instruction_tokens: int,
              response_tokens: int, seed: int) -> list[dict]:
    """Propose, constrain, answer and filter one shard of requests; returns one record per candidate.

    `requests` hold the prepared `messages` (proposal prompt), `seed_ids` and `constraints`. The pool grows
    with every instruction that passes the instruction filters, so two near-identical proposals in one shard
    do not both survive.
    """
    replies = generator.chat([r["messages"] for r in requests], max_new_tokens=instruction_tokens, seed=seed)
    records, todo = [], []
    for req, reply in zip(requests, replies):
        instruction = clean_instruction(reply)
        dropped, score = instruction_verdict(instruction, pool, filters)
        rec = {"request": req["index"], "instruction": instruction, "constraints": req["constraints"],
               "seed_ids": req["seed_ids"], "rouge_l_max": score, "dropped": dropped,
               "prompt": with_constraints(instruction, req["constraints"]), "response": None}
        records.append(rec)
        if dropped is None:
            pool.add(instruction)
            todo.append(rec)
    answers = generator.chat([[{"role": "user", "content": r["prompt"]}] for r in todo],
                             max_new_tokens=response_tokens, seed=seed + 1)
    for rec, answer in zip(todo, answers):
        rec["response"] = answer.strip()
        rec["dropped"] = response_verdict(rec["response"], rec["constraints"], filters)
    return records


def prepare_requests(rng: random.Random, seeds: list[Seed], accepted: list[tuple[str, str]], start: int, stop: int, *,
                     template: str, n_seed: int, n_machine: int, constraint_rate: float) -> list[dict]:
    """The shard's proposal prompts and the constraints each new task will carry."""
    constrained = [s for s in seeds if s.constraints]
    out = []
    for i in range(start, stop):
        examples = pick_examples(rng, seeds, accepted, n_seed, n_machine)
        donor = rng.choice(constrained) if constrained and rng.random() < constraint_rate else None
        out.append({"index": i, "messages": proposal_prompt(template, [task for _, task in examples]),
                    "constraints": [dict(c) for c in donor.constraints] if donor else [],
                    "seed_ids": [sid for sid, _ in examples]})
    return out
