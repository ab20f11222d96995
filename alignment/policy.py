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
import warnings
from contextlib import contextmanager
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
        chain.append(store.read(parent_path(Path(parent), store, _recorded_sha(chain[-1], parent))))
        if len(chain) > 16:
            raise ArtifactError(f"{art.path}: lineage longer than 16 artifacts (a cycle?)")
    return list(reversed(chain))


def parent_path(recorded: Path, store: ArtifactStore, manifest_sha256: str | None = None) -> Path:
    """Where a recorded upstream artifact is now: `<run>/<stage>` under the store being read, else as recorded.

    A store may have been moved or copied, and older manifests recorded the parent relative to the writer's working
    directory. The same `<run>/<stage>` in this store is taken only if its manifest is the one recorded (the
    child's `inputs` hash), so another run's artifact of the same name is never picked up by accident.
    """
    from alignment.manifest import sha256_file

    here = store.root / recorded.parent.name / recorded.name
    if (here / "manifest.json").is_file() and (manifest_sha256 is None or
                                               sha256_file(here / "manifest.json") == manifest_sha256):
        return here
    return recorded


def _recorded_sha(child: Artifact, recorded: str) -> str | None:
    """The manifest hash the child recorded for the input at `recorded` (None if it did not list it)."""
    tail = Path(recorded).parts[-2:]  # <run>/<stage>: inputs and lineage may spell the root differently
    return next((i.manifest_sha256 for i in child.manifest.inputs.values() if Path(i.path).parts[-2:] == tail), None)


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
    with readable_weights(chain[0]):
        model = load_causal_lm(chain[0].model_dir, precision, trust_remote_code)
    for adapter in chain[1:]:
        if adapter_type(adapter) == BOTTLENECK_TYPE:
            from alignment import bottleneck

            with readable_weights(adapter):
                return bottleneck.load(model, adapter.model_dir)
        with warnings.catch_warnings(), readable_weights(adapter):
            # peft warns that merging a LoRA on a tied lm_head is unsafe; untie_adapted_lm_head makes it exact.
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer")
            model = PeftModel.from_pretrained(model, adapter.model_dir)
        if adapter_type(adapter) in SOFT_PROMPT_PEFT_TYPES:
            return model.eval()
        model = merge_adapter(model)
    # peft loads adapters for inference and freezes every weight; once merged, the policy should
    # behave like any freshly loaded model, so a full/freeze stage on top trains what it selects.
    return model.requires_grad_(True)


@contextmanager
def readable_weights(art: Artifact):
    """A weights file of `art` that does not parse is one line naming it. Verification cannot catch every such file:
    one truncated with its manifest entry rewritten to match verifies, and safetensors' own message names no file."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ArtifactError(f"{_unreadable_weights(art.model_dir)}: not a readable safetensors file ({e}); re-run "
                            f"stage '{art.stage}' with --force") from None


def _unreadable_weights(folder: Path) -> Path:
    """The first `*.safetensors` in `folder` whose header does not parse (only headers are read), else the folder."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return path
    return folder


def merge_adapter(peft_model):
    """`merge_and_unload`, exact also when the adapter changes a tied `lm_head` (see `untie_adapted_lm_head`)."""
    untie_adapted_lm_head(peft_model)
    return peft_model.merge_and_unload()


def untie_adapted_lm_head(peft_model) -> bool:
    """Give `lm_head` its own weight before merging an adapter that changes it, if it shares the embeddings'.

    With tied embeddings, the trained policy computes logits with (E + delta) but embeds tokens with E.
    Merging into the shared tensor would add delta to the embeddings too (the tiny PPO policy's logits moved
    by up to 1.9). Untied, the merged model is exactly the trained one; its config says tie_word_embeddings
    false, so save_pretrained writes both matrices and every loader keeps them apart.
    """
    import torch

    base = peft_model.get_base_model()
    head, emb = base.get_output_embeddings(), base.get_input_embeddings()
    inner = getattr(head, "base_layer", None)  # peft wraps an adapted module; the original keeps the weight
    if inner is None or emb is None or inner.weight is not getattr(emb, "weight", None):
        return False
    inner.weight = torch.nn.Parameter(inner.weight.detach().clone(), requires_grad=inner.weight.requires_grad)
    for cfg in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return True


def lineage_for(parent: Artifact, *, adapter: bool, **extra) -> dict:
    """What a stage writes into its manifest's lineage."""
    # Absolute: a relative artifact root would otherwise tie the lineage to the writer's working directory.
    return {"parent": str(parent.path.resolve()), "adapter": adapter, "parent_stage": parent.stage, **extra}


MERGED_DIR = ".merged"
"""Under `<run>/`: each adapter parent's merged weights, `<stage>-<manifest sha256[:16]>/`, written once per run."""


