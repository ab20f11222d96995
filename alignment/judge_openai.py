"""The `openai` judge: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, TGI, OpenAI).

Plain HTTP (stdlib urllib, no client library): POST {base_url}/chat/completions with `max_tokens: 1`,
`logprobs: true, top_logprobs: N`, temperature 0. The soft label comes from the two label tokens'
log-probabilities among the returned top candidates; when the server gives none, the reply text is parsed.
Requests run `concurrency` at a time; 429/5xx and connection errors are retried with exponential backoff,
and an endpoint that stays down raises one line naming the URL. The API key is read from the environment
variable the config names, at request time, and never stored in the judge, its name, logs or errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from alignment.judges import Judge, JudgeError, JudgeSpec, Template, parse_choice, spec_digest, two_way

log = logging.getLogger("align")
RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)
VOLATILE = ("created", "permission")
"""/models fields that change per request (vLLM and llama.cpp stamp `created` with the request time, vLLM's
permission ids are random): left out of the server's identity."""


def server_identity(body: bytes) -> str:
    """A digest of what GET /models says is served (ids, owners, llama.cpp's meta: size, parameters, context):
    another model behind the same URL gets another cache key, so old verdicts are not replayed for it."""
    try:
        models = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return "unknown"
    if not isinstance(models, list):
        return "unknown"
    entries = sorted(json.dumps({k: v for k, v in m.items() if k not in VOLATILE}, sort_keys=True)
                     for m in models if isinstance(m, dict))
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def _without_userinfo(url: str) -> str:
    """http://user:key@host/v1 -> http://host/v1: credentials are not an identity, and must not reach manifests."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", url)


class OpenAIJudge(Judge):
    def __init__(self, spec: JudgeSpec):
        super().__init__(spec)
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        self.template = Template(spec)
        if spec.api_key_env and not os.environ.get(spec.api_key_env):
            raise JudgeError(f"judge.api_key_env: environment variable {spec.api_key_env} is not set "
                             f"(the API key for {self.url})")
        self._base_name = (f"openai:{_without_userinfo(spec.base_url.rstrip('/'))}:{spec.model}:"
                           f"{self.template.digest()}:{spec_digest(spec)}")
        # The cache key: `check()` adds what the server reports it serves (until then: not yet asked).
        self.name = f"{self._base_name}:server-unchecked"
        self.requests = 0
        self.no_logprobs = False

    # -- one HTTP call ------------------------------------------------------------------------------
    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.spec.api_key_env:
            h["Authorization"] = "Bearer " + os.environ.get(self.spec.api_key_env, "")
        return h

    def _scrub(self, text: str) -> str:
        """An error body may echo the request; never let the key through."""
        key = os.environ.get(self.spec.api_key_env or "", "")
        return text.replace(key, "***") if key else text

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.spec.retries + 1):
            if attempt:
                time.sleep(self.spec.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.spec.timeout_s) as resp:
                    self.requests += 1
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                detail = self._scrub(e.read().decode(errors="replace")[:200]).replace("\n", " ")
                last = f"HTTP {e.code}: {detail}"
                if e.code not in RETRY_STATUS:
                    err = JudgeError(f"judge endpoint {self.url} refused the request ({last})")
                    err.status = e.code
                    raise err from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"unreachable: {reason}"
            except ValueError as e:
                raise JudgeError(f"judge endpoint {self.url} returned invalid JSON ({e})") from None
            log.debug("judge request to %s failed (%s); attempt %d of %d", self.url, last, attempt + 1,
                      self.spec.retries + 1)
        raise JudgeError(f"judge endpoint {self.url} failed after {self.spec.retries + 1} attempts ({last}); "
                         "is the server running and judge.base_url right?")

    def check(self) -> None:
        """GET {base_url}/models: any HTTP answer means the server is up; connection errors are retried, then fatal."""
        url = self.spec.base_url.rstrip("/") + "/models"
        last = ""
        for attempt in range(self.spec.retries + 1):
            if attempt:
                time.sleep(self.spec.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=self._headers()),
                                            timeout=self.spec.timeout_s) as resp:
                    self.name = f"{self._base_name}:server-{server_identity(resp.read(1 << 20))}"
                    return
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS:
                    self.name = f"{self._base_name}:server-unknown"
                    return  # it answered (401/404 are the request's problem, reported on the first verdict)
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"unreachable: {getattr(e, 'reason', e)}"
        raise JudgeError(f"judge endpoint {self.spec.base_url} is not answering ({last}) after "
                         f"{self.spec.retries + 1} attempts; is the server running and judge.base_url right?")

    def _chat(self, messages: list[dict], max_tokens: int, logprobs: bool) -> dict:
        body = {"model": self.spec.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        if logprobs and not self.no_logprobs:
            try:
                return self._post({**body, "logprobs": True, "top_logprobs": self.spec.top_logprobs})
            except JudgeError as e:
                if getattr(e, "status", None) not in (400, 422):
                    raise
                # Some servers/models reject log-probabilities: from now on parse the reply text instead.
                log.warning("judge endpoint %s refused logprobs (%s); parsing the reply text instead", self.url, e)
                self.no_logprobs = True
                body["max_tokens"] = max(max_tokens, 8)
        return self._post(body)

    # -- one verdict --------------------------------------------------------------------------------
    def _one(self, prompt: list[dict], first: str, second: str) -> float | None:
        messages = self.template.messages(prompt, first, second)
        if self.spec.chain_of_thought:
            reply = self._chat(messages, self.spec.cot_max_tokens, logprobs=False)
            rationale = _content(reply)
            messages = self.template.verdict_messages(prompt, first, second, rationale)
        reply = self._chat(messages, self.spec.max_tokens, logprobs=True)
        p = label_probability(reply, self.spec.labels)
        if p is not None:
            return p
        choice = parse_choice(_content(reply), self.spec.labels)
        return None if choice is None else 1.0 - choice

    def first_better(self, prompts, first, second) -> list[float | None]:
        with ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            return list(pool.map(self._one, prompts, first, second))


def _content(reply: dict) -> str:
    try:
        return reply["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""


def top_candidates(reply: dict) -> dict[str, float]:
    """{token: logprob} of the first generated token's top candidates (OpenAI chat or legacy layout)."""
    try:
        lp = reply["choices"][0].get("logprobs") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return {}
    if lp.get("content"):  # chat-completions layout
        first = lp["content"][0]
        cands = {c["token"]: c["logprob"] for c in first.get("top_logprobs") or []}
        cands.setdefault(first.get("token", ""), first.get("logprob", -math.inf))
        return cands
    if lp.get("top_logprobs"):  # legacy completions layout: [{token: logprob}, ...]
        return dict(lp["top_logprobs"][0])
    return {}


def label_probability(reply: dict, labels: tuple[str, str]) -> float | None:
    """P(first label) over the two labels, from the top candidates; None when neither label is among them.

    Spellings with surrounding spaces count for the label ("A", " A"). A label missing from the top
    list is given the lowest listed log-probability: an upper bound, so the soft label is never overconfident.
    """
    cands = top_candidates(reply)
    mass = [0.0, 0.0]
    for tok, lp in cands.items():
        t = tok.strip()
        for i, lab in enumerate(labels):
            if t == lab and lp is not None and lp > -math.inf:
                mass[i] += math.exp(lp)
    if not any(mass):
        return None
    floor = min((v for v in cands.values() if v is not None and v > -math.inf), default=-30.0)
    lp = [math.log(m) if m > 0 else floor for m in mass]
    return two_way(lp[0], lp[1])
