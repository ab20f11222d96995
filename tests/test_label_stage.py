"""Stage `label` end to end on the tiny model: artifact contract, reward/DPO on it, resume after SIGKILL without
re-judging, the verdict cache, a dead endpoint, retries and API-key redaction (stub OpenAI endpoint on loopback;
tests/test_judge_server.py runs the real llama.cpp server)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.judges import Judge, register_judge
from alignment.preferences import load_pairs

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/tiny/label.yaml"


class CountingJudge(Judge):
    """Rule-based (tests only): prefers the shorter response; appends every judged order to $LABEL_TEST_CALLS."""

    def __init__(self, spec, inputs, precision):
        super().__init__(spec)
        self.name = "test-counting:v1"

    def first_better(self, prompts, first, second):
        delay = float(os.environ.get("LABEL_TEST_DELAY", "0"))
        out = []
        for f, s in zip(first, second):
            time.sleep(delay)
            with open(os.environ["LABEL_TEST_CALLS"], "a") as fh:
                fh.write(json.dumps(sorted([f, s])) + "\n")
            out.append(0.8 if len(f) < len(s) else 0.3)
        return out


register_judge("test-counting", CountingJudge)

# The child process registers the counting judge by importing this module, then runs the real CLI.
CHILD = "import sys; sys.path.insert(0, 'tests'); import test_label_stage; from alignment.cli import main; " \
        "sys.exit(main(sys.argv[1:]))"


def counting_args(root: Path, sft: Path, *extra: str) -> list[str]:
    return ["run", "label", "-c", CONFIG, "--artifacts", str(root), f"inputs.sft={sft}", "judge.kind=test-counting",
            "judge.model=null", "prompts.eval=null", "shard_size=2", "judge_batch=1", "gate.data=null", *extra]


def calls(path: Path) -> list[tuple[str, str]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture()
def sft_path(tiny_store) -> Path:
    root, run = tiny_store
    return root / run / "sft"


def test_label_artifact_feeds_reward_and_dpo(tmp_path, sft_path):
    root = tmp_path / "store"
    assert main(["run", "label", "-c", CONFIG, "--artifacts", str(root), f"inputs.sft={sft_path}"]) == 0
    art = root / "tiny" / "label"
    manifest = json.loads((art / "manifest.json").read_text())
    pairs = load_pairs(str(art / "pairs.jsonl"))
    assert manifest["metrics"]["pairs"] == len(pairs) > 0 and load_pairs(str(art / "eval.jsonl"))
    assert all(p["label_source"] == "ai" and 0.5 < p["p_chosen"] <= 1.0 for p in pairs)
    assert all("constraints" in p and "category" in p for p in pairs)  # carried over from the prompt rows
    for key in ("position_bias_rate", "unparseable_rate", "judge_pairs_per_s", "mean_abs_margin"):
        assert key in manifest["metrics"]
    assert manifest["metrics"]["unparseable_rate"] == 0.0  # a logprob judge always yields a label

    reward = ["--artifacts", str(root), f"inputs.sft={sft_path}", f"inputs.base={sft_path.parent / 'base'}",
              "data.from_stage=label", "train.max_steps=4"]
    assert main(["run", "reward", "-c", "configs/tiny/reward.yaml", *reward]) == 0
    rm = json.loads((root / "tiny" / "reward" / "manifest.json").read_text())
    assert rm["inputs"]["label"]["path"] == str(art) and rm["metrics"]["train_pairs"] == len(pairs)
    assert main(["run", "dpo", "-c", "configs/tiny/dpo.yaml", "--artifacts", str(root), f"inputs.sft={sft_path}",
                 "data.from_stage=label", "data.soft_labels=true", "train.max_steps=2"]) == 0
    dpo = json.loads((root / "tiny" / "dpo" / "manifest.json").read_text())
    assert dpo["lineage"]["preferences"]["train"]["path"] == str((art / "pairs.jsonl").resolve())


def test_resume_after_sigkill_neither_resamples_nor_rejudges(tmp_path, sft_path):
    log_file = tmp_path / "calls.jsonl"
    root = tmp_path / "store"
    env = {**os.environ, "LABEL_TEST_CALLS": str(log_file), "LABEL_TEST_DELAY": "0.3", "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1"}
    args = counting_args(root, sft_path, "cache_dir=none")  # no cache: the shards alone must prevent re-judging
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = root / "tiny" / "label.partial"
    deadline = time.time() + 60
    while not (partial / "labels" / "train-00001.jsonl").exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the labeller never finished two shards"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    done = {f.name for f in (partial / "labels").glob("*.jsonl")}
    finished_pairs = {tuple(sorted([r["row"]["chosen"][0]["content"], r["row"]["rejected"][0]["content"]]))
                      for f in (partial / "labels").glob("*.jsonl") for r in map(json.loads, f.read_text().splitlines())
                      if "row" in r}
    samples = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (partial / "samples").glob("*.jsonl")}
    assert len(done) >= 2 and finished_pairs and len(samples) == 4  # 8 prompts in shards of 2, all sampled
    before = len(calls(log_file))

    env["LABEL_TEST_DELAY"] = "0"
    resumed = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = calls(log_file)[before:]
    assert again and not set(again) & finished_pairs  # only unfinished shards went back to the judge
    art = root / "tiny" / "label"
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (art / "samples").glob("*.jsonl")} == samples
    metrics = json.loads((art / "manifest.json").read_text())["metrics"]
    assert metrics["sampled_prompts"] == 0 and metrics["judged"] == len(again) // 2

    # The resumed artifact holds exactly what an uninterrupted run writes.
    os.environ["LABEL_TEST_CALLS"] = str(tmp_path / "straight.jsonl")
    try:
        assert main(counting_args(tmp_path / "straight", sft_path, "cache_dir=none")) == 0
    finally:
        del os.environ["LABEL_TEST_CALLS"]
    straight = (tmp_path / "straight" / "tiny" / "label" / "pairs.jsonl").read_text()
    assert (art / "pairs.jsonl").read_text() == straight and straight.strip()


def test_rerun_hits_the_judge_cache(tmp_path, sft_path, monkeypatch):
    log_file = tmp_path / "calls.jsonl"
    monkeypatch.setenv("LABEL_TEST_CALLS", str(log_file))
    args = counting_args(tmp_path / "store", sft_path)
    assert main(args) == 0
    first = len(calls(log_file))
    m1 = json.loads((tmp_path / "store" / "tiny" / "label" / "manifest.json").read_text())["metrics"]
    assert first == 2 * m1["judged"] > 0 and m1["cache_hits"] == 0
    assert list((tmp_path / "store" / ".cache" / "judge").glob("*.jsonl"))  # beside the runs, not in an artifact
    assert main(args + ["--force"]) == 0  # a fresh partial folder: only the cache can save the judge calls
    m2 = json.loads((tmp_path / "store" / "tiny" / "label" / "manifest.json").read_text())["metrics"]
    assert len(calls(log_file)) == first and m2["judged"] == 0 and m2["cache_hits"] == m1["judged"]
    assert m2["pairs"] == m1["pairs"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_endpoint_fails_in_one_line_naming_the_url(tmp_path, sft_path, capsys):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    rc = main(["run", "label", "-c", CONFIG, "--artifacts", str(tmp_path), f"inputs.sft={sft_path}",
               "judge.kind=openai", "judge.model=judge", f"judge.base_url={url}", "judge.retries=1",
               "judge.backoff_s=0.01", "judge.timeout_s=2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("align: error")]
    assert rc == 2 and len(err) == 1 and url in err[0], err
    assert not list(tmp_path.rglob("samples/*.jsonl"))  # it failed before sampling anything


class StubOpenAI(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible endpoint: answers 429 once, then prefers the shorter response via logprobs."""

    seen_auth: list = []
    posts = 0
    mode = "logprobs"  # or "text" (no logprobs: the reply is parsed), "garbage" (unparseable), "no-logprobs" (400)

    def log_message(self, *args):
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "judge"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen_auth.append(self.headers.get("Authorization"))
        type(self).posts += 1
        if type(self).posts == 1:
            return self._json(429, {"error": {"message": "slow down"}})
        m = re.search(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\n", body["messages"][0]["content"], re.S)
        pa = 0.7 if len(m.group(1)) < len(m.group(2)) else 0.2
        if type(self).mode == "no-logprobs" and body.get("logprobs"):
            return self._json(400, {"error": {"message": "logprobs are not supported"}})
        if type(self).mode != "logprobs":
            text = "I like both." if type(self).mode == "garbage" else f"Response {'A' if pa > 0.5 else 'B'} is better."
            return self._json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        top = [{"token": "A", "logprob": __import__("math").log(pa)},
               {"token": "B", "logprob": __import__("math").log(0.9 - pa)}]
        self._json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"},
                                      "logprobs": {"content": [{"token": "A", "logprob": top[0]["logprob"],
                                                                "top_logprobs": top}]}}]})


