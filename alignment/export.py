"""`align export RUN STAGE [--format hf|gguf] [--out PATH]`: a policy artifact as a standalone model.

- `hf`: one folder any transformers user loads with `AutoModelForCausalLM.from_pretrained`: the policy with its
  whole lineage merged (`alignment.policy.load_policy`: base + SFT + DPO/PPO adapters, a tied lm_head untied
  where an adapter changed it), safetensors, the tokenizer with its chat template, `generation_config.json`
  (eos/pad/bos from the tokenizer), and a model card (huggingface_hub `ModelCard`) carrying the lineage (stages,
  inputs, manifest and config hashes) and each stage's key metrics from the manifests.
- `gguf`: that folder converted to one GGUF file (f32, exact) that llama.cpp and its servers load. The `gguf`
  package writes the file and maps tensor names (`TensorNameMap`); llama.cpp's own converter is not in any
  installed package, so the few architecture-specific steps (Llama family: Llama, SmolLM2, Mistral without
  sliding window) are here. Other architectures are refused with the alternative.

Nothing is written in place: the export goes to a temporary sibling and is renamed into place, and an existing
destination is refused rather than overwritten. Default destinations: `<run>/exports/<stage>/` and
`<run>/exports/<stage>.gguf` (the stage folder itself is a published artifact and stays untouched).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from alignment.artifacts import Artifact, ArtifactStore
from alignment.errors import AlignError
from alignment.outputs import check_output, published_stage

log = logging.getLogger("align")
# Per stage, the metrics a reader wants first (dotted: nested keys). Others stay in the manifests.
KEY_METRICS = {
    "sft": ("eval_loss", "perplexity", "train_loss", "steps", "method"),
    "reward": ("eval_accuracy", "heldout_phrasings_accuracy", "accuracy", "ece", "eval_ece"),
    "dpo": ("eval.rewards/accuracies", "eval.rewards/margins", "eval.dpo/prefers_chosen_sum",
            "eval.sft/prefers_chosen_sum", "eval.kl_seq", "train_loss", "steps"),
    "ppo": ("algorithm", "eval_reward.first", "eval_reward.last", "eval_gold.last", "kl.last",
            "missing_eos_rate.last", "updates", "steps", "train_loss"),
}
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")


class ExportError(AlignError):
    """A stage that cannot be exported, or a destination that would be overwritten."""


def export(root, run: str, stage: str, fmt: str = "hf", out: str | None = None, force: bool = False) -> Path:
    """Write the export and return its path. `force`: replace an earlier export there (only one: an hf folder with
    its model card and config, or a GGUF file), once the new one is written."""
    if fmt not in ("hf", "gguf"):
        raise ExportError(f"export: --format must be hf or gguf, not '{fmt}'")
    from alignment.runner import STAGES

    if stage not in STAGES:
        raise ExportError(f"export: unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    store = ArtifactStore(root)
    art = store.read_stage(run, stage, needed_by="export")
    _require_policy(art)
    default = store.root / run / "exports" / (stage if fmt == "hf" else f"{stage}.gguf")
    dest = Path(out) if out else default
    if dest.exists() and not force:
        raise ExportError(f"export: {dest} already exists; pass --force to replace it, or --out elsewhere")
    if dest.exists() and not _is_export(dest, fmt):
        raise ExportError(f"export: {dest} exists and is not an earlier {fmt} export; --force replaces only one")
    # Never into a published stage folder: its manifest lists all it may hold.
    stage_folder = published_stage(dest)
    if stage_folder is not None:
        raise ExportError(f"export: --out {dest}: inside the published artifact {stage_folder}; write it outside")
    if not dest.exists():
        check_output(dest, "--out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as tmp:
        folder = Path(tmp) / "hf"
        write_hf(art, folder, store)
        new = folder
        if fmt == "gguf":
            new = Path(tmp) / "model.gguf"
            write_gguf(folder, new, name=f"{run}-{stage}")
            new.chmod(0o644)
        if dest.exists():  # the old export goes into the temporary folder, removed with it
            os.rename(dest, Path(tmp) / "replaced")
        os.rename(new, dest)
    log.info("[export] %s/%s -> %s", run, stage, dest)
    return dest


def _is_export(path: Path, fmt: str) -> bool:
    """What `export` writes: a folder with a model card and a config, or a GGUF file."""
    if fmt == "hf":
        return path.is_dir() and not path.is_symlink() and (path / "README.md").is_file() and \
            (path / "config.json").is_file()
    if not path.is_file() or path.is_symlink():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _require_policy(art: Artifact) -> None:
    """A causal-LM policy (base, sft, dpo, ppo/grpo/rloo, online_dpo, ...), not a reward model or a data stage."""
    from alignment.policy import is_mergeable, lineage_chain

    def causal(a: Artifact) -> bool:
        if a.manifest.lineage.get("adapter"):
            conf = json.loads((a.model_dir / "adapter_config.json").read_text())
            return conf.get("task_type") in (None, "CAUSAL_LM")
        cfg = a.model_dir / "config.json"
        return cfg.is_file() and any(str(x).endswith("ForCausalLM")
                                     for x in json.loads(cfg.read_text()).get("architectures") or [])

    if not (art.model_dir.is_dir() and all(causal(a) for a in lineage_chain(art))):
        raise ExportError(f"export: {art.path} is a '{art.stage}' artifact without a causal-LM policy in model/ "
                          "(a reward model or a data stage); export a policy stage such as sft, dpo or ppo")
    if not is_mergeable(art):
        raise ExportError(f"export: {art.path} ends in a soft-prompt adapter (virtual tokens, not weights), which "
                          "cannot be merged into a standalone model; load it with alignment.policy.load_policy, "
                          "or train the stage with peft.method lora")


def write_hf(art: Artifact, folder: Path, store: ArtifactStore) -> None:
    """The merged policy, tokenizer (chat template included), generation config and model card in `folder`."""
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy

    model = load_policy(art, "fp32")
    tok = load_tokenizer(art.model_dir)
    if not tok.chat_template:
        raise ExportError(f"export: the tokenizer in {art.model_dir} has no chat template; the exported model "
                          "would not know how to format a conversation")
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    model_card(art, store).save(folder / "README.md")
    for f in folder.iterdir():  # some writers create 0600 files; an export is meant to be shared
        f.chmod(0o644)


# -- the model card -------------------------------------------------------------------------------------------------
def lineage_records(art: Artifact, store: ArtifactStore) -> list[dict]:
    """Every artifact the policy descends from or was trained with, oldest first, each with its hashes."""
    from alignment.policy import parent_path, lineage_chain

    seen, out = set(), []

    def add(a: Artifact) -> None:
        if str(a.path.resolve()) in seen:
            return
        for inp in a.manifest.inputs.values():  # inputs first: the list reads in the order things were made
            try:
                add(store.read(parent_path(Path(inp.path), store, inp.manifest_sha256), verify=False))
            except AlignError:
                out.append({"stage": inp.stage, "path": inp.path, "manifest_sha256": inp.manifest_sha256,
                            "note": "no longer in the store"})
        seen.add(str(a.path.resolve()))
        m = a.manifest
        out.append({"stage": m.stage, "run": m.run, "path": str(a.path.resolve()), "manifest_sha256": a.manifest_sha256,
                    "config_hash": m.config_hash, "inputs": {k: v.manifest_sha256 for k, v in m.inputs.items()},
                    "method": m.lineage.get("method") or m.metrics.get("algorithm") or m.metrics.get("method"),
                    "finished_at": m.finished_at, "metrics": key_metrics(m.stage, m.metrics)})

    for a in lineage_chain(art, store):
        add(a)
    return out


def key_metrics(stage: str, metrics: dict) -> dict:
    """The stage's headline figures (KEY_METRICS); for another stage, its top-level numbers (at most 8)."""
    def get(path: str):
        node = metrics
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    if stage in KEY_METRICS:
        picked = {k: get(k) for k in KEY_METRICS[stage]}
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in picked.items() if v is not None}
    nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return dict(list(nums.items())[:8])


