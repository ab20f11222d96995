"""Stage `generate` (Self-Instruct): the filters by hand, the stage on the tiny model (artifact contract, filter
counts, resume after a preemption without asking the generator again), SFT training on its rows through a
mixture, and the same against the real llama.cpp server (tests/test_judge_server.py starts it)."""

from __future__ import annotations

import json
import signal

import pytest

from alignment import gold, preemption
from alignment.cli import main
from alignment.selfinstruct import (FILTERS, FilterSpec, Pool, acceptance, clean_instruction, diversity, lcs_length,
                                    response_verdict, rouge_l, tokens, with_constraints)

CONFIG = "configs/tiny/generate.yaml"


# -- the pieces, with hand-worked numbers -----------------------------------------------------------------
def test_rouge_l_is_the_lcs_f1():
    a, b = tokens("Write a short poem about the sea"), tokens("write a poem about a quiet sea")
    # a: write a short poem about the sea (7); b: write a poem about a quiet sea (7);
    # LCS: write a poem about sea (5) -> F1 = 2 * 5 / 14.
    assert lcs_length(a, b) == 5
    assert rouge_l(a, b) == pytest.approx(10 / 14)
    assert rouge_l(a, a) == 1.0 and rouge_l(a, []) == 0.0
    assert rouge_l(tokens("a b c"), tokens("c b a")) == pytest.approx(2 * 1 / 6)


def test_pool_bound_never_skips_a_better_match():
    pool = Pool()
    for t in ["list three rivers in europe", "explain how a clock works", "describe the rivers of europe briefly"]:
        pool.add(t)
    text = "describe three rivers of europe"
    exact = max(rouge_l(tokens(text), tokens(t)) for t in
                ["list three rivers in europe", "explain how a clock works", "describe the rivers of europe briefly"])
    assert pool.max_rouge(text) == pytest.approx(exact)


def test_filters_and_their_order():
    spec = FilterSpec(min_response_words=2, max_response_words=10)
    cons = [{"type": "max_words", "n": 5}, {"type": "lowercase"}]
    assert response_verdict("one", cons, spec) == "response_length"
    assert response_verdict("I'm sorry, I cannot help with that.", [], spec) == "refusal"
    assert response_verdict("Rivers flow to the sea", cons, spec) == "gold"      # uppercase R
    assert response_verdict("rivers flow to the sea", cons, spec) is None
    assert response_verdict("rivers flow to the sea", cons, FilterSpec(gold=False)) is None
    assert clean_instruction('Task 9: "Name two birds."\nmore text') == "Name two birds."
    assert clean_instruction("3. Describe a cloud") == "Describe a cloud"
    prompt = with_constraints("Describe a cloud", [{"type": "end_with", "phrase": "The end."}, {"type": "lowercase"}])
    assert prompt == 'Describe a cloud. Write only in lowercase letters. End your response with the exact phrase "The end."'
    records = [{"dropped": d} for d in ["parse", "novelty", "novelty", "gold", None, None]]
    got = acceptance(records)
    assert [got[f]["entered"] for f in FILTERS] == [6, 5, 5, 3, 3, 3]
    assert got["novelty"] == {"entered": 5, "passed": 3, "rate": 0.6} and got["gold"]["passed"] == 2
    div = diversity(["Write a poem", "write a story", "List three birds"])
    assert div["distinct_first_bigrams"] == 2 and div["distinct_first_bigram_ratio"] == pytest.approx(2 / 3, abs=1e-4)


# -- the stage on the tiny model ------------------------------------------------------------------------------
def run_generate(root, base, *extra) -> int:
    return main(["run", "generate", "-c", CONFIG, "--artifacts", str(root), f"inputs.base={base}", *extra])


