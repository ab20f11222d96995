"""The one way to generate: prompts -> chat template -> left-padded batch -> GenerationConfig -> `Rollout`.

Every stage that samples from a model (eval, label, dpo's sampled KL, the local judge, PPO, online DPO)
calls `generate` here, so padding, EOS and sampling rules are the same everywhere:

- prompts are chat-templated and tokenized without touching the tokenizer's state (no `padding_side` flip);
- the batch is left-padded (generation appends on the right), so every row's response starts at one column;
- sampling uses a fresh `GenerationConfig` (the model's own may carry top_k/top_p/repetition penalties that
  would sample from another distribution than the one the trainer's log-probs describe);
- responses are cut after the first EOS with `alignment.rl.response_mask_after_eos` (1 up to and including
  EOS, 0 after); a row without EOS hit `max_new_tokens` (finish reason "length", as in the OpenAI API).

Backends: `hf` (transformers `generate`, this module) and `vllm` (`alignment.generation_vllm`). Both return the
same `Rollout`; trainers recompute log-probs with their own forward, so the backend never changes the math.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from alignment.config import Section

Prompt = list[dict]  # chat messages: [{"role": "user", "content": "..."}]


class GenerationSpec(Section):
    """How to sample; the `generation:` section of every stage that generates."""

    backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers `generate` in-process; vllm: a vLLM engine (alignment/generation_vllm.py)."""
    max_new_tokens: int = 128
    do_sample: bool = False
    """False: greedy (deterministic, the usual for comparisons); True: sample with temperature/top_p/top_k."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    num_return_sequences: int = 1
    """Responses per prompt; rows of the Rollout are prompt-major (prompt i -> rows i*k .. i*k+k-1)."""
    batch_size: int = 64
    """Prompts per `generate` call; on CPU batch size is the big lever (bf16 HF: 212 tok/s at 8, 470 at 64)."""
    max_prompt_length: int | None = None
    """Prompts longer than this many tokens keep their last tokens (the generation prompt survives)."""

    def problems(self, prefix: str = "generation") -> list[tuple[str, str]]:
        out = []
        for key in ("max_new_tokens", "num_return_sequences", "batch_size"):
            if getattr(self, key) < 1:
                out.append((f"{prefix}.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if self.do_sample and self.temperature <= 0:
            out.append((f"{prefix}.temperature", "must be > 0 when do_sample is true (use do_sample: false for greedy)"))
        if not 0 < self.top_p <= 1:
            out.append((f"{prefix}.top_p", f"must be in (0, 1], got {self.top_p}"))
        if self.top_k < 0:
            out.append((f"{prefix}.top_k", f"must be >= 0, got {self.top_k}"))
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            out.append((f"{prefix}.max_prompt_length", f"must be >= 1, got {self.max_prompt_length}"))
        return out


@dataclass
class Rollout:
    """Prompt-major generated responses, as tensors (for trainers) and text (for judges and metrics)."""

    prompts: list[Prompt]
    """One entry per row (a prompt repeated k times when num_return_sequences = k)."""
    query_ids: Any
    """[B, Lq] left-padded prompt tokens."""
    query_mask: Any
    response_ids: Any
    """[B, Lr] response tokens, pad after the first EOS."""
    response_mask: Any
    """[B, Lr] 1 up to and including the first EOS, 0 after."""
    has_eos: Any
    """[B] bool: the response ended by itself."""
    texts: list[str]
    """Decoded responses, special tokens removed, stripped."""
    finish_reasons: list[str] = field(default_factory=list)
    """"stop" (EOS) or "length" (hit max_new_tokens)."""
    # filled in by whoever scores the rollout (PPO)
    raw_scores: Any = None
    scores: Any = None

    @property
    def completions(self) -> list[str]:
        return self.texts

    @property
    def lengths(self) -> list[int]:
        """Response tokens per row, EOS included."""
        return self.response_mask.sum(dim=1).tolist()

    def grouped(self, k: int) -> list[list[str]]:
        """Texts as one list of k responses per prompt."""
        return [self.texts[i:i + k] for i in range(0, len(self.texts), k)]


def encode_prompts(tok, prompts: Sequence[Prompt], *, max_prompt_length: int | None = None, device=None):
    """(ids, mask) of chat-templated prompts, left-padded; the tokenizer is not modified."""
    import torch

    rows = []
    for p in prompts:
        ids = list(tok.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
        rows.append(ids[-max_prompt_length:] if max_prompt_length else ids)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def generation_config(tok, spec: GenerationSpec, *, max_new_tokens: int | None = None, greedy: bool | None = None):
    """A fresh GenerationConfig for `spec` (never the model's own defaults)."""
    from transformers import GenerationConfig

    sample = spec.do_sample if greedy is None else not greedy
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    extra = dict(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k) if sample else {}
    return GenerationConfig(do_sample=sample, max_new_tokens=max_new_tokens or spec.max_new_tokens,
                            pad_token_id=pad, eos_token_id=tok.eos_token_id, use_cache=True, **extra)


def cut_at_eos(tok, response_ids):
    """(response_ids with pad after the first EOS, mask, has_eos, texts, finish reasons)."""
    from alignment import rl

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mask, has_eos = rl.response_mask_after_eos(response_ids, tok.eos_token_id)
    response_ids = response_ids.masked_fill(mask == 0, pad)
    visible = response_ids.masked_fill(response_ids == tok.eos_token_id, pad)
    texts = [t.strip() for t in tok.batch_decode(visible, skip_special_tokens=True)]
    reasons = ["stop" if e else "length" for e in has_eos.tolist()]
    return response_ids, mask, has_eos, texts, reasons


def _pad_to(t, width: int, value: int, *, left: bool):
    import torch.nn.functional as F

    gap = width - t.shape[1]
    return t if gap == 0 else F.pad(t, (gap, 0) if left else (0, gap), value=value)


def concat_rollouts(parts: list[Rollout], tok) -> Rollout:
    """One Rollout from batches of different widths (queries re-left-padded, responses right-padded)."""
    import torch

    if len(parts) == 1:
        return parts[0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    wq = max(p.query_ids.shape[1] for p in parts)
    wr = max(p.response_ids.shape[1] for p in parts)
    cat = lambda name, w, v, left: torch.cat([_pad_to(getattr(p, name), w, v, left=left) for p in parts])  # noqa: E731
    return Rollout(
        prompts=[x for p in parts for x in p.prompts],
        query_ids=cat("query_ids", wq, pad, True), query_mask=cat("query_mask", wq, 0, True),
        response_ids=cat("response_ids", wr, pad, False), response_mask=cat("response_mask", wr, 0, False),
        has_eos=torch.cat([p.has_eos for p in parts]), texts=[x for p in parts for x in p.texts],
        finish_reasons=[x for p in parts for x in p.finish_reasons])


def generate(model, tok, prompts: Sequence[Prompt], spec: GenerationSpec, *, seed: int | None = None,
             max_new_tokens: int | None = None, greedy: bool | None = None, desc: str | None = None,
             autocast_dtype=None) -> Rollout:
    """Responses to `prompts` from `model` (HF backend), in prompt order, `spec.num_return_sequences` each.

    `seed` makes sampling reproducible (a resumed run samples the same rollouts); `max_new_tokens` and
    `greedy` override the spec for one call (PPO's greedy eval); `autocast_dtype` runs the forward under
    autocast (a bf16 base with fp32 adapters). `desc` shows a progress bar over batches.
    """
    import contextlib

    import torch
    from tqdm.auto import tqdm

    if spec.backend != "hf":
        raise ValueError(f"alignment.generation.generate is the hf backend; use build_engine for {spec.backend!r}")
    device = next(model.parameters()).device
    gen = generation_config(tok, spec, max_new_tokens=max_new_tokens, greedy=greedy)
    k = spec.num_return_sequences
    if seed is not None:
        torch.manual_seed(seed)
    amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    parts: list[Rollout] = []
    starts = range(0, len(prompts), spec.batch_size)
    try:
        for s in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None or len(starts) < 2):
            batch = list(prompts[s:s + spec.batch_size])
            ids, mask = encode_prompts(tok, batch, max_prompt_length=spec.max_prompt_length, device=device)
            if k > 1:
                ids, mask = ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
            with torch.no_grad(), amp:
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
            response, rmask, has_eos, texts, reasons = cut_at_eos(tok, out[:, ids.shape[1]:])
            parts.append(Rollout([p for p in batch for _ in range(k)], ids, mask, response, rmask, has_eos,
                                 texts, reasons))
    finally:
        model.train(was_training)
    return concat_rollouts(parts, tok)
