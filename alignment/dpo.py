"""DPO helpers: which loss accepts which option, sequence log-probs, preference metrics, KL.

Direct Preference Optimisation (Rafailov et al., 2023) trains a policy pi against a frozen
reference pi_ref on pairs (x, y_w, y_l). Its implicit reward is

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)),

so everything the DPO stage measures reduces to four per-pair numbers: the summed response
log-probs of chosen and rejected under the policy and under the reference. The functions here
compute those numbers and the metrics built on them; they take models and tensors, never a
stage config, so tests can check them against hand-worked values.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# -- which TRL 1.16 loss accepts which option ------------------------------------------------------


@dataclass(frozen=True)
class LossSupport:
    """What one of TRL's DPO losses does with our options."""

    paper: str
    label_smoothing: tuple[float, float] | None = None
    """Allowed range [low, high) of `label_smoothing`; None: the loss ignores it."""
    smoothing_required: bool = False
    """The loss is undefined at label_smoothing = 0 (EXO takes log(eps))."""
    soft_labels: bool = False
    """Per-pair `p_chosen` targets are applied (our conservative-DPO term, see `soft_label_term`)."""


LOSSES: dict[str, LossSupport] = {
    "sigmoid": LossSupport("DPO, Rafailov et al. 2023", soft_labels=True),
    "hinge": LossSupport("SLiC, Zhao et al. 2023"),
    "ipo": LossSupport("IPO, Azar et al. 2023 (beta is tau)"),
    "exo_pair": LossSupport("EXO, Ji et al. 2024", label_smoothing=(0.0, 1.0), smoothing_required=True),
    "nca_pair": LossSupport("NCA, Chen et al. 2024"),
    "robust": LossSupport("Robust DPO, Ray Chowdhury et al. 2024 (label_smoothing = flip rate)",
                          label_smoothing=(0.0, 0.5)),
    "bco_pair": LossSupport("BCO, Jung et al. 2024"),
    "sppo_hard": LossSupport("SPPO (hard labels), Wu et al. 2024"),
    "aot": LossSupport("AOT, Melnyk et al. 2024", label_smoothing=(0.0, 1.0)),
    "aot_unpaired": LossSupport("AOT unpaired, Melnyk et al. 2024", label_smoothing=(0.0, 1.0)),
    "apo_zero": LossSupport("APO-zero, D'Oosterlinck et al. 2024"),
    "apo_down": LossSupport("APO-down, D'Oosterlinck et al. 2024"),
    "discopop": LossSupport("DiscoPOP, Chris Lu et al. 2024"),
    "sigmoid_norm": LossSupport("length-normalised DPO"),
    "sft": LossSupport("negative log-likelihood of chosen (RPO/MPO mixing term)"),
}
"""TRL 1.16 `DPOTrainer` loss types (trl/trainer/dpo_trainer.py, `_compute_loss`) and their options.

Note TRL 1.16's `sigmoid` ignores `label_smoothing` (older TRL applied cDPO there): accepting
it would silently train plain DPO, so `loss_problems` refuses it and points at the losses that
use it, or at per-pair soft labels.
"""


def loss_problems(loss_types: list[str], loss_weights: list[float] | None, label_smoothing: float,
                  soft_labels: bool, beta: float) -> list[tuple[str, str]]:
    """Impossible option combinations as (key path, message); key paths are in the DPO stage config."""
    out: list[tuple[str, str]] = []
    unknown = [t for t in loss_types if t not in LOSSES]
    for t in unknown:
        out.append(("dpo.loss_type", f"unknown loss '{t}'; TRL 1.16 supports: {', '.join(LOSSES)}"))
    known = [t for t in loss_types if t in LOSSES]
    if not loss_types:
        out.append(("dpo.loss_type", "expected at least one loss"))
    if len(set(loss_types)) != len(loss_types):
        out.append(("dpo.loss_type", f"a loss is listed twice in {loss_types}; give it one weight instead"))
    if known == ["sft"]:
        out.append(("dpo.loss_type", "'sft' alone is supervised fine-tuning, not preference optimisation; "
                                     "combine it (e.g. [sigmoid, sft] with loss_weights) or use the sft stage"))
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        out.append(("dpo.loss_weights", f"{len(loss_weights)} weights for {len(loss_types)} losses "
                                        f"({loss_types}); give one weight per loss"))
    if beta <= 0:
        out.append(("dpo.beta", f"must be > 0 (it scales the implicit reward), got {beta}"))

    smoothing_losses = [t for t in known if LOSSES[t].label_smoothing is not None]
    if label_smoothing != 0.0 and not smoothing_losses:
        out.append(("dpo.label_smoothing",
                    f"loss_type {known} ignores label_smoothing={label_smoothing} in TRL 1.16; "
                    "use loss_type 'robust' (flip rate in [0, 0.5)), 'exo_pair' or 'aot', "
                    "or per-pair soft labels (data.soft_labels: true with loss_type 'sigmoid'), "
                    "or set label_smoothing: 0"))
    for t in smoothing_losses:
        lo, hi = LOSSES[t].label_smoothing
        if not lo <= label_smoothing < hi:
            out.append(("dpo.label_smoothing", f"loss_type '{t}' needs label_smoothing in [{lo}, {hi}), "
                                               f"got {label_smoothing}"))
        elif LOSSES[t].smoothing_required and label_smoothing == 0.0:
            out.append(("dpo.label_smoothing", f"loss_type '{t}' needs label_smoothing > 0 (the EXO paper "
                                               "uses 1e-3); set dpo.label_smoothing: 0.001"))
    if soft_labels:
        unsupported = [t for t in known if not LOSSES[t].soft_labels and t != "sft"]
        if unsupported or "sigmoid" not in known:
            out.append(("data.soft_labels", f"per-pair soft labels (p_chosen) apply to loss_type 'sigmoid' "
                                            f"only, got loss_type {known}; set dpo.loss_type: sigmoid or "
                                            "data.soft_labels: false"))
        if label_smoothing != 0.0:
            out.append(("data.soft_labels", "soft labels and dpo.label_smoothing both soften the target; "
                                            "use one (set dpo.label_smoothing: 0)"))
    return out


