"""In-process judges: a transformers causal LM (`local`) and a reward-model artifact (`reward_model`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from alignment.errors import ConfigError
from alignment.judges import (CHECK_LABELS, Judge, JudgeSpec, Template, Verdict, checklist_items, combine, spec_digest,
                              two_way)

log = logging.getLogger("align")
RUN_ARTIFACTS = ("sft", "base", "dpo", "ppo")
"""`judge.model` values naming an artifact of the run being labelled (which must be an upstream of the stage)."""


def judge_upstream(spec: JudgeSpec) -> tuple[str, ...]:
    """The run's artifacts a judge reads: its `local` model named by stage, or the run's `reward` model."""
    if spec.kind == "ensemble":
        return tuple(dict.fromkeys(name for m in spec.members or [] for name in judge_upstream(m)))
    if spec.kind == "local" and (spec.model or "sft") in RUN_ARTIFACTS:
        return (spec.model or "sft",)
    if spec.kind == "reward_model" and not spec.reward_artifact:
        return ("reward",)
    return ()


def _artifact(name_or_path: str, inputs: dict, what: str):
    """An upstream artifact by stage name, or a published artifact folder by path."""
    from alignment.artifacts import ArtifactStore

    if name_or_path in inputs:
        return inputs[name_or_path]
    path = Path(name_or_path)
    if (path / "manifest.json").is_file():
        return ArtifactStore(path.parent.parent).read(path)
    raise ConfigError([f"{what}: '{name_or_path}' is neither an input artifact of this stage ({', '.join(inputs) or 'none'}) "
                       "nor a published artifact folder"])


class LocalJudge(Judge):
    """A chat LM loaded in-process; the soft label is its next-token distribution over the two label tokens."""

    def __init__(self, spec: JudgeSpec, inputs: dict, precision: str):
        super().__init__(spec)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from alignment.hardware import place, torch_dtype
        from alignment.models import load_tokenizer
        from alignment.policy import load_policy

        model = spec.model or "sft"
        if model in RUN_ARTIFACTS or model in inputs or (Path(model) / "manifest.json").is_file():
            art = _artifact(model, inputs, "judge.model")
            self.model = load_policy(art, precision)
            self.tok = load_tokenizer(art.model_dir)
            ident = f"{art.stage}@{art.manifest_sha256[:12]}"
        else:
            self.model = place(AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype(precision)))
            self.tok = AutoTokenizer.from_pretrained(model)
            ident = model
        self.model.eval().requires_grad_(False)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.template = Template(spec)
        self.label_ids = [self._label_ids(lab) for lab in spec.labels]
        self.check_ids = [self._label_ids(lab) for lab in CHECK_LABELS]
        if set(self.label_ids[0]) & set(self.label_ids[1]):
            raise ConfigError([f"judge.labels: {list(spec.labels)} share a token in this judge's tokenizer; "
                               "use labels that tokenize apart (A/B or 1/2)"])
        self.name = f"local:{ident}:{self.template.digest()}:{spec_digest(spec)}"

    def _label_ids(self, label: str) -> list[int]:
        """Token ids meaning `label` as the next token: the bare label and the label after a space."""
        ids = []
        for text in (label, " " + label):
            enc = self.tok.encode(text, add_special_tokens=False)
            if len(enc) == 1:
                ids.append(enc[0])
        if not ids:  # no single-token spelling: its first token is the best available signal
            ids = self.tok.encode(label, add_special_tokens=False)[:1]
        return sorted(set(ids))

    def _chat(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _encode(self, texts: list[str]):
        import torch

        enc = [self.tok.encode(t, add_special_tokens=False)[-self.spec.max_length:] for t in texts]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):  # left padding: the next-token position is the last column for every row
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    def _rationales(self, prompts, first, second) -> list[str]:
        from alignment.generation import GenerationSpec, generate

        spec = GenerationSpec(max_new_tokens=self.spec.cot_max_tokens, batch_size=self.spec.batch_size,
                              max_prompt_length=self.spec.max_length)
        return generate(self.model, self.tok, [self.template.messages(p, f, g) for p, f, g in
                                               zip(prompts, first, second)], spec).texts

    def first_better(self, prompts, first, second) -> list[float | None]:
        if self.spec.checklist:
            return self._checklist_first_better(prompts, first, second)
        if self.spec.chain_of_thought:
            why = self._rationales(prompts, first, second)
            texts = [self._chat(self.template.verdict_messages(p, f, g, r))
                     for p, f, g, r in zip(prompts, first, second, why)]
        else:
            texts = [self._chat(self.template.messages(p, f, g)) for p, f, g in zip(prompts, first, second)]
        return self._two_way(texts, self.label_ids)

    def _two_way(self, texts: list[str], label_ids: list[list[int]]) -> list[float]:
        """P(first label) vs the second as the next token after each text, renormalised over the two."""
        import torch

        # Similar lengths batch together (little padding); results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[float | None] = [None] * len(texts)
        bs = self.spec.batch_size
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            ids, mask = self._encode([texts[i] for i in idx])
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False,
                                    **self._last_token_only(mask)).logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            lp = [torch.logsumexp(logp[:, ids_], dim=-1).tolist() for ids_ in label_ids]
            for j, i in enumerate(idx):
                out[i] = two_way(lp[0][j], lp[1][j])
        return out

    def _checklist_first_better(self, prompts, first, second) -> list[float]:
        """Each distinct (prompt, response) is asked every checklist item once, alone; the pair's verdict is
        sigmoid((mean P(yes) of first - that of second) / checklist_temperature)."""
        questions: dict[tuple, list[str]] = {}
        for p, r in [(p, r) for p, f, g in zip(prompts, first, second) for r in (f, g)]:
            key = (repr(p), r)
            if key not in questions:
                questions[key] = [self._chat(self.template.check_messages(p, r, item)) for item in checklist_items(p)]
        flat = [q for qs in questions.values() for q in qs]
        yes = iter(self._two_way(flat, self.check_ids))
        score = {key: sum(next(yes) for _ in qs) / len(qs) for key, qs in questions.items()}
        t = self.spec.checklist_temperature
        return [1.0 / (1.0 + math.exp(-(score[(repr(p), f)] - score[(repr(p), g)]) / t))
                for p, f, g in zip(prompts, first, second)]

    def _last_token_only(self, mask) -> dict:
        """Project onto the vocabulary at the last position only: the full projection costs ~20% of the FLOPs
        and a [batch, length, vocab] float tensor (~0.6 GB per batch of 8 x 400 tokens on SmolLM2)."""
        import inspect

        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def close(self) -> None:
        self.model = None


class RewardModelJudge(Judge):
    """P(a better) = sigmoid(r(a) - r(b)) from a reward-model artifact: order-free, so one scoring per pair. The
    model loads at the first scoring, so a caller that already holds the scores (`from_scores`) never loads it."""

    def __init__(self, spec: JudgeSpec, inputs: dict, precision: str):
        super().__init__(spec)
        self.artifact = _artifact(spec.reward_artifact or "reward", inputs, "judge.reward_artifact")
        self.precision, self._loaded = precision, None
        self.name = f"reward_model:{self.artifact.manifest_sha256[:12]}:{spec_digest(spec)}"

    def _scores(self, prompts, responses) -> list[float]:
        from alignment.reward import load_reward_model, score_conversations

        if self._loaded is None:
            self._loaded = load_reward_model(self.artifact.model_dir, self.precision)
        convs = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return score_conversations(*self._loaded, convs, batch_size=self.spec.batch_size,
                                   max_length=self.spec.max_length)[0]

    @staticmethod
    def _first_better(scores_first: list[float], scores_second: list[float]) -> list[float]:
        return [1.0 / (1.0 + math.exp(y - x)) for x, y in zip(scores_first, scores_second, strict=True)]

    def first_better(self, prompts, first, second) -> list[float | None]:
        return self._first_better(self._scores(prompts, first), self._scores(prompts, second))

    def from_scores(self, scores_a: list[float], scores_b: list[float]) -> list[Verdict]:
        """The verdicts for answers a and b given their scores by this judge's reward model."""
        p = self._first_better(scores_a, scores_b)
        return [combine(x, 1.0 - x if self.spec.both_orders else None, both_orders=self.spec.both_orders,
                        clamp=self.spec.clamp) for x in p]

    def compare(self, prompts, a, b) -> list[Verdict]:
        return self.from_scores(self._scores(prompts, a), self._scores(prompts, b))

    def close(self) -> None:
        self._loaded = None