def test_openai_judge_retries_and_never_leaks_the_key(tmp_path, sft_path, monkeypatch, capsys, caplog):
    key = "sk-test-DO-NOT-LEAK-8d1f"
    monkeypatch.setenv("ALIGN_TEST_JUDGE_KEY", key)
    StubOpenAI.seen_auth, StubOpenAI.posts, StubOpenAI.mode = [], 0, "logprobs"  # the first POST gets a 429
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc = main(["run", "label", "-c", CONFIG, "--artifacts", str(tmp_path), f"inputs.sft={sft_path}",
                   "judge.kind=openai", "judge.model=judge", f"judge.base_url=http://127.0.0.1:{server.server_port}/v1",
                   "judge.api_key_env=ALIGN_TEST_JUDGE_KEY", "judge.backoff_s=0.01", "judge.concurrency=2"])
    finally:
        server.shutdown()
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert StubOpenAI.posts > 1 and set(StubOpenAI.seen_auth) == {f"Bearer {key}"}  # retried after the 429
    art = tmp_path / "tiny" / "label"
    metrics = json.loads((art / "manifest.json").read_text())["metrics"]
    assert metrics["pairs"] > 0 and metrics["unparseable_rate"] == 0.0
    # The preference for the shorter response survives both orders: every chosen is the shorter one.
    assert all(len(p["chosen"][0]["content"]) <= len(p["rejected"][0]["content"])
               for p in load_pairs(str(art / "pairs.jsonl")))
    leaks = [str(f) for f in tmp_path.rglob("*") if f.is_file() and key.encode() in f.read_bytes()]
    assert not leaks and key not in out.err + out.out + caplog.text
    assert json.loads((art / "manifest.json").read_text())["config"]["judge"]["api_key_env"] == "ALIGN_TEST_JUDGE_KEY"


