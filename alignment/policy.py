"""Load a trained policy from the store by walking its lineage back to the base.

Each artifact's manifest says `lineage: {parent: <artifact path>, adapter: bool}`. An adapter
artifact's `model/` is a peft adapter on top of its parent's weights; a non-adapter artifact's
`model/` holds full weights. Loading merges the adapters in order onto one copy of the base,
so e.g. a DPO adapter trained on the merged SFT model loads back exactly as it was trained.

Soft-prompt adapters (prefix / prompt / P-tuning) cannot be merged into weights: they prepend virtual tokens or
key/value prefixes at run time. `load_policy` returns such an artifact as an unmerged PeftModel, which generates
and scores like a causal LM; it may only be the last link of a lineage. Stages that train a new adapter on top of
a policy (reward, DPO, PPO) call `require_mergeable` on their input first and refuse it with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignment.artifacts import Artifact, ArtifactStore
from alignment.errors import ArtifactError
from alignment.models import load_causal_lm


def lineage_chain(art: Artifact, store: ArtifactStore | None = None) -> list[Artifact]:
    """[root (full weights), adapter, adapter, ...] ending with `art`, each verified."""
    store = store or ArtifactStore(art.path.parent.parent)
    chain = [art]
    while chain[-1].manifest.lineage.get("adapter"):
        parent = chain[-1].manifest.lineage.get("parent")
        if not parent:
            raise ArtifactError(f"{chain[-1].path}: adapter artifact without a parent in its lineage")
        chain.append(store.read(Path(parent)))
        if len(chain) > 16:
            raise ArtifactError(f"{art.path}: lineage longer than 16 artifacts (a cycle?)")
    return list(reversed(chain))


# peft types that prepend virtual tokens / prefixes at run time instead of changing weights.
SOFT_PROMPT_PEFT_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
# Bottleneck adapters (alignment/bottleneck.py): extra layers with a non-linearity, not foldable into weights.
BOTTLENECK_TYPE = "BOTTLENECK"
UNMERGEABLE_TYPES = SOFT_PROMPT_PEFT_TYPES + (BOTTLENECK_TYPE,)


def adapter_type(art: Artifact) -> str | None:
    """The peft type of an adapter artifact (LORA, IA3, PROMPT_TUNING, ...); None for full weights."""
    if not art.manifest.lineage.get("adapter"):
        return None
    from alignment import bottleneck

    if bottleneck.is_bottleneck(art.model_dir):
        return BOTTLENECK_TYPE
    try:
        return json.loads((art.model_dir / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError):
        raise ArtifactError(f"{art.model_dir}: adapter artifact without a readable adapter_config.json") from None


def is_mergeable(art: Artifact) -> bool:
    """True when the whole lineage folds into one plain set of weights."""
    return all(adapter_type(a) not in UNMERGEABLE_TYPES for a in lineage_chain(art))


def require_mergeable(art: Artifact, needed_by: str) -> None:
    """Refuse, before any work, a policy a stage cannot train on top of (a soft-prompt SFT)."""
    for a in lineage_chain(art):
        kind = adapter_type(a)
        if kind in UNMERGEABLE_TYPES:
            method = a.manifest.lineage.get("method", kind.lower())
            why = ("bottleneck layers with a non-linearity, not foldable into the weights" if kind == BOTTLENECK_TYPE
                   else "virtual tokens, not weights")
            raise ArtifactError(
                f"{needed_by} needs a policy whose weights it can train, but {a.path} is a {method} adapter "
                f"({kind}: {why}, so it cannot be merged); re-run '{a.stage}' with "
                "peft.method lora, dora/rslora (use_dora/use_rslora), qlora, ia3, bitfit, freeze or full")


def load_policy(art: Artifact, precision: str, *, trust_remote_code: bool = False):
    """The artifact's policy: root weights with every adapter merged in.

    A plain causal LM, except when the last adapter is a soft prompt: then an unmerged (frozen) PeftModel
    around the merged rest, which `generate`s and returns logits the same way.
    """
    from peft import PeftModel

    chain = lineage_chain(art)
    for a in chain[1:-1]:
        if adapter_type(a) in UNMERGEABLE_TYPES:
            raise ArtifactError(f"{art.path}: its lineage holds the soft-prompt or bottleneck adapter {a.path} below "
                                "another adapter; it cannot be merged, so it can only be the last link")
    model = load_causal_lm(chain[0].model_dir, precision, trust_remote_code)
    for adapter in chain[1:]:
        if adapter_type(adapter) == BOTTLENECK_TYPE:
            from alignment import bottleneck

            return bottleneck.load(model, adapter.model_dir)
        model = PeftModel.from_pretrained(model, adapter.model_dir)
        if adapter_type(adapter) in SOFT_PROMPT_PEFT_TYPES:
            return model.eval()
        model = model.merge_and_unload()
    # peft loads adapters for inference and freezes every weight; once merged, the policy should
    # behave like any freshly loaded model, so a full/freeze stage on top trains what it selects.
    return model.requires_grad_(True)


def lineage_for(parent: Artifact, *, adapter: bool, **extra) -> dict:
    """What a stage writes into its manifest's lineage."""
    return {"parent": str(parent.path), "adapter": adapter, "parent_stage": parent.stage, **extra}


def point_adapter_at_parent(adapter_dir, sft) -> None:
    """peft records the folder the weights were loaded from (the raw base) as the adapter's base.

    That is the wrong model: the adapter was trained on base + SFT, and a peft loader that follows
    `base_model_name_or_path` would silently drop SFT. Point it at the SFT artifact's `merged/`
    full weights when the SFT stage wrote them (then `AutoPeftModelForCausalLM` loads exactly the
    trained policy); otherwise at a name no loader resolves, so it fails loudly instead.
    `alignment.policy.load_policy` follows the manifest's lineage and needs neither.
    """
    merged = sft.path / "merged"
    target = (str(merged.resolve()) if (merged / "config.json").is_file()
              else f"{sft.path.resolve()} (base + SFT adapter; load with alignment.policy.load_policy)")
    path = adapter_dir / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf["base_model_name_or_path"] = target
    path.write_text(json.dumps(conf, indent=2, sort_keys=True))


def save_on_parent(model, tok, folder, parent: Artifact, *, adapter: bool) -> None:
    """Save a policy trained on `parent`'s merged weights (+ tokenizer); an adapter is pointed at that parent."""
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    if adapter:
        point_adapter_at_parent(folder, parent)
