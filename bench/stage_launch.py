"""What forking `align pipeline`'s stages from one pre-imported process saves (alignment/launch.py): the same
pipeline under ALIGN_STAGE_LAUNCH=fork (the default) and =exec (a fresh interpreter per stage), interleaved
(fork exec fork exec ...) on fresh artifact roots, so a host that speeds up or slows down moves both alike.

Each run is the pipeline process measured by wait4 from outside: its wall time, and the user and system CPU of it
and every stage process it waited for. The published weights of both variants must be identical, file for file.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/stage_launch.py --repeats 3 -- \\
        pipeline -c configs/tiny/pipeline.yaml
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from page_faults import run_once, table  # noqa: E402

VARIANTS = {"default": {}, "exec": {"ALIGN_STAGE_LAUNCH": "exec"}}  # default: fork


def weights(root: Path) -> dict[str, str]:
    """The sha256 of every weight file the published artifacts under `root` list in their manifests (what `align
    verify` checks; caches such as `.merged/` and checkpoints are not outputs)."""
    return {f"{m.parent.relative_to(root)}/{o['path']}": o["sha256"]
            for m in sorted(root.glob("*/*/manifest.json"))
            for o in json.loads(m.read_text())["outputs"] if o["path"].endswith(".safetensors")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (medians are reported)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the align arguments, e.g. pipeline -c ...")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("need an align command after --")
    results: dict[str, list[dict]] = {n: [] for n in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        for i in range(a.repeats):
            for name, env in VARIANTS.items():
                root = Path(tmp) / f"{name}-{i}"
                r = run_once(cmd, env, root)
                results[name].append(r)
                print(f"{name} #{i + 1}: {r['wall_s']:.1f} s wall, {r['user_s']:.1f} user + {r['sys_s']:.1f} sys, "
                      f"{r['rss_mb']:,.0f} MB", flush=True)
            fork, exec_ = weights(Path(tmp) / f"default-{i}"), weights(Path(tmp) / f"exec-{i}")
            if not fork or fork != exec_:
                sys.exit(f"round {i + 1}: the published weights differ between fork and exec")
        print(f"published weights: {len(fork)} files, identical under fork and exec in every round")
    print(table(results).replace("| default |", "| fork (default) |").replace("CPU vs default", "CPU vs fork"))


if __name__ == "__main__":
    main()