def test_judge_audit_reports_agreement_bias_and_a_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABEL_TEST_CALLS", str(tmp_path / "calls.jsonl"))
    out, report = tmp_path / "audit.png", tmp_path / "audit.json"
    assert main(["judge", "audit", "-c", CONFIG, "judge.kind=test-counting", "judge.model=null", "--limit", "40",
                 "--out", str(out), "--json", str(report), "--artifacts", str(tmp_path)]) == 0
    got = json.loads(report.read_text())
    pairs = load_pairs("data/prefs/eval.jsonl")[:40]
    lens = [(len(p["chosen"][0]["content"]), len(p["rejected"][0]["content"])) for p in pairs]
    # The shorter-preferring judge: P(chosen) 0.75 when chosen is shorter, 0.25 when longer, and 0.5 with a
    # position-bias disagreement (0.3 for whichever is first) when both have the same length.
    expected = sum(1.0 if c < r else 0.5 if c == r else 0.0 for c, r in lens) / len(lens)
    assert got["pairs"] == 40 and got["agreement"] == pytest.approx(expected, abs=1e-4)
    assert got["position_bias_rate"] == pytest.approx(sum(c == r for c, r in lens) / len(lens), abs=1e-4)
    assert got["unparseable_rate"] == 0.0 and set(got["agreement_by_category"]) == {p["category"] for p in pairs}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "agreement" in capsys.readouterr().out