# -- soft labels (conservative DPO) ----------------------------------------------------------------


def soft_sigmoid_loss(delta: "torch.Tensor", p_chosen: "torch.Tensor", beta: float) -> "torch.Tensor":
    """Per-pair DPO loss with target probability p that chosen is better (cDPO, Mitchell 2023).

    delta = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).
    loss = -p log sigmoid(beta delta) - (1 - p) log sigmoid(-beta delta); p = 1 is plain DPO.
    """
    import torch.nn.functional as F

    return -p_chosen * F.logsigmoid(beta * delta) - (1 - p_chosen) * F.logsigmoid(-beta * delta)


def soft_label_term(delta: "torch.Tensor", p_chosen: "torch.Tensor", beta: float) -> "torch.Tensor":
    """What turns TRL's hard-label sigmoid loss into `soft_sigmoid_loss`, per pair.

    Since log sigmoid(x) - log sigmoid(-x) = x, the soft loss equals the hard one plus
    (1 - p) * beta * delta; adding this term keeps TRL's loss code (and its metrics) untouched.
    """
    return (1 - p_chosen) * beta * delta


def dpo_trainer_class(soft_labels: bool):
    """TRL's DPOTrainer, or a subclass that applies each pair's `p_chosen` as a soft target.

    TRL 1.16 drops every column but the token ids before batching and has no per-pair label, so
    the subclass keeps `p_chosen`, captures the sequence log-probs TRL computes anyway (forward
    hooks; no extra forward pass) and adds `soft_label_term` to the sigmoid part of the loss.
    """
    from trl import DPOTrainer

    if not soft_labels:
        return DPOTrainer

    class SoftLabelDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_collator = _KeepColumn(self.data_collator, "p_chosen")

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "p_chosen" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "p_chosen"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p_chosen = inputs.pop("p_chosen")
            policy_out, ref_out = [], []
            hooks = [model.register_forward_hook(lambda m, a, out: policy_out.append(out.log_probs))]
            if self.ref_model is not None:
                hooks.append(self.ref_model.register_forward_hook(lambda m, a, out: ref_out.append(out.log_probs)))
            try:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                for h in hooks:
                    h.remove()
            # A LoRA policy computes its reference with the same module (adapter off): 2nd call.
            seq_len = inputs["completion_mask"].shape[1] - 1
            chosen, rejected = policy_out[0][:, -seq_len:].sum(1).chunk(2)
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref = ref_out[0] if self.ref_model is not None else policy_out[1]
                ref_chosen, ref_rejected = ref[:, -seq_len:].sum(1).chunk(2)
            delta = (chosen - ref_chosen) - (rejected - ref_rejected)
            weight = self.loss_weights[self.loss_types.index("sigmoid")]
            extra = weight * soft_label_term(delta, p_chosen.to(delta), self.beta).mean()
            if return_outputs:
                return result[0] + extra, result[1]
            return result + extra

    return SoftLabelDPOTrainer


