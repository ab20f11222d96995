"""`align export`: the tiny SFT policy as a standalone HF folder (loads with AutoModelForCausalLM, same logits as
`load_policy`, a model card with lineage and metrics) and as a GGUF file that the real llama.cpp server serves.

The llama.cpp parts are skipped when llama-cpp-python[server] is not installed (scripts/install-llama-server.sh),
unless ALIGN_REQUIRE_SERVICES=1 (CI), as in tests/test_judge_server.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.error
import urllib.request

import pytest
from llama_server import llama_server
import torch

from alignment.artifacts import ArtifactStore
from alignment.cli import main
from alignment.policy import load_policy

QUESTION = [{"role": "user", "content": "Name three rivers, please: 12345."}]


def _need_llama_cpp(server: bool = False) -> None:
    missing = importlib.util.find_spec("llama_cpp") is None or (
        server and importlib.util.find_spec("llama_cpp.server") is None)
    if missing:
        if os.environ.get("ALIGN_REQUIRE_SERVICES") == "1":
            pytest.fail("llama-cpp-python[server] is not installed (ALIGN_REQUIRE_SERVICES=1)")
        pytest.skip("llama-cpp-python[server] is not installed; scripts/install-llama-server.sh builds it")


@pytest.fixture(scope="module")
def sft(tiny_store):
    root, run = tiny_store
    return ArtifactStore(root).read_stage(run, "sft")


@pytest.fixture(scope="module")
def exported(tiny_store, tmp_path_factory):
    """{format: path} of the tiny SFT policy exported both ways (outside the shared store)."""
    root, run = tiny_store
    out = tmp_path_factory.mktemp("export")
    paths = {"hf": out / "sft-hf", "gguf": out / "sft.gguf"}
    for fmt, path in paths.items():
        assert main(["export", run, "sft", "--format", fmt, "--out", str(path), "--artifacts", str(root)]) == 0
    return paths


def _chat_ids(tok) -> list[int]:
    return tok(tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)).input_ids


def test_hf_export_loads_with_plain_transformers_and_is_the_policy(exported, sft, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = exported["hf"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not any(n.startswith("adapter") for n in names)  # merged, standalone
    monkeypatch.chdir(tmp_path)
    model, tok = AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(QUESTION, tokenize=False)
    gen = GenerationConfig.from_pretrained(str(folder))
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id != tok.eos_token_id

    ids = torch.tensor([_chat_ids(tok)])
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, load_policy(sft, "fp32").eval()(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-5


def test_model_card_carries_lineage_hashes_and_metrics(exported, sft):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported["hf"] / "README.md")
    align = card.data.align
    assert align["stage"] == "sft" and align["manifest_sha256"] == sft.manifest_sha256
    stages = [r["stage"] for r in align["lineage"]]
    assert stages == ["base", "sft"]
    rec = align["lineage"][1]
    assert rec["config_hash"] == sft.manifest.config_hash
    assert rec["inputs"]["base"] == sft.manifest.inputs["base"].manifest_sha256
    assert rec["metrics"]["eval_loss"] == pytest.approx(sft.manifest.metrics["eval_loss"], rel=1e-4)
    assert f"`{sft.manifest_sha256[:12]}`" in card.text and "More Information Needed" not in card.text


def test_gguf_has_the_same_tokens_and_logits_in_llama_cpp(exported):
    _need_llama_cpp()
    import llama_cpp
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = exported["hf"]
    tok, model = AutoTokenizer.from_pretrained(hf), AutoModelForCausalLM.from_pretrained(hf).eval()
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tok(text).input_ids
    llm = llama_cpp.Llama(model_path=str(exported["gguf"]), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # same tokenizer, specials included
    llm.eval(ids)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    # f32 weights; llama.cpp sums in another order. A wrong q/k permutation or tied head is off by ~1.
    assert np.abs(np.array(llm.scores[: len(ids)]) - want).max() < 2e-3


def test_gguf_answers_through_the_llama_cpp_server(exported, tmp_path):
    _need_llama_cpp(server=True)
    with llama_server(exported["gguf"], tmp_path / "server.log", n_ctx=512) as url:
        body = json.dumps({"messages": QUESTION, "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert answer["usage"]["completion_tokens"] >= 1 and choice["finish_reason"] in ("stop", "length")
    # The server formatted the conversation with the exported chat template (ChatML), not a fallback.
    assert answer["usage"]["prompt_tokens"] > len(QUESTION[0]["content"].split())


def test_export_refuses_a_non_policy_and_never_overwrites(tiny_store, exported, capsys):
    root, run = tiny_store
    before = (exported["hf"] / "model.safetensors").stat().st_mtime_ns
    assert main(["export", run, "sft", "--out", str(exported["hf"]), "--artifacts", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --force" in err[0] and str(exported["hf"]) in err[0]
    assert (exported["hf"] / "model.safetensors").stat().st_mtime_ns == before
    assert main(["export", run, "reward", "--artifacts", str(root)]) == 2  # no reward artifact in this store
    assert "export needs the 'reward' artifact" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: the choices are named in the usage error
        main(["export", run, "base", "--format", "onnx", "--artifacts", str(root)])
    assert e.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


def test_force_replaces_an_earlier_export_only(tiny_store, tmp_path, capsys):
    """After re-training, `--force` refreshes the export; a folder or file that is not an export stays untouched."""
    root, run = tiny_store
    hf, gguf, mine = tmp_path / "hf", tmp_path / "m.gguf", tmp_path / "mine"
    for path, fmt in ((hf, "hf"), (gguf, "gguf")):
        assert main(["export", run, "sft", "--format", fmt, "--out", str(path), "--artifacts", str(root)]) == 0
    (hf / "stale.txt").write_text("from the earlier export")
    gguf_before = gguf.stat().st_mtime_ns
    for path, fmt in ((hf, "hf"), (gguf, "gguf")):
        assert main(["export", run, "sft", "--format", fmt, "--out", str(path), "--artifacts", str(root),
                     "--force"]) == 0
    assert not (hf / "stale.txt").exists() and (hf / "model.safetensors").is_file()
    assert gguf.stat().st_mtime_ns != gguf_before and gguf.read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the replaced exports went with the temp
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's folder")
    capsys.readouterr()
    assert main(["export", run, "sft", "--out", str(mine), "--artifacts", str(root), "--force"]) == 2
    assert "is not an earlier hf export" in capsys.readouterr().err and (mine / "notes.txt").is_file()


def test_help_names_every_policy_stage(capsys):
    from alignment.runner import STAGES

    with pytest.raises(SystemExit) as e:
        main(["export", "-h"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert e.value.code == 0
    # Every stage but the reward model and the data/eval stages ends in a causal-LM policy that export merges.
    for stage in set(STAGES) - {"reward", "label", "eval", "generate"}:
        assert stage in text, stage
    assert "RLOO" in text  # `algorithm: rloo` runs as the grpo stage
