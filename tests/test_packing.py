"""Packing: a packed batch gives every example the loss (and the gradient) it has unpacked."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.cli import main
from alignment.packing import PackedCollator, block_diagonal_mask, isolate_documents, pack_examples


@pytest.fixture(scope="module")
def examples(tiny_store):
    """Real SFT examples tokenised with the tiny tokenizer: input_ids + labels (-100 on the prompt)."""
    from alignment.models import load_tokenizer
    from alignment.sft_data import load_examples

    root, _ = tiny_store
    tok = load_tokenizer(root / "tiny" / "base" / "model")
    out = []
    for ex in load_examples("data/instruct/train.jsonl", None, 0.0)[:6]:
        prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True, return_dict=False)
        assert full[: len(prompt)] == prompt
        out.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]})
    return tok.pad_token_id, out


def _model(root, impl):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "tiny" / "base" / "model", attn_implementation=impl,
                                                dtype=torch.float32)


def _token_losses(model, batch):
    """Per-position next-token loss (0 where the label is ignored), and the mask of counted positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    counted = labels != -100
    return nll * counted, counted


def _per_document(losses, counted, rows_of_lengths):
    """Mean loss of each document, reading each packed row's documents in order."""
    out = []
    for r, lengths in enumerate(rows_of_lengths):
        start = 0
        for n in lengths:  # document tokens start..start+n-1 are predicted at shifted positions start..start+n-2
            seg = slice(start, start + n - 1)
            out.append((losses[r, seg].sum() / counted[r, seg].sum()).item())
            start += n
    return out


def _packed_rows(docs, layout):
    rows = []
    for group in layout:
        rows.append({"input_ids": sum((docs[i]["input_ids"] for i in group), []),
                     "labels": sum((docs[i]["labels"] for i in group), []),
                     "seq_lengths": [len(docs[i]["input_ids"]) for i in group]})
    return rows


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_batch_gives_each_example_its_unpacked_loss_and_gradient(tiny_store, examples, impl):
    root, _ = tiny_store
    pad, docs = examples
    collate = PackedCollator(pad)
    layout = [[0, 1, 2], [3, 4], [5]]  # rows of unequal length: the last one is padded
    model = _model(root, impl)

    unpacked = collate(docs)
    u_loss, u_counted = _token_losses(model, unpacked)
    want = _per_document(u_loss, u_counted, [[len(d["input_ids"])] for d in docs])
    (u_loss.sum() / u_counted.sum()).backward()
    want_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    packed = collate(_packed_rows(docs, layout))
    assert packed["input_ids"].shape[0] == 3 and u_counted.sum() == (packed["labels"] != -100).sum()
    hook = isolate_documents(model)
    try:
        p_loss, p_counted = _token_losses(model, packed)
        (p_loss.sum() / p_counted.sum()).backward()
    finally:
        hook.remove()
    got = _per_document(p_loss, p_counted, [[len(docs[i]["input_ids"]) for i in g] for g in layout])
    order = [i for g in layout for i in g]
    assert got == pytest.approx([want[i] for i in order], abs=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grad[n], atol=1e-6), n

    # The test can tell: reset position ids alone (no block-diagonal mask) leak across documents.
    with torch.no_grad():
        leaky = _per_document(*_token_losses(model, packed), [[len(docs[i]["input_ids"]) for i in g] for g in layout])
    assert max(abs(a - b) for a, b in zip(leaky, got)) > 1e-3


def test_block_diagonal_mask_by_hand():
    # One row: documents [a a b] then one pad token (position 0).
    pos = torch.tensor([[0, 1, 0, 0]])
    real = torch.tensor([[1, 1, 1, 0]])
    mask = block_diagonal_mask(pos, real)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0],
                    [1, 1, 0, 0],
                    [0, 0, 1, 0],
                    [0, 0, 0, 1]]  # the pad attends to itself only (no all-masked row, so no NaN)
    additive = block_diagonal_mask(pos, real, additive_dtype=torch.float32)[0, 0]
    assert additive[1, 0] == 0 and additive[0, 1] == torch.finfo(torch.float32).min


def test_pack_examples_keeps_every_document_whole(examples):
    import datasets

    _, docs = examples
    ds = datasets.Dataset.from_list(docs)
    max_length = 2 * max(len(d["input_ids"]) for d in docs)
    packed = pack_examples(ds, max_length)
    assert len(packed) < len(docs)
    pieces = []
    for row in packed:
        assert len(row["input_ids"]) == sum(row["seq_lengths"]) <= max_length
        start = 0
        for n in row["seq_lengths"]:
            pieces.append(tuple(row["input_ids"][start:start + n]))
            start += n
    assert sorted(pieces) == sorted(tuple(d["input_ids"]) for d in docs)


def test_packing_in_the_stage_trains_the_same_tokens_in_fewer_rows(tiny_store):
    root, _ = tiny_store
    common = ["train.max_steps=-1", "train.epochs=1", "train.max_length=1024", "train.save_steps=100",
              "data.max_train_examples=32", "data.max_eval_examples=4", "--artifacts", str(root),
              f"inputs.base={root}/tiny/base"]
    assert main(["run", "sft", "-c", "configs/tiny/sft.yaml", "--run", "unpacked", *common]) == 0
    assert main(["run", "sft", "-c", "configs/tiny/sft.yaml", "--run", "packed", "packing=true", *common]) == 0
    plain = json.loads((root / "unpacked" / "sft" / "metrics.json").read_text())
    packed = json.loads((root / "packed" / "sft" / "metrics.json").read_text())
    assert packed["train_tokens"] == plain["train_tokens"] > 0  # every token, once
    assert packed["packed_documents"] == 32 and packed["packed_rows"] < 32
    assert packed["steps"] < plain["steps"] and 0 < packed["packed_fill"] <= 1