@pytest.fixture()
def stub_server():
    StubOpenAI.seen_auth, StubOpenAI.posts, StubOpenAI.mode = [], 1, "logprobs"  # posts=1: no 429 first
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_openai_judge_parses_text_and_counts_unparseable(stub_server):
    from alignment.judges import JudgeSpec, build_judge

    spec = dict(kind="openai", base_url=stub_server, model="judge", backoff_s=0.01)
    StubOpenAI.mode = "text"  # no logprobs: "Response A is better." -> P(first better) = 1
    v = build_judge(JudgeSpec(**spec)).compare([[{"role": "user", "content": "hi"}]], ["short"], ["much longer"])[0]
    assert v.p_ab == 1.0 and v.p_ba == 0.0 and v.p_a == 1.0 and v.parsed and not v.disagree
    StubOpenAI.mode = "no-logprobs"  # 400 on logprobs: the judge drops them and parses the text from then on
    judge = build_judge(JudgeSpec(**spec))
    v = judge.compare([[{"role": "user", "content": "hi"}]], ["short"], ["much longer"])[0]
    assert judge.no_logprobs and v.p_a == 1.0 and v.parsed
    StubOpenAI.mode = "garbage"
    v = build_judge(JudgeSpec(**spec)).compare([[{"role": "user", "content": "hi"}]], ["short"], ["much longer"])[0]
    assert not v.parsed and v.p_a == 0.5 and v.unparsed_calls == 2


def test_openai_chain_of_thought_asks_for_a_rationale_then_the_verdict(stub_server):
    from alignment.judges import JudgeSpec, build_judge

    judge = build_judge(JudgeSpec(kind="openai", base_url=stub_server, model="judge", chain_of_thought=True,
                                  clamp=(0.4, 0.6)))
    v = judge.compare([[{"role": "user", "content": "hi"}]], ["short"], ["much longer"])[0]
    assert judge.requests == 4  # two orders x (rationale + verdict)
    # Stub logprobs give 0.7/0.9 for the shorter-first order and 0.2/0.9 flipped: P(a) = (0.778 + 0.778) / 2,
    # clamped to the CAI range 0.6.
    assert v.p_ab == pytest.approx(0.7 / 0.9) and v.p_a == pytest.approx(0.6)


class PreemptingJudge(CountingJudge):
    """Asks for preemption (as Slurm's SIGUSR1 would) once it has judged its first batch."""

    def first_better(self, prompts, first, second):
        from alignment import preemption

        preemption._handler(__import__("signal").SIGUSR1, None)
        return super().first_better(prompts, first, second)


register_judge("test-preempting", PreemptingJudge)


def test_preemption_stops_between_shards_and_the_same_command_resumes(tmp_path, sft_path, monkeypatch):
    from alignment.preemption import REQUEUE_EXIT

    log_file = tmp_path / "calls.jsonl"
    monkeypatch.setenv("LABEL_TEST_CALLS", str(log_file))
    args = counting_args(tmp_path / "store", sft_path, "cache_dir=none")
    preempting = [a if a != "judge.kind=test-counting" else "judge.kind=test-preempting" for a in args]
    assert main(preempting) == REQUEUE_EXIT
    partial = tmp_path / "store" / "tiny" / "label.partial"
    assert [f.name for f in (partial / "labels").glob("*.jsonl")] == ["train-00000.jsonl"]  # stopped after one shard
    first = len(calls(log_file))
    # The judge's name is part of the config, so resume with the same kind (it keeps asking: one shard per run).
    assert main(preempting) == REQUEUE_EXIT
    assert sorted(f.name for f in (partial / "labels").glob("*.jsonl")) == ["train-00000.jsonl", "train-00001.jsonl"]
    assert len(calls(log_file)) == 2 * first  # the finished shard was not judged again