class _KeepColumn:
    """Wrap a collator so a per-pair float column survives batching as a tensor."""

    def __init__(self, collator, column: str):
        self.collator, self.column = collator, column

    def __call__(self, examples):
        import torch

        batch = self.collator(examples)
        if self.column in examples[0]:
            batch[self.column] = torch.tensor([float(e[self.column]) for e in examples])
        return batch


# -- sequence log-probs ------------------------------------------------------------------------------


def tokenize_pair(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) the way TRL's DPOTrainer tokenises a conversational pair.

    The response starts where the tokenised prompt (with the generation prompt) and the tokenised
    prompt + response first differ, so the template's assistant header stays in the prompt.
    """

    def ids(messages, **kw):
        return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    prompt = ids(pair["prompt"], add_generation_prompt=True)
    chosen = ids(pair["prompt"] + pair["chosen"])
    rejected = ids(pair["prompt"] + pair["rejected"])
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return prompt[:n], chosen[n:], rejected[n:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def masked_token_logps(logits: "torch.Tensor", input_ids: "torch.Tensor", response_mask: "torch.Tensor"):
    """Per-token log pi(token | prefix) of the response tokens, 0 elsewhere: shape (batch, seq - 1).

    Position t scores token t + 1 from logits at t (the usual causal shift).
    """
    import torch

    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = torch.gather(logps, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return token * response_mask[:, 1:].to(token.dtype)


def _pad_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, : len(s)] = torch.tensor(m)
    return ids, attn, resp


@dataclass
class PairLogps:
    """Summed response log-probs and response lengths (tokens) of each pair, as float tensors."""

    chosen: "torch.Tensor"
    rejected: "torch.Tensor"
    chosen_len: "torch.Tensor"
    rejected_len: "torch.Tensor"


def pair_logps(model, tok, pairs: list[dict], *, batch_size: int = 8, max_length: int | None = None) -> PairLogps:
    """log pi(chosen | prompt) and log pi(rejected | prompt), summed over response tokens.

    `batch_size` counts sequences per forward pass (a pair is two). Sequences longer than
    max_length are cut at the end (TRL's `keep_start`), so the numbers match what the trainer
    optimised. Log-softmax runs one sequence at a time: a float32 (seq, vocab) copy per row
    instead of per batch keeps a 49k-token vocabulary from dominating peak memory.
    """
    import torch

    from alignment.training import progress

    was_training = model.training
    model.eval()
    seqs, masks = [], []
    for prompt, chosen, rejected in (tokenize_pair(tok, p) for p in pairs):
        for resp in (chosen, rejected):
            s, m = prompt + resp, [0] * len(prompt) + [1] * len(resp)
            seqs.append(s[:max_length] if max_length else s)
            masks.append(m[:max_length] if max_length else m)
    sums, lens = [], []
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in progress(range(0, len(seqs), batch_size), "log-probs of pairs"):
                ids, attn, resp = (t.to(device) for t in _pad_batch(seqs[i: i + batch_size], masks[i: i + batch_size],
                                                                    tok.pad_token_id))
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                logits = logits[:, -ids.shape[1]:]  # prompt-learning adapters prepend virtual positions
                for r in range(ids.shape[0]):
                    sums.append(masked_token_logps(logits[r: r + 1], ids[r: r + 1], resp[r: r + 1]).sum().cpu())
                lens.append(resp[:, 1:].sum(-1).float().cpu())
    finally:
        model.train(was_training)
    s, n = torch.stack(sums).float(), torch.cat(lens)
    return PairLogps(chosen=s[0::2], rejected=s[1::2], chosen_len=n[0::2], rejected_len=n[1::2])


# -- metrics -----------------------------------------------------------------------------------------


def implicit_preference(lp: PairLogps) -> dict:
    """How often the model itself prefers chosen: log pi(y_w|x) - log pi(y_l|x) > 0.

    `sum`: summed response log-probs (what DPO's objective uses; favours short responses).
    `per_token`: each side divided by its token count (length-normalised; fairer when chosen and
    rejected differ in length, as in the bundled max_words / min_words pairs).
    """
    margin = lp.chosen - lp.rejected
    norm = lp.chosen / lp.chosen_len.clamp(min=1) - lp.rejected / lp.rejected_len.clamp(min=1)
    return {"prefers_chosen_sum": _mean(margin > 0), "prefers_chosen_per_token": _mean(norm > 0),
            "logp_margin_sum": _mean(margin), "logp_margin_per_token": _mean(norm)}


def reward_metrics(policy: PairLogps, reference: PairLogps, beta: float) -> dict:
    """DPO's implicit rewards on held-out pairs, named as TRL logs them during training."""
    chosen = beta * (policy.chosen - reference.chosen)
    rejected = beta * (policy.rejected - reference.rejected)
    return {"rewards/chosen": _mean(chosen), "rewards/rejected": _mean(rejected),
            "rewards/margins": _mean(chosen - rejected), "rewards/accuracies": _mean(chosen > rejected)}


def _mean(t) -> float:
    return round(float(t.float().mean()), 6) if t.numel() else float("nan")


def token_kl(policy_logits: "torch.Tensor", ref_logits: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """Exact KL(pi(.|prefix) || pi_ref(.|prefix)) over the vocabulary at each masked position.

    Logits are (..., seq, vocab), mask (..., seq); returns (..., seq) with zeros where mask is 0. Summing over a sequence sampled from pi
    gives an unbiased, low-variance estimate of the sequence-level KL (the Rao-Blackwellised
    form of the sampled log-ratio estimator: each step's KL is exact, only the prefix is sampled).
    """
    import torch

    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl * mask.to(kl.dtype)


def sampled_kl(policy, reference_ctx, tok, prompts: list[list[dict]], *, max_new_tokens: int,
               batch_size: int = 8, seed: int = 0) -> dict:
    """KL(pi || pi_ref) on held-out prompts: sample responses from pi, score each step under both.

    `reference_ctx()` is a context manager inside which `policy` computes the reference (a LoRA
    policy with its adapter disabled, yielding None), or that yields a separate reference model.
    Returns the mean sequence KL (nats per sampled response) and the mean KL per sampled token.
    """
    import torch

    from alignment.generation import GenerationSpec, generate
    from alignment.training import progress

    # Pure ancestral sampling in the weights' own precision: the estimator needs samples from pi itself.
    spec = GenerationSpec(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          batch_size=batch_size, autocast="off")
    ro = generate(policy, tok, prompts, spec, seed=seed)
    was_training = policy.training
    policy.eval()
    seq_kl = []
    try:
        for i in progress(range(0, len(prompts), batch_size), "KL on held-out prompts"):
            rows = ro.take(range(i, min(i + batch_size, len(prompts))))
            ids = torch.cat([rows.query_ids, rows.response_ids], dim=1)
            attn = torch.cat([rows.query_mask, rows.response_mask], dim=1)
            left = int((attn.sum(0) == 0).long().cumprod(0).sum())  # columns of padding in every row
            ids, attn, width = ids[:, left:], attn[:, left:], rows.query_ids.shape[1] - left
            # Positions count real tokens only, as during generation (left padding would shift them).
            pos_ids = (attn.cumsum(1) - 1).clamp(min=0)
            # Logits at position t predict token t + 1: the response is predicted from width - 1 on.
            pos = slice(width - 1, ids.shape[1] - 1)
            with torch.no_grad():
                p_logits = policy(input_ids=ids, attention_mask=attn, position_ids=pos_ids,
                                  use_cache=False).logits[:, -ids.shape[1]:][:, pos]
                with reference_ctx() as ref:
                    r_logits = (ref or policy)(input_ids=ids, attention_mask=attn, position_ids=pos_ids,
                                               use_cache=False).logits[:, -ids.shape[1]:][:, pos]
            for r in range(ids.shape[0]):  # one row at a time: float32 (len, vocab) copies stay small
                seq_kl.append(token_kl(p_logits[r], r_logits[r], rows.response_mask[r]).sum().cpu())
    finally:
        policy.train(was_training)
    seq = torch.stack(seq_kl).float()
    n_tok = int(ro.response_mask.sum())
    return {"kl_seq": round(float(seq.mean()), 6), "kl_per_token": round(float(seq.sum()) / max(n_tok, 1), 6),
            "kl_prompts": len(prompts), "kl_tokens": n_tok}


@contextlib.contextmanager
def adapter_disabled(peft_model):
    """The reference of a LoRA policy: the same module with its adapter switched off."""
    with peft_model.disable_adapter():
        yield None


@contextlib.contextmanager
def separate_reference(ref_model):
    yield ref_model


# -- provenance of the preference data ----------------------------------------------------------------


def data_record(source: str, split: str | None, rows: int) -> dict:
    """Where preference pairs came from, pinned by content: path + sha256 of the file (or folder)."""
    p = Path(source)
    rec = {"source": source, "rows": rows}
    if p.is_file():
        from alignment.manifest import sha256_file

        rec.update(path=str(p.resolve()), sha256=sha256_file(p))
    elif p.is_dir():
        rec.update(path=str(p.resolve()), sha256=_dir_sha256(p), split=split)
    else:
        # A hub dataset name: only its name and split pin it (no local bytes to hash).
        rec.update(split=split, sha256=None)
    return rec


def _dir_sha256(folder: Path) -> str:
    from alignment.manifest import sha256_file

    h = hashlib.sha256()
    for f in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
