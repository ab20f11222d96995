"""Where a stage's system CPU time goes, and what transparent huge pages buy: one `align run` command under
several allocator environments, interleaved (A B C A B C ...) so a host that speeds up or slows down during the
run moves every variant alike.

Variants (each a separate child process, measured by wait4 on the child: wall, user and system CPU seconds,
minor page faults, peak RSS):
  default       the environment as given: `align` runs on mimalloc (alignment/allocator.py)
  system        ALIGN_ALLOCATOR=system: glibc's malloc (every `align` process until 2026-12-02)
  mimalloc-keep mimalloc that never returns freed pages (MIMALLOC_PURGE_DELAY=-1), not even under memory pressure
  thp           glibc + THP_MEM_ALLOC_ENABLE=1: PyTorch's CPU allocator aligns tensors of >= 2 MB to 2 MB and asks
                for transparent huge pages (madvise), so a fresh 200 MB logits tensor faults ~100 times, not ~50,000
  thp+glibc     also GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35: malloc's own mmaps and heap madvised)

The command is any stage run; each repeat gets a fresh artifact root, so nothing is skipped as up to date.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/page_faults.py --repeats 2 -- \\
        run sft -c configs/smollm2/sft.yaml inputs.base=artifacts/smollm2/base threads=1 train.max_steps=12

THP needs the kernel's `madvise` (or `always`) mode: /sys/kernel/mm/transparent_hugepage/enabled.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # the benches' shared helpers
from _child import run_align  # noqa: E402

VARIANTS = {
    "default": {},
    "system": {"ALIGN_ALLOCATOR": "system"},
    "mimalloc-keep": {"MIMALLOC_PURGE_DELAY": "-1"},
    "eager-commit": {"MIMALLOC_ARENA_EAGER_COMMIT": "2"},  # mimalloc's own default; align sets 0
    "thp": {"ALIGN_ALLOCATOR": "system", "THP_MEM_ALLOC_ENABLE": "1"},
    "thp+glibc": {"ALIGN_ALLOCATOR": "system", "THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}


def run_once(args: list[str], env_extra: dict, root: Path) -> dict:
    done = run_align([*args, "-q", "--artifacts", str(root)], {"ALIGN_TRACKING": "none", **env_extra})
    if done.code != 0:
        sys.exit(f"align {' '.join(args)} failed:\n{done.err[-3000:]}")
    ru = done.usage
    return {"wall_s": done.wall_s, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "minflt": ru.ru_minflt,
            "rss_mb": ru.ru_maxrss / 1024}


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def table(results: dict[str, list[dict]]) -> str:
    base = {k: median([r[k] for r in results["default"]]) for k in results["default"][0]}
    lines = ["| variant | wall s | user s | sys s | minor faults | peak RSS MB | CPU vs default |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        m = {k: median([r[k] for r in runs]) for k in runs[0]}
        cpu = (m["user_s"] + m["sys_s"]) / (base["user_s"] + base["sys_s"])
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['user_s']:.1f} | {m['sys_s']:.1f} | {m['minflt']:,.0f} | "
                     f"{m['rss_mb']:,.0f} | {cpu:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="runs per variant (medians are reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the align arguments, e.g. run sft -c ...")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    names = a.variants.split(",")
    if not cmd or any(n not in VARIANTS for n in names) or "default" not in names:
        p.error(f"need an align command after --, and variants from {list(VARIANTS)} including default")
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="bench-pf-") as tmp:
        for i in range(a.repeats):
            for n in names:
                r = run_once(cmd, VARIANTS[n], Path(tmp) / f"{n}-{i}")
                results[n].append(r)
                print(f"{n} #{i + 1}: {r['wall_s']:.1f} s wall, {r['user_s']:.1f} user + {r['sys_s']:.1f} sys, "
                      f"{r['minflt']:,} minor faults, {r['rss_mb']:,.0f} MB", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
