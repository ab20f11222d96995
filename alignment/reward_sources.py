"""Reward sources for RL (PPO, GRPO, RLOO): a reward-model artifact, a Python function, or an AI judge.

Every source becomes a text-level scorer, `score(prompts, completions, **fields) -> list[float]`:
`prompts` are chat message lists ending before the assistant turn, `completions` the response texts, and
`fields` optional per-prompt lists from the prompt data (`constraints`, `reference`; see `alignment.prompts`).
A scorer ignores the fields it does not need; callers that have them pass them (TRL's reward-function
wrapper passes dataset columns by name).

- `kind: model`: the reward stage's artifact (a merged AutoModelForSequenceClassification), optionally
  normalised with the mean/std of its scores over its own training responses (stored in its manifest).
  `ModelReward.score_ids` also scores token ids directly, which the PPO loop uses: no detokenise/retokenise
  round trip, and the score is read exactly where the reward model was trained to read it (see there).
  In PPO the same RM is usually a role on the policy's own base instead (`AdapterReward`: the reward stage's
  unmerged LoRA adapter + score head, `reward.model_as`), scoring exactly the same way.
- `kind: function`: `module:function`, called as fn(prompts, completions[, constraints=..., reference=...]),
  e.g. the bundled verifiable reward `alignment.reward_sources:gold_reward`.
- `kind: judge`: reward = P(completion beats the prompt's reference answer) - 0.5, from
  `alignment.judges.build_judge(...).compare` (both orders averaged when the judge spec says so).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

from alignment.config import Section
from alignment.errors import ArtifactError, ConfigError
from alignment.judges import JudgeSpec

log = logging.getLogger("align")
TextScorer = Callable[..., list[float]]
FIELDS = ("constraints", "reference")
"""Per-prompt fields a scorer may take as keyword arguments."""


class RewardSource(Section):
    """What scores a completion (the `reward:` section of the ppo stage)."""

    kind: Literal["model", "function", "judge"] = "model"
    """model: the run's `reward` artifact; function: a Python callable; judge: an AI judge vs a reference answer."""
    function: str | None = None
    """kind function: "module:function", called as fn(prompts, completions) -> list[float] (it may also take the
    keyword arguments `constraints` and/or `reference`, lists aligned with the prompts)."""
    judge: JudgeSpec | None = None
    """kind judge: the judge (alignment.judges); reward = P(completion beats the reference answer) - 0.5."""
    normalize: bool = True
    """kind model: (score - reward_mean) / reward_std with the RM manifest's statistics, so a reward of 0 is the
    RM's average training response and the KL penalty's scale does not depend on the RM's offset."""
    batch_size: int = 16
    """kind model: sequences per reward-model forward pass in text-level scoring."""
    max_length: int = 512
    """kind model: conversations longer than this (tokens) keep their end (the RM reads the last token)."""
    model_as: Literal["auto", "adapter", "merged"] = "auto"
    """kind model, in PPO: adapter loads the reward stage's unmerged LoRA + score head (`<reward>/adapter/`) as a
    fourth role on the policy's base (no second model in memory); merged loads `<reward>/model/` as a separate
    model; auto: the adapter when the RM was trained on this run's SFT policy with LoRA, else merged. TRL's
    GRPO/RLOO always use the merged model (they take a text-level scorer)."""

    def problems(self, prefix: str = "reward") -> list[tuple[str, str]]:
        out = []
        if self.kind == "function":
            if not self.function or not re.fullmatch(r"[\w.]+:\w+", self.function):
                out.append((f"{prefix}.function", "kind 'function' needs \"module:function\", e.g. "
                                                  "alignment.reward_sources:gold_reward"))
        elif self.function:
            out.append((f"{prefix}.function", f"applies to kind 'function' only, not '{self.kind}'"))
        if self.kind == "judge":
            if self.judge is None:
                out.append((f"{prefix}.judge", "kind 'judge' needs a judge section (alignment.judges.JudgeSpec)"))
            else:
                out += self.judge.problems(f"{prefix}.judge")
        elif self.judge is not None:
            out.append((f"{prefix}.judge", f"applies to kind 'judge' only, not '{self.kind}'"))
        if self.batch_size < 1 or self.max_length < 1:
            out.append((prefix, "batch_size and max_length must be >= 1"))
        return out