def model_card(art: Artifact, store: ArtifactStore):
    from huggingface_hub import ModelCard, ModelCardData

    m = art.manifest
    records = lineage_records(art, store)
    base = m.base_model.name if m.base_model else None
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", model_name=f"{m.run}-{m.stage}",
                         base_model=base if base and "/" in base and not Path(base).exists() else None,
                         tags=["align", *dict.fromkeys(r["stage"] for r in records)],
                         align={"run": m.run, "stage": m.stage, "manifest_sha256": art.manifest_sha256,
                                "base_fingerprint": m.base_model.fingerprint if m.base_model else None,
                                "lineage": records})
    rows = "\n".join(f"| {r['stage']} | {r.get('method') or ''} | `{r['manifest_sha256'][:12]}` | "
                     f"`{(r.get('config_hash') or '')[:12]}` | "
                     + ", ".join(f"{k} {v}" for k, v in (r.get("metrics") or {}).items()) + " |" for r in records)
    text = (f"---\n{data.to_yaml()}\n---\n\n# {m.run}/{m.stage}\n\n"
            f"A policy trained by the `align` pipeline (run `{m.run}`, stage `{m.stage}`), exported with "
            f"`align export {m.run} {m.stage}`: every adapter of its lineage merged into one set of weights.\n"
            f"Base model: `{base or 'unknown'}`.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntok = AutoTokenizer.from_pretrained(PATH)\n"
            "prompt = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi\"}], add_generation_prompt=True, "
            "return_tensors=\"pt\")\n```\n\n"
            "## Lineage and key metrics\n\nOldest first; hashes are sha256 of each stage's `manifest.json` and of its "
            "resolved config (the full record is under `align:` in this card's metadata).\n\n"
            "| stage | method | manifest | config | key metrics |\n|---|---|---|---|---|\n" + rows + "\n")
    return ModelCard(text)


