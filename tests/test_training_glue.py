"""alignment.training: glue between our configs and the TRL trainers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_lm import build  # noqa: E402


def test_cpu_fused_lm_head_scores_only_labelled_tokens(tmp_path, monkeypatch):
    """TRL's fused LM head on CPU: with the switch, only labelled positions reach the kernel, with the same
    log-probs, loss and gradients as when every position (prompt, padding) is scored."""
    from trl.trainer import utils as U

    from alignment.training import fused_lm_head_scores_labelled_tokens_only

    if not hasattr(U, "_use_triton"):  # another TRL: the switch returns False and changes nothing
        assert not fused_lm_head_scores_labelled_tokens_only()
        return
    original = getattr(U._use_triton, "original", U._use_triton)
    monkeypatch.setattr(U, "_use_triton", original)
    model, _ = build(tmp_path)
    U.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100      # a prompt
    labels[1, 7:] = -100      # padding
    rows = []
    kernel = U._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            rows.append(hidden.shape[0])
            return kernel.apply(hidden, *args)

    monkeypatch.setattr(U, "_ChunkedLogProbFunction", Counting)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    every, every_grads = run()
    assert fused_lm_head_scores_labelled_tokens_only() and fused_lm_head_scores_labelled_tokens_only()
    labelled, labelled_grads = run()
    assert rows == [2 * 8, int((labels[:, 1:] != -100).sum())]  # shifted: 8 positions a row
    assert torch.allclose(every.log_probs, labelled.log_probs, atol=1e-6)
    assert torch.allclose(every.entropy, labelled.entropy, atol=1e-6)
    assert torch.allclose(every.loss, labelled.loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(every_grads, labelled_grads))
    assert U._use_triton(torch.device("cpu")) and U._use_triton.original is original


def test_the_trainer_keeps_its_progress_bar_but_prints_no_log_rows_under_it():
    """The rows go to the stage log and log_history.jsonl; printed under the bar they made the console long."""
    from types import SimpleNamespace

    from transformers.trainer_callback import CallbackHandler, ProgressCallback

    from alignment.training import _bar_without_rows

    class Trainer:  # what `_bar_without_rows` uses of transformers.Trainer, delegating as it does
        def __init__(self):
            self.callback_handler = CallbackHandler([ProgressCallback()], None, None, None, None)

        def remove_callback(self, cb):
            self.callback_handler.remove_callback(cb)

        def add_callback(self, cb):
            self.callback_handler.add_callback(cb)

    trainer, written = Trainer(), []
    bar = SimpleNamespace(write=written.append)
    state = SimpleNamespace(is_world_process_zero=True)
    ProgressCallback.on_log(SimpleNamespace(training_bar=bar, max_str_len=100), None, state, None, logs={"loss": 1.0})
    assert written == ["{'loss': '1'}"]  # what the trainer's own callback prints

    _bar_without_rows(trainer)
    (cb,) = trainer.callback_handler.callbacks
    assert isinstance(cb, ProgressCallback) and type(cb) is not ProgressCallback  # still the bar
    cb.training_bar = bar
    cb.on_log(None, state, None, logs={"loss": 1.0})
    assert written == ["{'loss': '1'}"]