def text_reward_fn(spec: RewardSource, inputs: dict, precision: str) -> TextScorer:
    """The text-level scorer of a reward source (see the module docstring); `inputs` are the stage's upstream
    artifacts (kind model reads `inputs["reward"]`, a judge may read `sft`/`reward`)."""
    if spec.kind == "model":
        if "reward" not in inputs:
            raise ConfigError(["reward.kind: 'model' needs the run's reward artifact (run the reward stage, or set "
                               "inputs.reward)"])
        return ModelReward.from_artifact(inputs["reward"], precision, normalize=spec.normalize,
                                         batch_size=spec.batch_size, max_length=spec.max_length)
    if spec.kind == "function":
        return with_fields(import_function(spec.function))
    return JudgeReward(spec.judge, inputs, precision)


def rl_reward(spec: RewardSource, inputs: dict, precision: str):
    """The scorer PPO uses: for kind model the RM's adapter on the policy's base when it fits (`model_as`),
    else `text_reward_fn`'s."""
    if spec.kind == "model" and spec.model_as != "merged" and "reward" in inputs:
        why = AdapterReward.unfit(inputs["reward"], inputs.get("sft"))
        if why is None:
            return AdapterReward.from_artifact(inputs["reward"], normalize=spec.normalize, max_length=spec.max_length)
        if spec.model_as == "adapter":
            raise ConfigError([f"reward.model_as: 'adapter' needs the reward model's unmerged adapter on this run's "
                               f"SFT policy, and {why}; use auto or merged"])
        log.info("[reward] the reward model is loaded as a separate merged model: %s", why)
    return text_reward_fn(spec, inputs, precision)