def parent_weights(parent: Artifact, run_dir: Path) -> Path:
    """A folder of full weights that is exactly `parent`'s policy, for an adapter trained on it to name as its base.

    A full-weight artifact is its own `model/`; SFT with `merge: true` has `merged/`. An adapter parent without
    one gets its merged weights written once per run to `<run_dir>/.merged/<stage>-<manifest hash>/` (the run
    being written; atomic rename; dpo, ppo and grpo on the same SFT share it). Keyed by the parent's manifest hash,
    a re-run parent gets a new folder, so an older adapter never silently names the newer parent.
    """
    if not parent.manifest.lineage.get("adapter"):
        return parent.model_dir.resolve()
    merged = parent.path / "merged"
    if (merged / "config.json").is_file():
        return merged.resolve()
    require_mergeable(parent, needed_by="an adapter's base folder")
    folder = Path(run_dir) / MERGED_DIR / f"{parent.stage}-{parent.manifest_sha256[:16]}"
    # A symlinked `.merged` would put the weights, and the path the adapter names as its base, outside the store.
    folder = ArtifactStore(Path(run_dir).parent).check_under_root(folder).resolve()
    if (folder / "config.json").is_file():
        return folder
    import os
    import tempfile

    from alignment.models import load_tokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model = load_policy(parent, "fp32")
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(parent.model_dir).save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"merged_from": str(parent.path.resolve()),
                                                 "manifest_sha256": parent.manifest_sha256}, indent=2))
    try:
        os.rename(tmp, folder)
    except OSError:  # another stage on the same parent published it first: theirs is identical
        from alignment.artifacts import remove_tree

        remove_tree(tmp)
    return folder


def _published_location(adapter_dir: Path, parent: Artifact) -> tuple[Path, str, Path]:
    """(run folder, stage, where adapter_dir will be once published) for an adapter written inside a stage.

    Stages write into `<run>/<stage>.partial/...` (e.g. `model/`, or online DPO's `rounds/<i>/model/`), which the
    runner renames to `<run>/<stage>/...`. Outside a partial folder (a script, a test), the adapter stays where
    it is and its run is taken to be the parent's.
    """
    for folder in adapter_dir.parents:
        if folder.name.endswith(".partial"):
            stage = folder.name[: -len(".partial")]
            return folder.parent, stage, folder.parent / stage / adapter_dir.relative_to(folder)
    return parent.path.resolve().parent, adapter_dir.parent.name, adapter_dir


def point_adapter_at_parent(adapter_dir, parent: Artifact) -> None:
    """Make an adapter load the ecosystem way: `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`.

    peft records the folder the weights were loaded from (for DPO/PPO the raw base, or a relative path) as the
    adapter's base. The adapter was trained on `parent`'s policy, so name a real folder holding exactly that
    (`parent_weights`), as an absolute path that resolves from any working directory. Also replaces peft's
    empty README template with a model card saying what the adapter is and how to load it.
    """
    adapter_dir = Path(adapter_dir).resolve()
    run_dir, stage, final = _published_location(adapter_dir, parent)
    target = parent_weights(parent, run_dir)
    path = adapter_dir / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf["base_model_name_or_path"] = str(target)
    path.write_text(json.dumps(conf, indent=2, sort_keys=True))
    write_adapter_card(adapter_dir, final, run_dir.name, stage, parent, target, conf.get("peft_type", "adapter"))


def write_adapter_card(adapter_dir: Path, final: Path, run: str, stage: str, parent: Artifact, base_folder: Path,
                       peft_type: str) -> None:
    """A huggingface_hub model card for an adapter artifact (metrics come later: `align export` adds them)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="peft", pipeline_tag="text-generation", base_model=str(base_folder),
                         tags=["align", stage, peft_type.lower()])
    content = (f"---\n{data.to_yaml()}\n---\n\n# {run}/{stage}: {peft_type} adapter\n\n"
               f"Trained by the `{stage}` stage of the `align` pipeline (run `{run}`) on top of the `{parent.stage}` "
               f"artifact `{parent.path.resolve()}` (manifest sha256 `{parent.manifest_sha256}`).\n\n"
               f"Its base, `{base_folder}`, holds exactly the `{parent.stage}` policy as full weights, so\n\n"
               "```python\nfrom peft import AutoPeftModelForCausalLM\n"
               f"model = AutoPeftModelForCausalLM.from_pretrained(\"{final}\")\n"
               "```\n\ngives the trained policy. `align export " f"{run} {stage}" "` writes a standalone merged "
               "folder (or GGUF) with lineage and metrics; the stage's `manifest.json` records the config, "
               "inputs and hashes.\n")
    ModelCard(content).save(adapter_dir / "README.md")


def save_on_parent(model, tok, folder, parent: Artifact, *, adapter: bool) -> None:
    """Save a policy trained on `parent`'s policy (+ tokenizer); an adapter is pointed at that parent's weights."""
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    if adapter:
        point_adapter_at_parent(folder, parent)
