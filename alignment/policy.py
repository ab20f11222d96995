"""Load a trained policy from the store by walking its lineage back to the base.

Each artifact's manifest says `lineage: {parent: <artifact path>, adapter: bool}`. An adapter
artifact's `model/` is a peft adapter on top of its parent's weights; a non-adapter artifact's
`model/` holds full weights. Loading merges the adapters in order onto one copy of the base,
so e.g. a DPO adapter trained on the merged SFT model loads back exactly as it was trained.
"""

from __future__ import annotations

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


def load_policy(art: Artifact, precision: str, *, trust_remote_code: bool = False):
    """The artifact's policy as a plain causal LM: root weights with every adapter merged in."""
    from peft import PeftModel

    chain = lineage_chain(art)
    model = load_causal_lm(chain[0].model_dir, precision, trust_remote_code)
    for adapter in chain[1:]:
        model = PeftModel.from_pretrained(model, adapter.model_dir).merge_and_unload()
    return model


def lineage_for(parent: Artifact, *, adapter: bool, **extra) -> dict:
    """What a stage writes into its manifest's lineage."""
    return {"parent": str(parent.path), "adapter": adapter, "parent_stage": parent.stage, **extra}