def import_function(path: str) -> Callable:
    """`module:function` -> the callable, with a config error naming what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError([f"reward.function: cannot import module '{module_name}' ({e})"]) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError([f"reward.function: '{module_name}' has no function '{attr}'"])
    return fn


def with_fields(fn: Callable) -> TextScorer:
    """Wrap fn(prompts, completions, ...) so it receives only the per-prompt fields it declares."""
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted = set(FIELDS) if takes_all else {f for f in FIELDS if f in params}

    def score(prompts, completions, **fields):
        kw = {k: v for k, v in fields.items() if k in wanted and v is not None}
        out = [float(x) for x in fn(prompts, completions, **kw)]
        if len(out) != len(completions):
            raise ValueError(f"reward function {getattr(fn, '__name__', fn)} returned {len(out)} scores for "
                             f"{len(completions)} completions")
        return out

    score.__name__ = getattr(fn, "__name__", "reward")
    return score


# -- kind: function -- the bundled verifiable reward --------------------------------------------------------------


def gold_reward(prompts: list[list[dict]], completions: list[str],
                constraints: list[list[dict] | None] | None = None) -> list[float]:
    """Fraction of the prompt's verifiable constraints the completion satisfies (`alignment.gold.score`, in [0, 1]).

    The constraints come from the prompt rows (`constraints=`, as the PPO loop passes them); without them each
    prompt is looked up in the bundled data files by its last user message. A prompt with no known constraints
    is an error: scoring it 1.0 ("nothing to violate") would reward anything.
    """
    from alignment import gold

    return _constraint_scores(gold.score, "gold_reward", prompts, completions, constraints)


def gold_reward_graded(prompts: list[list[dict]], completions: list[str],
                       constraints: list[list[dict] | None] | None = None) -> list[float]:
    """`gold_reward` with partial credit for count constraints (`alignment.gold.graded_score`): a response that
    misses "at least 50 words" with 30 scores 0.6 for it, not 0. For RLVR (a denser signal within a group); the
    evaluation keeps the pass/fail check."""
    from alignment import gold

    return _constraint_scores(gold.graded_score, "gold_reward_graded", prompts, completions, constraints)


def gold_reward_all(prompts: list[list[dict]], completions: list[str],
                    constraints: list[list[dict] | None] | None = None) -> list[float]:
    """Half `gold_reward`'s fraction, half a bonus when every constraint is met: 0 / 0.25 / 1 for none / one / both
    of two constraints instead of 0 / 0.5 / 1. The evaluation counts a prompt as passed only when all its
    constraints are met; with the plain fraction a policy keeps half the reward by meeting the easy constraint
    and dropping the other (e.g. a short formatted answer that ignores "at least 40 words"), which is the drift
    the fraction reward showed. Single-constraint prompts score as with `gold_reward`. Measured with GRPO on
    SmolLM2 it made the answers longer and more often cut, and scored below `gold_reward` (docs/algorithms.md)."""
    from alignment import gold

    def both(text: str, cons: list[dict]) -> float:
        met = gold.score(text, cons)
        return 0.5 * met + 0.5 * float(met == 1.0)

    return _constraint_scores(both, "gold_reward_all", prompts, completions, constraints)


def _constraint_scores(score, name: str, prompts, completions, constraints) -> list[float]:
    out = []
    for i, (prompt, text) in enumerate(zip(prompts, completions)):
        cons = constraints[i] if constraints is not None else None
        if cons is None:
            cons = _bundled_constraints().get(_last_user(prompt))
        if not cons:
            raise ValueError(f"{name}: no constraints known for the prompt {_last_user(prompt)[:80]!r}; use "
                             "prompt rows with `constraints` (e.g. data/instruct/*.jsonl)")
        out.append(score(text, cons))
    return out


def _last_user(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


@lru_cache(maxsize=1)
def _bundled_constraints() -> dict[str, list[dict]]:
    from alignment.prompts import load_prompts

    data = Path(__file__).resolve().parent.parent / "data"
    index: dict[str, list[dict]] = {}
    for path in sorted(data.glob("*/*.jsonl")):
        try:
            rows = load_prompts(str(path))
        except Exception:  # a file in another layout; it just contributes nothing
            continue
        for r in rows:
            if r.get("constraints"):
                index.setdefault(_last_user(r["prompt"]), r["constraints"])
    return index


# -- kind: model ------------------------------------------------------------------------------------------------


class ModelReward:
    """A reward-model artifact as a scorer: text-level (`__call__`) and token-level (`score_ids`).

    The RM was trained on whole rendered conversations and reads its score at the last token, which for
    ChatML is the newline the template puts after `<|im_end|>`. `score_ids` therefore appends the template's
    text after the EOS (`suffix_ids`) to responses that ended with an EOS, so a generated response is scored
    exactly as the same conversation rendered by the chat template would be.
    """

    def __init__(self, model, tok, *, mean: float = 0.0, std: float = 1.0, normalize: bool = False,
                 batch_size: int = 16, max_length: int = 512):
        self.model, self.tok = model.eval().requires_grad_(False), tok
        self.mean, self.std, self.normalize = mean, std, normalize
        self.batch_size, self.max_length = batch_size, max_length
        self.suffix_ids = template_suffix_ids(tok)
        self.score = model.score
        self.__name__ = "model_reward"

    @property
    def weights_mb(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**20

    @classmethod
    def from_artifact(cls, art, precision: str, **kw) -> "ModelReward":
        from alignment.reward import load_reward_model

        model, tok = load_reward_model(art.model_dir, precision)
        m = art.manifest.metrics
        if kw.get("normalize") and not ("reward_mean" in m and "reward_std" in m):
            raise ConfigError([f"reward.normalize: {art.path} has no reward_mean/reward_std in its metrics; "
                               "set reward.normalize: false"])
        return cls(model, tok, mean=m.get("reward_mean", 0.0), std=m.get("reward_std", 1.0), **kw)

    def _finish(self, scores: list[float]) -> list[float]:
        if not self.normalize:
            return scores
        return [(s - self.mean) / max(self.std, 1e-8) for s in scores]

    def __call__(self, prompts, completions, **_fields) -> list[float]:
        from alignment.reward import score_conversations

        convs = [p + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
        scores, _ = score_conversations(self.model, self.tok, convs, batch_size=self.batch_size,
                                        max_length=self.max_length)
        return self._finish(scores)

    def score_ids(self, query_ids, query_mask, response_ids, response_mask, has_eos):
        """Scores (batch,) of left-padded queries + right-padded responses (masks 1 on real tokens), as tensors.

        Each row is rebuilt as its real query tokens + response tokens (+ the template suffix after an EOS),
        left-padded so the last column is every row's last token, and scored there.
        """
        import torch

        device = next(self.model.parameters()).device
        ids, mask = scoring_batch(query_ids, query_mask, response_ids, response_mask, has_eos, self.suffix_ids,
                                  self.max_length, self.tok.pad_token_id, device)
        with torch.no_grad():
            scores = last_token_scores(self.model, ids, mask)
        return torch.tensor(self._finish(scores.float().cpu().tolist()))


def scoring_batch(query_ids, query_mask, response_ids, response_mask, has_eos, suffix_ids, max_length, pad, device):
    """(ids, mask) to score: each row's real query + response tokens (+ the template suffix after an EOS), its
    last `max_length`, left-padded so the last column is every row's last token."""
    import torch

    rows = []
    for q, qm, r, rm, eos in zip(query_ids.tolist(), query_mask.tolist(), response_ids.tolist(),
                                 response_mask.tolist(), has_eos.tolist()):
        ids = [t for t, m in zip(q, qm) if m] + [t for t, m in zip(r, rm) if m]
        rows.append((ids + (suffix_ids if eos else []))[-max_length:])
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def last_token_scores(rm, input_ids, attention_mask):
    """The score head of a sequence-classification model at the last column of a left-padded batch.

    The backbone runs once without the LM head; positions count from each row's first real token, so a
    left-padded row scores exactly as it would alone.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    backbone = getattr(rm, rm.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    return rm.score(hidden[:, -1]).squeeze(-1)


def template_suffix_ids(tok) -> list[int]:
    """Token ids the chat template puts after the assistant's EOS (ChatML: the newline after `<|im_end|>`)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ids = list(tok.apply_chat_template(probe, tokenize=True, return_dict=True)["input_ids"])
    eos = tok.eos_token_id
    if eos not in ids:
        return []
    last = len(ids) - 1 - ids[::-1].index(eos)
    return ids[last + 1:]


