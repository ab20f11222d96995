"""`align` under torchrun with test-only probes (tests/test_multiprocess.py); production code has none.

    torchrun --nproc_per_node 2 tests/_mp_stage.py run sft -c ... --artifacts D --run R

Each rank writes to $ALIGN_TEST_PROBE_DIR:
- `rank<R>.json`: sha256 of its trainable (adapter) weights when training ends, and the step;
- `writes.txt`: one line `<rank> <what>` per artifact write (adapter save into `model/`, publish).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RANK = os.environ.get("RANK", "0")


def _probe() -> Path:
    return Path(os.environ["ALIGN_TEST_PROBE_DIR"])


def tensors_sha256(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()


def _note(what: str) -> None:
    with (_probe() / "writes.txt").open("a") as f:
        f.write(f"{RANK} {what}\n")


def _install_probes() -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import TrainerCallback

    import alignment.training
    from alignment.artifacts import ArtifactStore

    class HashAtEnd(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            (_probe() / f"rank{RANK}.json").write_text(json.dumps(
                {"sha256": tensors_sha256(get_peft_model_state_dict(model)), "step": state.global_step}))

    original_callbacks = alignment.training.callbacks

    def callbacks():
        return original_callbacks() + [HashAtEnd()]

    for mod in ("stages.sft", "stages.dpo"):
        __import__(mod)
        sys.modules[mod].callbacks = callbacks

    save = PeftModel.save_pretrained

    def save_pretrained(self, path, *a, **k):
        if Path(path).name == "model":
            _note(f"adapter {path}")
        return save(self, path, *a, **k)

    PeftModel.save_pretrained = save_pretrained
    publish = ArtifactStore.publish

    def publish_and_note(self, run, stage, manifest):
        _note(f"publish {stage}")
        return publish(self, run, stage, manifest)

    ArtifactStore.publish = publish_and_note


if __name__ == "__main__":
    _install_probes()
    from alignment.cli import main

    sys.exit(main(sys.argv[1:]))