def test_generate_publishes_filtered_rows_with_provenance(tiny_store, tmp_path):
    root, run = tiny_store
    assert run_generate(tmp_path, root / run / "base") == 0
    art = tmp_path / "tiny" / "generate"
    m = json.loads((art / "manifest.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (art / "train.jsonl").read_text().splitlines()]
    candidates = [json.loads(line) for f in sorted((art / "shards").glob("gen-*.jsonl"))
                  for line in f.read_text().splitlines()]
    assert m["proposed"] == len(candidates) == 32 and m["rows"] == len(rows) > 0
    # The manifest's counts are the shards' fates, filter by filter.
    for name in FILTERS:
        assert m["filters"][name]["entered"] - m["filters"][name]["passed"] == \
            sum(c["dropped"] == name for c in candidates)
    assert m["filters"]["gold"]["passed"] == len(rows) < m["filters"]["gold"]["entered"]  # the checker did reject
    for row in rows:  # every kept row meets its constraints, and says where it came from
        assert row["messages"][-1]["role"] == "assistant" and row["constraints"]
        assert gold.passes(row["messages"][-1]["content"], row["constraints"])
        assert row["category"] == row["constraints"][0]["type"]
        p = row["provenance"]
        assert p["generator"].startswith("local:base:") and p["filters_passed"] == list(FILTERS)
        assert p["template_sha256"] == m["template_sha256"] and len(p["seed_ids"]) >= 4
    assert m["diversity"]["instructions"] == len(rows) and (art / "plots" / "filters.png").stat().st_size > 1000


def test_preempted_generate_resumes_without_asking_again(tiny_store, tmp_path, monkeypatch):
    import stages.generate as stage

    root, run = tiny_store
    base = root / run / "base"
    assert run_generate(tmp_path / "straight", base) == 0
    calls, real = [], stage.run_shard

    def shard_then_preempt(*args, **kwargs):
        calls.append(args[1][0]["index"])
        out = real(*args, **kwargs)
        if len(calls) == 2:
            preemption._handler(signal.SIGUSR1, None)  # what Slurm's warning signal does
        return out

    monkeypatch.setattr(stage, "run_shard", shard_then_preempt)
    assert run_generate(tmp_path / "cut", base) == preemption.REQUEUE_EXIT
    assert calls == [0, 8] and not (tmp_path / "cut" / "tiny" / "generate").exists()
    assert run_generate(tmp_path / "cut", base) == 0
    assert calls == [0, 8, 16, 24]  # the two finished shards were not asked again
    cut = (tmp_path / "cut" / "tiny" / "generate" / "train.jsonl").read_text()
    assert cut == (tmp_path / "straight" / "tiny" / "generate" / "train.jsonl").read_text()


def test_sft_trains_on_generated_rows_through_a_mixture(tiny_store, tmp_path):
    from alignment.artifacts import ArtifactStore
    from alignment.policy import load_policy

    root, run = tiny_store
    base = root / run / "base"
    assert run_generate(tmp_path, base) == 0
    assert main(["run", "sft", "-c", "configs/tiny/sft-generated.yaml", "--artifacts", str(tmp_path),
                 f"inputs.base={base}", "train.max_steps=2"]) == 0
    store = ArtifactStore(tmp_path)
    sft = store.read(store.stage_dir("tiny", "sft"))
    gen = store.read(store.stage_dir("tiny", "generate"))
    assert sft.manifest.inputs["generate"].manifest_sha256 == gen.manifest_sha256
    used = sft.manifest.metrics["mixture"]["sources"]["self-instruct"]
    assert used["used"] == gen.manifest.metrics["rows"] > 0
    assert sft.manifest.metrics["train_loss"] > 0 and load_policy(sft, "fp32") is not None


def test_from_stage_without_the_artifact_names_the_stage(tiny_store, tmp_path, capsys):
    root, run = tiny_store
    rc = main(["run", "sft", "-c", "configs/tiny/sft-generated.yaml", "--artifacts", str(tmp_path),
               f"inputs.base={root / run / 'base'}"])
    assert rc == 2 and "generate" in capsys.readouterr().err


def test_bad_generator_config_is_refused_at_load(tiny_store, tmp_path, capsys):
    root, run = tiny_store
    assert run_generate(tmp_path, root / run / "base", "generator.kind=openai", "filters.rouge_l=1.5") == 2
    err = capsys.readouterr().err
    assert "generator.base_url: kind 'openai' needs base_url" in err and "filters.rouge_l" in err


# -- against the real llama.cpp server --------------------------------------------------------------------------
def test_generate_through_the_llama_server_then_sft(tiny_store, tmp_path, server, key_env, capsys):
    from alignment.artifacts import ArtifactStore

    base_url, key = server
    root, run = tiny_store
    rc = main(["run", "generate", "-c", CONFIG, "--artifacts", str(tmp_path), "generator.kind=openai",
               "generator.model=smollm2", f"generator.base_url={base_url}", f"generator.api_key_env={key_env}",
               "generator.concurrency=2", "requests=8", "shard_size=4", "instruction_tokens=40",
               "response_tokens=64", "generator.generation.temperature=0.7",
               # SmolLM2-135M rarely meets a strict constraint (the gold filter drops most of those): half of the
               # tasks come without constraints, so some rows survive to train on.
               "constraint_rate=0.5"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    art = tmp_path / "tiny" / "generate"
    m = json.loads((art / "manifest.json").read_text())["metrics"]
    assert m["proposed"] == 8 and m["rows"] >= 1 and m["generator"] == f"openai:{base_url}:smollm2"
    assert m["filters"]["gold"]["entered"] >= m["filters"]["gold"]["passed"] == m["rows"]
    assert m["filters"]["parse"]["passed"] == 8  # SmolLM2 answers with a task every time
    rows = [json.loads(line) for line in (art / "train.jsonl").read_text().splitlines()]
    assert all(gold.passes(r["messages"][-1]["content"], r["constraints"]) for r in rows)
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and key.encode() in f.read_bytes()]
    assert main(["run", "sft", "-c", "configs/tiny/sft-generated.yaml", "--artifacts", str(tmp_path),
                 f"inputs.base={root / run / 'base'}", "train.max_steps=2"]) == 0
    store = ArtifactStore(tmp_path)
    sft = store.read(store.stage_dir("tiny", "sft"))
    assert sft.manifest.metrics["mixture"]["sources"]["self-instruct"]["used"] == m["rows"]


from test_judge_server import key_env, server  # noqa: E402,F401  (the real server's fixtures)