class AdapterReward:
    """The reward model as a role on the PPO trainer's own base: the reward stage's unmerged LoRA adapter (frozen,
    adapter name `reward`) + its score head, read at the last token exactly like `ModelReward.score_ids`.

    The RM was trained as LoRA on base + SFT merged, which is the PPO trainer's base, so the adapter fits it; the
    result equals the merged RM's up to rounding (tests/test_reward_stage.py), without a second copy of the
    weights. `attach(trainer)` is called by `PPOTrainer`.
    """

    name = "reward"

    def __init__(self, config, weights: dict, score_weight, *, score_bias=None, tok=None, mean: float = 0.0,
                 std: float = 1.0, normalize: bool = False, max_length: int = 512):
        import torch

        self.config, self.weights = config, weights
        self.score = torch.nn.Linear(score_weight.shape[-1], 1, bias=score_bias is not None).float()
        with torch.no_grad():
            self.score.weight.copy_(score_weight.reshape(1, -1).float())
            if score_bias is not None:
                self.score.bias.copy_(score_bias.reshape(1).float())
        self.score.requires_grad_(False)
        self.mean, self.std, self.normalize, self.max_length = mean, std, normalize, max_length
        self.suffix_ids = template_suffix_ids(tok) if tok is not None else []
        self.trainer = None
        self.__name__ = "adapter_reward"

    @property
    def adapter_mb(self) -> float:
        return (sum(t.numel() * t.element_size() for t in self.weights.values())
                + self.score.weight.numel() * 4) / 2**20

    @staticmethod
    def unfit(art, sft) -> str | None:
        """Why the artifact's adapter cannot be a role on `sft`'s merged weights; None when it can."""
        lineage = art.manifest.lineage
        if not (art.path / ADAPTER_DIR / "adapter_config.json").is_file():
            return f"{art.path} has no unmerged adapter ({ADAPTER_DIR}/: LoRA reward models from this version on)"
        # By content, not path: a store copied or moved (rsync to a cluster, cp -al) keeps its manifests' hashes.
        trained_on = art.manifest.inputs.get("sft")
        if (lineage.get("init") != "sft" or sft is None or trained_on is None
                or trained_on.manifest_sha256 != sft.manifest_sha256):
            return f"{art.path} was trained on {lineage.get('parent')}, not on this run's SFT policy"
        return None

    @classmethod
    def from_artifact(cls, art, *, normalize: bool = True, max_length: int = 512) -> "AdapterReward":
        from alignment.models import load_tokenizer

        m = art.manifest.metrics
        if normalize and not ("reward_mean" in m and "reward_std" in m):
            raise ConfigError([f"reward.normalize: {art.path} has no reward_mean/reward_std in its metrics; "
                               "set reward.normalize: false"])
        return cls.from_folder(art.path / ADAPTER_DIR, load_tokenizer(art.model_dir), mean=m.get("reward_mean", 0.0),
                               std=m.get("reward_std", 1.0), normalize=normalize, max_length=max_length)

    @classmethod
    def from_folder(cls, folder: Path, tok, **kw) -> "AdapterReward":
        """A peft SEQ_CLS adapter folder (LoRA + score head in adapter_model.safetensors, as the reward stage's
        `adapter/`); `kw`: mean, std, normalize, max_length."""
        from peft import LoraConfig
        from safetensors.torch import load_file

        conf = LoraConfig.from_pretrained(str(folder))
        conf.task_type, conf.modules_to_save, conf.inference_mode = "CAUSAL_LM", None, True
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        heads = {k: v for k, v in tensors.items() if ".lora_" not in k and k.split(".")[-2] == "score"}
        weight = next((v for k, v in heads.items() if k.endswith("score.weight")), None)
        if weight is None:
            raise ArtifactError(f"{folder}: no score head in adapter_model.safetensors")
        bias = next((v for k, v in heads.items() if k.endswith("score.bias")), None)
        return cls(conf, {k: v for k, v in tensors.items() if k not in heads}, weight, score_bias=bias, tok=tok, **kw)

    def attach(self, trainer) -> None:
        trainer.add_frozen_adapter(self.name, self.config, self.weights)
        self.score.to(trainer.device)
        self.trainer = trainer

    def score_ids(self, query_ids, query_mask, response_ids, response_mask, has_eos):
        import torch

        t = self.trainer
        ids, mask = scoring_batch(query_ids, query_mask, response_ids, response_mask, has_eos, self.suffix_ids,
                                  self.max_length, t.tok.pad_token_id, t.device)
        hidden = t.role_hidden(self.name, ids, mask)
        with torch.no_grad():
            scores = self.score(hidden[:, -1].float()).squeeze(-1).cpu()
        return (scores - self.mean) / max(self.std, 1e-8) if self.normalize else scores


