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

import contextlib
import functools
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
    autocast: Literal["auto", "off"] = "auto"
    """hf: auto runs fp32 weights under bf16 autocast where the hardware does bf16 fast (AMX/AVX512-BF16 CPUs,
    bf16 GPUs); off keeps the weights' own precision (bit-exact comparisons). Trainers recompute log-probs."""
    memory_fraction: float = 0.25
    """hf: a batch's KV cache may use at most this fraction of the available memory (fewer rows otherwise)."""
    retire_every: int = 8
    """hf: every this many new tokens, rows that have ended (EOS) leave the batch with their KV cache, so the rest
    stop paying for them (HF `generate` computes every row to the longest; SmolLM2 eval prompts end at ~40 of 128
    tokens: 2x tokens/s, the same tokens; docs/generation.md). 0: one `generate` call per batch."""
    prefill: Literal["packed", "padded"] = "packed"
    """hf: how the prompts' KV cache is computed. packed: each distinct prompt once (num_return_sequences copies and
    repeated prompts share it), packed several to a row without padding (`packed_prefill`), then laid out as the
    left-padded batch's cache; the same keys and values, on fewer tokens. padded: HF `generate`'s own prefill of the
    left-padded batch. Models without a plain full-attention cache (sliding windows, state-space layers) or with
    an attention other than sdpa/eager always prefill padded."""

    def problems(self, prefix: str = "generation") -> list[tuple[str, str]]:
        out = []
        for key in ("max_new_tokens", "num_return_sequences", "batch_size"):
            if getattr(self, key) < 1:
                out.append((f"{prefix}.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if self.retire_every < 0:
            out.append((f"{prefix}.retire_every", f"must be >= 0 (0: never), got {self.retire_every}"))
        if self.do_sample and self.temperature <= 0:
            out.append((f"{prefix}.temperature", "must be > 0 when do_sample is true (use do_sample: false for greedy)"))
        if not 0 < self.top_p <= 1:
            out.append((f"{prefix}.top_p", f"must be in (0, 1], got {self.top_p}"))
        if self.top_k < 0:
            out.append((f"{prefix}.top_k", f"must be >= 0, got {self.top_k}"))
        if not 0 < self.memory_fraction <= 1:
            out.append((f"{prefix}.memory_fraction", f"must be in (0, 1], got {self.memory_fraction}"))
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
    chosen: Any = None
    """[B] bool: PPO's `chosen_nll` rows (finished, raw reward >= `chosen_min_score`)."""
    sampler_logprobs: Any = None
    """[B, Lr] the sampler's log-prob of each response token (vllm backend; None for hf). Diagnostics only:
    trainers recompute log-probs with their own forward (bf16 samplers differ by up to ~0.4 nats here)."""

    @property
    def completions(self) -> list[str]:
        return self.texts

    @property
    def lengths(self) -> list[int]:
        """Response tokens per row, EOS included."""
        return self.response_mask.sum(dim=1).tolist()

    @property
    def token_lists(self) -> list[list[int]]:
        """Each row's response tokens, EOS included, without the padding after it."""
        return [r[:n] for r, n in zip(self.response_ids.tolist(), self.lengths)]

    def grouped(self, k: int) -> list[list[str]]:
        """Texts as one list of k responses per prompt."""
        return [self.texts[i:i + k] for i in range(0, len(self.texts), k)]

    def take(self, rows: Sequence[int]) -> "Rollout":
        """The rows `rows`, in that order (tensors indexed, lists picked)."""
        import torch

        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.query_ids.device)
        pick = lambda xs: [xs[i] for i in rows] if xs is not None and len(xs) else xs  # noqa: E731
        tensor = lambda t: t.index_select(0, index.to(t.device)) if t is not None else None  # noqa: E731
        return Rollout(pick(self.prompts), tensor(self.query_ids), tensor(self.query_mask), tensor(self.response_ids),
                       tensor(self.response_mask), tensor(self.has_eos), pick(self.texts), pick(self.finish_reasons),
                       tensor(self.raw_scores), tensor(self.scores), tensor(self.chosen), tensor(self.sampler_logprobs))


def prompt_token_ids(tok, prompts: Sequence[Prompt], *, max_prompt_length: int | None = None) -> list[list[int]]:
    """Chat-templated token ids of each prompt (generation prompt appended), cut to its last max_prompt_length."""
    rows = []
    for p in prompts:
        ids = list(tok.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
        rows.append(ids[-max_prompt_length:] if max_prompt_length else ids)
    return rows


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def left_pad(tok, rows: Sequence[Sequence[int]], *, device=None):
    """(ids, mask) of token rows, left-padded to the longest; the tokenizer is not modified."""
    import torch

    width, pad = max(len(r) for r in rows), _pad_id(tok)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def encode_prompts(tok, prompts: Sequence[Prompt], *, max_prompt_length: int | None = None, device=None):
    """(ids, mask) of chat-templated prompts, left-padded; the tokenizer is not modified."""
    return left_pad(tok, prompt_token_ids(tok, prompts, max_prompt_length=max_prompt_length), device=device)


def generation_config(tok, spec: GenerationSpec, *, max_new_tokens: int | None = None, greedy: bool | None = None):
    """A fresh GenerationConfig for `spec` (never the model's own defaults)."""
    from transformers import GenerationConfig

    sample = spec.do_sample if greedy is None else not greedy
    extra = dict(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k) if sample else {}
    return GenerationConfig(do_sample=sample, max_new_tokens=max_new_tokens or spec.max_new_tokens,
                            pad_token_id=_pad_id(tok), eos_token_id=tok.eos_token_id, use_cache=True, **extra)


def cut_at_eos(tok, response_ids):
    """(response_ids with pad after the first EOS, mask, has_eos, texts, finish reasons)."""
    from alignment import rl

    pad = _pad_id(tok)
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
    pad = _pad_id(tok)
    wq = max(p.query_ids.shape[1] for p in parts)
    wr = max(p.response_ids.shape[1] for p in parts)
    cat = lambda name, w, v, left: torch.cat([_pad_to(getattr(p, name), w, v, left=left) for p in parts])  # noqa: E731
    return Rollout(
        prompts=[x for p in parts for x in p.prompts],
        query_ids=cat("query_ids", wq, pad, True), query_mask=cat("query_mask", wq, 0, True),
        response_ids=cat("response_ids", wr, pad, False), response_mask=cat("response_mask", wr, 0, False),
        has_eos=torch.cat([p.has_eos for p in parts]), texts=[x for p in parts for x in p.texts],
        finish_reasons=[x for p in parts for x in p.finish_reasons])


# -- seeds: one random stream per prompt ---------------------------------------------------------------


def prompt_seeds(seed: int | Sequence[int] | None, n: int) -> list[int] | None:
    """One seed per prompt: `seed` spread over the prompts' positions, or the caller's own list (one each).

    Sample j of prompt i then draws from the stream seeded `seeds[i] + j` (vLLM's rule for `n` > 1), so a
    prompt samples the same responses whatever else shares its batch: a caller may batch shards together
    and still reproduce what shard-by-shard calls sample.
    """
    if seed is None:
        return None
    if isinstance(seed, int):
        return [(seed * 1_000_003 + i * 1009) % 2**62 for i in range(n)]
    seeds = [int(x) for x in seed]
    if len(seeds) != n:
        raise ValueError(f"generate: {len(seeds)} seeds for {n} prompts")
    return [(x * 1009) % 2**62 for x in seeds]


def row_sampler(seeds: Sequence[int], spec: GenerationSpec, greedy: Sequence[bool] = ()):
    """A logits processor that samples each row from its own RNG stream and leaves only that token finite.

    transformers' sampler draws every row from one global stream, so a row's sample depends on its batch;
    this one draws one uniform per row and step from `torch.Generator(seed)` and inverts the row's CDF after
    temperature / top-k / top-p (transformers' rules). `generate` then runs greedy over the result, which picks
    the sampled token. Rows flagged in `greedy` take their most probable token instead (their stream still
    draws, so the other rows' samples do not depend on which rows are greedy).
    """
    import torch
    from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper

    warpers = ([TemperatureLogitsWarper(spec.temperature)] if spec.temperature != 1.0 else []) + \
              ([TopKLogitsWarper(spec.top_k)] if spec.top_k else [])
    streams = [torch.Generator().manual_seed(int(x)) for x in seeds]

    class RowSampler(LogitsProcessor):
        active: list[int] | None = None
        """The streams of the rows still in the batch (`_generate_retiring` sets it; None: all)."""

        def __call__(self, input_ids, scores):
            for w in warpers:
                scores = w(input_ids, scores)
            rows = range(len(streams)) if self.active is None else self.active
            u = torch.cat([torch.rand(1, generator=streams[i]) for i in rows]).to(scores.device)
            pick = nucleus_pick(torch.softmax(scores.float(), dim=-1), u, spec.top_p)
            modes = [j for j, i in enumerate(rows) if i < len(greedy) and greedy[i]]
            if modes:
                pick[modes] = scores[modes].argmax(dim=-1)
            return torch.full_like(scores, float("-inf")).scatter_(1, pick.unsqueeze(1), 0.0)

    return RowSampler()


def nucleus_pick(probs, u, top_p: float, head: int = 64):
    """Token ids drawn by inverting each row's CDF over its top-p nucleus, with one uniform `u` per row.

    The nucleus is transformers' TopPLogitsWarper's: the most probable tokens until their mass reaches `top_p`
    (a token stays when the mass ranked above it is < top_p; the first always stays). Found with `topk` over a
    head of the vocabulary instead of sorting all of it: sorting 128 rows x 49k tokens took ~0.5 s a token
    step on this CPU, most of a sampled label batch's time. Rows whose head holds less than `top_p` of the mass
    look again at a 16x larger head, up to the whole vocabulary, so the result is exact. top_p 1 inverts the
    whole vocabulary's CDF in vocabulary order (no ranking needed).
    """
    import torch

    n, vocab = probs.shape
    if top_p >= 1.0:
        cdf = probs.cumsum(dim=-1)
        return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).clamp(max=vocab - 1).squeeze(1)
    pick = torch.empty(n, dtype=torch.long, device=probs.device)
    todo = torch.arange(n, device=probs.device)
    k = min(head, vocab)
    while len(todo):
        vals, idx = (probs if len(todo) == n else probs[todo]).topk(k, dim=-1)  # no copy of every row on pass 1
        mass = vals.cumsum(-1)
        done = (mass[:, -1] >= top_p) | (k == vocab)
        keep = (mass - vals) < top_p
        keep[:, 0] = True
        cdf = (vals * keep)[done].cumsum(-1)
        at = torch.searchsorted(cdf, (u[todo][done] * cdf[:, -1]).unsqueeze(1)).clamp(max=k - 1)
        pick[todo[done]] = idx[done].gather(1, at).squeeze(1)
        todo, k = todo[~done], min(k * 16, vocab)
    return pick


# -- the hf backend ---------------------------------------------------------------------------------


def resolve_autocast(model, spec: GenerationSpec, autocast_dtype="auto"):
    """The autocast dtype for this call: an explicit dtype/None wins; "auto" follows `spec.autocast`.

    bf16 only where it pays: fp32 weights on a CPU with AMX/AVX512-BF16 (bf16 HF generate ~2.5x fp32 here) or a
    GPU with bf16. Weights already in bf16/fp16 need no autocast.
    """
    import torch

    if autocast_dtype != "auto":
        return autocast_dtype
    if spec.autocast == "off":
        return None
    param = next(model.parameters())
    if param.dtype != torch.float32:
        return None
    if param.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    from alignment.hardware import cpu_has_fast_bf16

    return torch.bfloat16 if param.device.type == "cpu" and cpu_has_fast_bf16() else None


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_bytes_per_token(model, dtype=None) -> int:
    """KV-cache bytes one token of one row takes (keys + values, every layer); 0 when the config is unusual."""
    import torch

    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    try:
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0
    size = torch.empty((), dtype=dtype or next(model.parameters()).dtype).element_size()
    return 2 * layers * kv * head_dim * size


def rows_that_fit(model, spec: GenerationSpec, width: int, new_tokens: int, dtype=None) -> int | None:
    """Most rows whose KV cache for width + new_tokens tokens fits in spec.memory_fraction of free memory."""
    per_token, free = kv_bytes_per_token(model, dtype), None
    device = next(model.parameters()).device
    if device.type == "cuda":
        import torch

        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        free = _available_bytes()
    if not per_token or not free:
        return None
    return max(1, int(spec.memory_fraction * free // (per_token * (width + new_tokens))))


def _batches(lengths: list[int], spec: GenerationSpec, k: int, fit) -> list[list[int]]:
    """Prompt indices, longest first, in batches of at most spec.batch_size prompts whose rows fit in memory.

    Similar lengths share a batch (little padding); longest first so a batch too big for memory fails at once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur = [], []
    for i in order:
        cap = fit(lengths[cur[0] if cur else i])  # the first prompt of a batch is its widest
        limit = spec.batch_size if cap is None else max(1, min(spec.batch_size, cap // k))
        if cur and len(cur) >= limit:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def generate(model, tok, prompts: Sequence[Prompt], spec: GenerationSpec, *, seed: int | Sequence[int] | None = None,
             max_new_tokens: int | None = None, greedy: bool | None = None, desc: str | None = None,
             autocast_dtype="auto", prompt_ids: Sequence[Sequence[int]] | None = None,
             greedy_rows: Sequence[int] = ()) -> Rollout:
    """Responses to `prompts` from `model` (HF backend), in prompt order, `spec.num_return_sequences` each.

    `seed` (one int, or one per prompt) makes sampling reproducible and independent of the batching
    (`prompt_seeds`: a resumed run samples the same rollouts); None: torch's global RNG. `max_new_tokens` and
    `greedy` override the spec for one call (PPO's greedy eval); `autocast_dtype`: a dtype to run the forward
    under autocast, None for none, "auto" to follow `spec.autocast` (`resolve_autocast`). `desc` shows a
    progress bar over batches. Prompts are batched longest first (little padding), at most `spec.batch_size`
    per call and fewer when their KV cache would not fit in memory; rows come back in prompt order.
    `prompt_ids`: the prompts already tokenised (a trainer's own chat templating), used instead of templating
    `prompts` (which are then only carried into the Rollout). `greedy_rows`: rows of the Rollout (prompt i,
    sample j -> i * k + j) decoded greedily inside a sampled, seeded call (GRPO's `group.greedy_member`).
    """
    import torch
    from tqdm.auto import tqdm

    if spec.backend != "hf":
        raise ValueError(f"alignment.generation.generate is the hf backend; use build_engine for {spec.backend!r}")
    if not prompts:
        raise ValueError("generate: no prompts")
    device = next(model.parameters()).device
    gen = generation_config(tok, spec, max_new_tokens=max_new_tokens, greedy=greedy)
    k, dtype = spec.num_return_sequences, resolve_autocast(model, spec, autocast_dtype)
    if prompt_ids is not None and len(prompt_ids) != len(prompts):
        raise ValueError(f"generate: {len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
    rows = [list(r) for r in prompt_ids] if prompt_ids is not None else \
        prompt_token_ids(tok, prompts, max_prompt_length=spec.max_prompt_length)
    fit = functools.partial(rows_that_fit, model, spec, new_tokens=gen.max_new_tokens, dtype=dtype)
    batches = _batches([len(r) for r in rows], spec, k, lambda w: fit(w))
    seeds = _row_seeds(gen, spec, seed, len(prompts), greedy, greedy_rows)
    greedy_set = set(greedy_rows)
    amp = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    parts: list[Rollout] = []
    frozen = thaw(model)
    try:
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None or len(batches) < 2):
            sampler = None if seeds is None else row_sampler(
                [seeds[i] + j for i in batch for j in range(k)], spec,
                [i * k + j in greedy_set for i in batch for j in range(k)])
            with torch.no_grad(), amp:
                parts.append(_one_batch(model, tok, [rows[i] for i in batch], [prompts[i] for i in batch], spec, gen,
                                        sampler, device))
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
    ro = concat_rollouts(parts, tok)
    position = {i: j for j, i in enumerate(i for b in batches for i in b)}
    ro = ro.take([position[i] * k + r for i in range(len(prompts)) for r in range(k)])
    return _trim(ro)


def _row_seeds(gen, spec: GenerationSpec, seed, n: int, greedy: bool | None, greedy_rows) -> list[int] | None:
    """Each prompt's sampling seed (None: greedy, or torch's global RNG); with seeds, `gen` is switched to
    greedy selection, since the row sampler then does the sampling."""
    sample = spec.do_sample if greedy is None else not greedy
    seeds = prompt_seeds(seed, n) if sample else None
    if greedy_rows and seeds is None:
        raise ValueError("generate: greedy_rows needs a sampled call with a seed")
    if seeds is not None:
        gen.do_sample = False
        for name in ("temperature", "top_p", "top_k"):
            setattr(gen, name, None)
    return seeds


def _one_batch(model, tok, rows: list[list[int]], prompts: list, spec: GenerationSpec, gen, sampler,
               device) -> Rollout:
    """One left-padded batch of token rows, `spec.num_return_sequences` responses each, cut at EOS."""
    k = spec.num_return_sequences
    ids, mask = left_pad(tok, rows, device=device)
    if k > 1:
        ids, mask = ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
    cache = packed_prefill(model, ids, mask) if spec.prefill == "packed" else None
    out = _generate_retiring(model, ids, mask, gen, sampler, spec.retire_every, cache)
    response, rmask, has_eos, texts, reasons = cut_at_eos(tok, out[:, ids.shape[1]:])
    return Rollout([p for p in prompts for _ in range(k)], ids, mask, response, rmask, has_eos, texts, reasons)


def _generate_retiring(model, ids, mask, gen, sampler, every: int, cache=None):
    """HF `generate` in steps of `every` new tokens, between which the rows that ended leave the batch.

    The next step continues from the kept KV cache (`DynamicCache.batch_select_indices`), feeding only the last
    token, so each row's tokens are the ones one call would give (the row sampler keeps each row's stream; bf16
    matmuls on a smaller batch can still flip a near-tie). `cache`: the prompts' cache, already computed
    (`packed_prefill`). Returns [B, Lq + longest response] like `generate`.
    """
    import copy

    import torch
    from transformers import DynamicCache, LogitsProcessorList

    extra = {"logits_processor": LogitsProcessorList([sampler])} if sampler is not None else {}
    if every <= 0 or gen.eos_token_id is None:
        given = {} if cache is None else {_cache_kwarg(model): cache}
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **given, **extra)
    width, made, cache = ids.shape[1], 0, DynamicCache() if cache is None else cache
    kept = {_cache_kwarg(model): cache}
    rows, seq, att = torch.arange(ids.shape[0], device=ids.device), ids, mask
    done: dict[int, torch.Tensor] = {}
    while True:
        step = copy.copy(gen)
        step.max_new_tokens = min(every, gen.max_new_tokens - made)
        if sampler is not None:
            sampler.active = rows.tolist()
        seq = model.generate(input_ids=seq, attention_mask=att, generation_config=step, **kept, **extra)
        new = seq[:, att.shape[1]:]
        made, att = made + step.max_new_tokens, torch.cat([att, torch.ones_like(new)], dim=1)
        ended = (new == gen.eos_token_id).any(dim=1) | (made >= gen.max_new_tokens)
        for i in ended.nonzero().flatten().tolist():
            done[int(rows[i])] = seq[i, width:]
        if ended.all():
            break
        if ended.any():
            keep = (~ended).nonzero().flatten()
            cache.batch_select_indices(keep)
            rows, seq, att = rows[keep], seq[keep], att[keep]
    out = torch.full((ids.shape[0], max(len(r) for r in done.values())), gen.pad_token_id, dtype=ids.dtype,
                     device=ids.device)
    for i, r in done.items():
        out[i, :len(r)] = r
    return torch.cat([ids, out], dim=1)


PREFILL_ROW = 256


def packed_prefill(model, ids, mask, *, min_saving: float = 0.1):
    """The KV cache of the left-padded batch `ids` at every column but the last, computed on each distinct prompt
    once, packed several to a row without padding (positions from 0, a block-diagonal causal mask keeping each
    prompt to itself), then laid out as the padded batch's own cache (pad columns zero; they are masked either
    way). `generate` then feeds only the last column. The same keys and values as generate's own prefill, on fewer
    tokens: a batch padded to its longest prompt, and the num_return_sequences copies of a prompt (GRPO's groups,
    the label stage's pairs), cost only their real, distinct tokens.

    None (the caller prefills as usual) when it would save less than `min_saving` of the prefill tokens, or the
    model is not a decoder with a plain full-attention dynamic cache under sdpa or eager attention."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from alignment.packing import block_diagonal_mask, pack_sequences

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager") or getattr(config, "is_encoder_decoder", False) or ids.shape[1] < 2:
        return None
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config transformers cannot derive cache layers from: its own prefill
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    body, real = ids[:, :-1], mask[:, :-1].bool()
    distinct: dict[tuple, int] = {}
    owner = [distinct.setdefault(tuple(row[keep].tolist()), len(distinct)) for row, keep in zip(body, real)]
    total, width = sum(map(len, distinct)), body.shape[1]
    if total == 0 or total > (1 - min_saving) * body.numel():
        return None
    # The distinct prompts as a left-padded batch of the body's width: pack_sequences' index then points each
    # padded column at its token in the packed rows (pad columns at a zero row appended below).
    uniq = ids.new_zeros((len(distinct), width))
    uniq_mask = torch.zeros_like(uniq)
    for u, tokens in enumerate(distinct):
        if tokens:
            uniq[u, width - len(tokens):] = torch.tensor(tokens, dtype=ids.dtype)
            uniq_mask[u, width - len(tokens):] = 1
    # Rows of about PREFILL_ROW tokens (or the longest prompt): few, full rows, while the attention's cost, which
    # grows with the row's width squared, stays small next to the linear layers'.
    rows = -(-total // max(PREFILL_ROW, max(map(len, distinct))))
    packed, pos, index = pack_sequences(uniq, uniq_mask, rows, 8, 0)
    additive = base.get_input_embeddings().weight.dtype if impl == "eager" else None
    base(input_ids=packed, position_ids=pos, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache},
         attention_mask=block_diagonal_mask(pos, torch.ones_like(packed), additive_dtype=additive))
    at = index[owner]  # [B, width]: each padded column's flat position in the packed rows
    laid_out = []
    for layer in cache.layers:
        kv = []
        for t in (layer.keys, layer.values):  # [rows, heads, packed width, dim] -> [B, heads, width, dim]
            flat = t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])
            flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
            kv.append(flat[at].transpose(1, 2).contiguous())
        laid_out.append(tuple(kv))
    return DynamicCache(ddp_cache_data=laid_out)


def _cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache by: `cache` since transformers 5.24, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def thaw(model) -> list:
    """Turn requires_grad on for the frozen floating-point weights (returned, for the caller to freeze again).

    Generation runs under no_grad, so no graph is recorded either way; but on CPU (torch 2.13, transformers 5.24)
    HF `generate` on a model with frozen weights, which every LoRA model has, ran 2x slower and held memory that
    grew with every new token: SmolLM2 bf16, 64 rows x 32 new tokens, 17 s and 0.96 GB peak with the flags on,
    33 s and 4.4 GB with `requires_grad_(False)` alone (`bench/frozen_generate.py`)."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    return frozen


def _adapted_layers(model, adapter: str) -> list:
    """The LoRA layers of `adapter` whose merge is base + B A; none when a variant (DoRA) is among them."""
    from peft.tuners.lora import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear) and adapter in m.lora_A]
    return [] if any(adapter in m.lora_variant for m in layers) else layers


def _merged_weight(m, adapter: str):
    """base + B A, computed in fp32 and rounded once to the base's dtype."""
    w = m.base_layer.weight
    return (w.float() + m.get_delta_weight(adapter).float()).to(w.dtype)


@contextlib.contextmanager
def merged_lora(model, adapter: str = "default", stash: "WeightStash | None" = None):
    """Inside: every linear layer adapted by LoRA `adapter` samples with base + B A (computed in fp32, rounded once
    to the base's dtype) and the adapters are off, so sampling costs no per-token LoRA work. Outside, the base
    weights are the ones from before, bit for bit (with LoRA they are the reference; unmerging would not restore
    them exactly).

    Without `stash`, each merged weight is a new tensor swapped in and out (a second copy of the adapted weights
    while inside). With a `WeightStash`, the merge is written into the base tensors themselves and undone by reading
    the stashed bytes back (no second copy in memory). A no-op without LoRA layers and for variants (DoRA) whose
    merge is not base + B A. The caller re-activates its adapter afterwards if it switches between several."""
    import torch

    layers = _adapted_layers(model, adapter)
    if not layers:
        yield
        return
    if stash is not None and stash.fits(model, layers) and stash.save(layers):
        try:
            with torch.no_grad():
                for m in layers:
                    m.base_layer.weight.copy_(_merged_weight(m, adapter))
            with model.disable_adapter():
                yield
        finally:
            stash.restore(layers)
        return
    kept = []
    try:
        with torch.no_grad():
            for m in layers:
                kept.append((m.base_layer, m.base_layer.weight))
                m.base_layer.weight = torch.nn.Parameter(_merged_weight(m, adapter), requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for layer, w in kept:
            layer.weight = w


class WeightStash:
    """The base weights of the adapted layers as raw bytes in an unnamed temporary file (TMPDIR; gone when the
    process ends), so `merged_lora` can merge in place and read the originals back exactly. Written once, at the
    first merge: LoRA training never changes the base. ~0.1 s to read back per rollout for a 135M model.

    Declines (`fits` is False: the copy path is used) when an adapted weight shares its storage with another
    parameter (an adapted lm_head tied to the embeddings: merging in place would change the embeddings too), is
    not contiguous, or is not on the CPU (an accelerator's memory is not where this saving matters)."""

    def __init__(self):
        self._file = None
        self._layers: list[int] = []
        self._failed = False

    def fits(self, model, layers) -> bool:
        from collections import Counter

        holders = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
        return all(w.device.type == "cpu" and w.is_contiguous() and holders[w.data_ptr()] == 1
                   for w in (m.base_layer.weight for m in layers))

    def save(self, layers) -> bool:
        """Write the stash if it is not written yet; False (the caller merges into copies) when TMPDIR cannot hold
        it, e.g. a full disk."""
        import logging
        import tempfile

        if self._file is not None:
            if [id(m) for m in layers] != self._layers:
                raise RuntimeError("WeightStash: the adapted layers changed since the stash was written")
            return True
        if self._failed:  # do not rewrite ~the model's size to a full disk at every rollout
            return False
        f = None
        try:
            f = tempfile.TemporaryFile(prefix="align-base-weights-")
            for m in layers:
                f.write(memoryview(_raw(m.base_layer.weight)).cast("B"))  # the tensor's own bytes, no copy
            f.flush()
        except OSError as e:
            if f is not None:
                f.close()
            logging.getLogger("align").warning("merging the adapter into copies of the weights, not in place: "
                                               "cannot stash the base weights in %s (%s)", tempfile.gettempdir(),
                                               e.strerror or e)
            self._failed = True
            return False
        self._file, self._layers = f, [id(m) for m in layers]
        return True

    def restore(self, layers) -> None:
        self._file.seek(0)
        for m in layers:
            view = _raw(m.base_layer.weight)
            if self._file.readinto(memoryview(view).cast("B")) != view.nbytes:
                raise RuntimeError("WeightStash: the stash file is shorter than the weights it holds")


def _raw(t):
    """A writable numpy view of a contiguous tensor's bytes (any dtype, bf16 included)."""
    import torch

    return t.detach().view(torch.uint8).numpy()


def _trim(ro: Rollout) -> Rollout:
    """Drop response columns past every row's end (batches of different lengths were right-padded)."""
    width = int(ro.response_mask.sum(dim=1).max()) if ro.response_mask.numel() else 0
    if width < ro.response_ids.shape[1]:
        ro.response_ids, ro.response_mask = ro.response_ids[:, :width], ro.response_mask[:, :width]
    return ro


# -- engines: one call for either backend ---------------------------------------------------------------


class Engine:
    """Something that turns prompts into a Rollout: `engine.generate(prompts, spec)`.

    `load_adapter(path)` points the engine at a new LoRA adapter (RL: the policy after an update); `close()`
    frees what it holds (the vllm backend stops its server). Usable as a context manager.
    """

    backend = "?"
    spec: GenerationSpec

    def generate(self, prompts: Sequence[Prompt], spec: GenerationSpec | None = None, *, seed: int | None = None,
                 max_new_tokens: int | None = None, greedy: bool | None = None, desc: str | None = None) -> Rollout:
        raise NotImplementedError

    def load_adapter(self, path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HFEngine(Engine):
    """The hf backend: transformers `generate` on an in-process model (the trainer's own model during RL)."""

    backend = "hf"

    def __init__(self, model, tok, spec: GenerationSpec, *, autocast_dtype="auto"):
        self.model, self.tok, self.spec, self.autocast_dtype = model, tok, spec, autocast_dtype

    def generate(self, prompts, spec=None, *, seed=None, max_new_tokens=None, greedy=None, desc=None) -> Rollout:
        return generate(self.model, self.tok, prompts, spec or self.spec, seed=seed, max_new_tokens=max_new_tokens,
                        greedy=greedy, desc=desc, autocast_dtype=self.autocast_dtype)

    def load_adapter(self, path, name: str = "default") -> None:
        """Load a LoRA adapter's weights into the model (wrapping it in peft the first time)."""
        from peft import PeftModel, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        if isinstance(self.model, PeftModel) and name in self.model.peft_config:
            set_peft_model_state_dict(self.model, load_peft_weights(str(path)), adapter_name=name)
        elif isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=False)
        self.model.set_adapter(name)

    def close(self) -> None:
        self.model = None


def build_engine(spec: GenerationSpec, model=None, tok=None, *, model_dir=None, adapter=None, workdir=None,
                 autocast_dtype="auto", **options) -> Engine:
    """The engine `spec.backend` names.

    hf: wraps the in-process `model` (and `tok`). vllm: serves `model_dir` (a folder of safetensors weights and a
    tokenizer), or saves the in-process `model` into `workdir` first; `adapter` is a LoRA adapter folder to
    serve on top; `options` go to `alignment.generation_vllm.VLLMEngine` (venv, threads, dtype, ...).
    """
    if spec.backend == "hf":
        if model is None or tok is None:
            raise ValueError("build_engine: the hf backend needs the model and its tokenizer")
        engine = HFEngine(model, tok, spec, autocast_dtype=autocast_dtype)
        if adapter is not None:
            engine.load_adapter(adapter)
        return engine
    from alignment.generation_vllm import VLLMEngine

    return VLLMEngine.start(spec, model=model, tok=tok, model_dir=model_dir, adapter=adapter, workdir=workdir,
                            **options)