# -- GGUF -----------------------------------------------------------------------------------------------------------
def write_gguf(hf_dir: Path, out_file: Path, *, name: str) -> None:
    """Convert a Llama-family safetensors folder (written by `write_hf`) to an f32 GGUF file."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in LLAMA_FAMILY or cfg.get("sliding_window"):
        raise ExportError(f"export: GGUF export supports {', '.join(LLAMA_FAMILY)} (no sliding window), not {arch}; "
                          "export --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _gguf_hparams(writer, cfg, name)
    _gguf_vocab(writer, hf_dir, cfg["vocab_size"])
    _gguf_tensors(writer, hf_dir, cfg)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _gguf_hparams(writer, cfg: dict, name: str) -> None:
    import gguf

    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ExportError(f"export: GGUF export handles plain RoPE, not {rope.get('rope_type') or cfg['rope_scaling']}"
                          "; export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])


def _pre_tokenizer(tj: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenisation (how text is split before BPE)."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    raise ExportError(f"export: GGUF export knows the GPT-2 and SmolLM byte-level pre-tokenizers, not {pre}; export "
                      "--format hf and convert it with llama.cpp's convert_hf_to_gguf.py")


def _gguf_vocab(writer, hf_dir: Path, vocab_size: int) -> None:
    import gguf

    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    if tj["model"]["type"] != "BPE" or tj["model"].get("byte_fallback"):
        raise ExportError("export: GGUF export handles byte-level BPE tokenizers (GPT-2 style) only; export "
                          "--format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    vocab = dict(tj["model"]["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    vocab.update({c: t["id"] for c, t in added.items()})
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have more rows than the tokenizer has tokens: pad them
        tok = by_id.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if tok is None else
                     gguf.TokenType.CONTROL if added.get(tok, {}).get("special") else
                     gguf.TokenType.USER_DEFINED if tok in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _permute_qk(w, heads: int):
    """HF stores the query/key rows with RoPE's two halves apart (rotate_half); llama.cpp wants them interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(writer, hf_dir: Path, cfg: dict) -> None:
    import gguf
    import numpy as np
    from safetensors import safe_open

    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    files = sorted(hf_dir.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ExportError(f"export: no GGUF name for tensor {key} of {path.name}")
                data = f.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute_qk(data, heads)
                elif key.endswith("k_proj.weight"):
                    data = _permute_qk(data, kv_heads)
                writer.add_tensor(new, np.ascontiguousarray(data, dtype=np.float32))
    # A tied lm_head is not stored: llama.cpp then uses token_embd as the output matrix, as the model does.


def export_command(args) -> int:
    print(export(args.artifacts, args.run_name, args.stage, args.format, args.out, force=args.force))
    return 0