ADAPTER_DIR = "adapter"
"""The reward artifact's folder with the unmerged LoRA adapter + score head (peft layout)."""


# -- kind: judge ------------------------------------------------------------------------------------------------


class JudgeReward:
    """reward = P(completion beats the prompt's reference answer) - 0.5, in [-0.5, 0.5].

    A relative reward (Lee et al., 2023 score PPO rollouts with the judge against a baseline the same way):
    the judge only has to tell which of two answers is better, which small judges do far more reliably than
    giving an absolute score. Every prompt needs a `reference` (rows with `messages` ending with the
    assistant's answer, or a `reference` field).
    """

    def __init__(self, spec: JudgeSpec, inputs: dict, precision: str):
        from alignment.judges import build_judge

        self.judge = build_judge(spec, inputs, precision)
        self.__name__ = f"judge_reward:{getattr(self.judge, 'name', spec.kind)}"
        self.unparsed = 0

    def __call__(self, prompts, completions, reference: list[str | None] | None = None, **_fields) -> list[float]:
        if reference is None or any(not r for r in reference):
            raise ValueError("reward.kind 'judge' compares each completion with the prompt's reference answer, and "
                             "a prompt has none: use prompt rows with `reference` or `messages` ending with the "
                             "assistant's answer")
        verdicts = self.judge.compare(prompts, list(completions), list(reference))
        self.unparsed += sum(not v.parsed for v in verdicts)
        return [v.p_a - 0.5 for v in verdicts]
