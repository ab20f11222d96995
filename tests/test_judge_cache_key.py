"""The openai judge's cache identity includes what the server says it serves (GET /models): another model
behind the same URL must not replay the old model's cached verdicts; per-request fields do not count."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignment.judge_openai import OpenAIJudge
from alignment.judges import JudgeSpec
from alignment.labeling import JudgeCache


@pytest.fixture
def models_server():
    """A server whose /v1/models answer the test sets (`state["models"]`)."""
    state = {"models": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = json.dumps({"object": "list", "data": state["models"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()


def _name(url: str) -> str:
    judge = OpenAIJudge(JudgeSpec(kind="openai", model="judge", base_url=url, retries=0, timeout_s=5))
    judge.check()
    return judge.name


def test_another_model_behind_the_same_url_gets_another_cache(models_server, tmp_path):
    url, state = models_server
    state["models"] = [{"id": "judge", "object": "model", "created": 1, "owned_by": "llamacpp",
                        "meta": {"n_params": 135_000_000, "size": 270_000_000}}]
    first = _name(url)
    state["models"][0]["created"] = 2  # stamped per request by vLLM and llama.cpp: not an identity
    assert _name(url) == first
    state["models"][0]["meta"] = {"n_params": 1_700_000_000, "size": 3_400_000_000}  # a different model, same id
    second = _name(url)
    assert second != first
    assert JudgeCache(tmp_path, first).path != JudgeCache(tmp_path, second).path


def test_credentials_in_the_url_are_not_part_of_the_name(models_server):
    url, state = models_server
    with_creds = url.replace("http://", "http://user:pa55word@")
    judge = OpenAIJudge(JudgeSpec(kind="openai", model="judge", base_url=with_creds, retries=0, timeout_s=5))
    assert "pa55word" not in judge.name and "user@" not in judge.name