class FirstShownJudge(Judge):
    """Rule-based (tests only): always prefers whichever response is shown first (the 135M judge's failure)."""

    def __init__(self, spec, inputs, precision):
        super().__init__(spec)
        self.name = "test-first:v1"

    def first_better(self, prompts, first, second):
        return [0.9] * len(first)


class GoldJudge(Judge):
    """Rule-based (tests only): prefers the response meeting more of the prompt's verifiable constraints, then the
    shorter one."""

    def __init__(self, spec, inputs, precision):
        super().__init__(spec)
        self.name = "test-gold:v1"

    def first_better(self, prompts, first, second):
        from alignment.reward_sources import gold_reward

        a, b = gold_reward(prompts, first), gold_reward(prompts, second)
        # Equal gold (the tiny model's samples all miss): the shorter one, so the labels still carry a preference.
        return [0.9 if x > y else 0.1 if x < y else 0.7 if len(f) < len(s) else 0.3 if len(f) > len(s) else 0.5
                for x, y, f, s in zip(a, b, first, second)]


register_judge("test-first", FirstShownJudge)
register_judge("test-gold", GoldJudge)
GATED = ["gate.max_pairs=12", "gate.min_agreement=0.6", "gate.max_position_bias=0.3", "prompts.eval=null",
         "prompts.max_prompts=4", "judge.model=null"]


def test_judge_gate_fails_a_position_biased_judge_before_sampling(tmp_path, sft_path, capsys):
    rc = main(["run", "label", "-c", CONFIG, "--artifacts", str(tmp_path), f"inputs.sft={sft_path}",
               "judge.kind=test-first", *GATED])
    err = capsys.readouterr().err
    assert rc == 2 and "quality gate failed" in err and "max_position_bias 0.3" in err and "min_agreement 0.6" in err
    art = tmp_path / "tiny" / "label"
    manifest = json.loads((art / "manifest.json").read_text())
    m = manifest["metrics"]
    # Human-chosen first on even rows, second on odd: a first-shown judge agrees on half, both orders disagree always.
    assert manifest["status"] == "failed_gate" and m["gate_passed"] is False and m["gate_pairs"] == 12
    assert m["gate_agreement"] == 0.5 and m["gate_position_bias_rate"] == 1.0
    assert not (art / "pairs.jsonl").exists() and not (art / "samples").exists()  # nothing sampled or labelled
    assert json.loads((art / "gate_audit.json").read_text())["agreement"] == 0.5
    # A re-run finds the artifact up to date and still fails (a pipeline cannot step over it).
    assert main(["run", "label", "-c", CONFIG, "--artifacts", str(tmp_path), f"inputs.sft={sft_path}",
                 "judge.kind=test-first", *GATED]) == 2


def test_judge_gate_passes_a_judge_that_agrees_with_humans(tmp_path, sft_path):
    assert main(["run", "label", "-c", CONFIG, "--artifacts", str(tmp_path), f"inputs.sft={sft_path}",
                 "judge.kind=test-gold", *GATED]) == 0
    art = tmp_path / "tiny" / "label"
    manifest = json.loads((art / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["status"] == "complete" and m["gate_passed"] is True
    assert m["gate_agreement"] == 1.0 and m["gate_position_bias_rate"] == 0.0
    assert (art / "pairs.jsonl").is_file()
