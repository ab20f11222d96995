"""The process's memory allocator: mimalloc instead of glibc's malloc, for every `align` process.

Why: a stage allocates and frees tensors of every size at every step. glibc's malloc returns large blocks to the
OS with munmap and takes them back with mmap, so each step page-faults its activations in again (millions of minor
faults per stage; ~20% of the chain's CPU was system time), and its heaps fragment. mimalloc keeps freed pages and
reuses them. Measured (docs/pipeline.md, docs/ppo_bench.md): `make pipeline` with 0.76x the CPU, 56x fewer minor
faults and 0.71x the peak RSS, bit for bit the same weights; our PPO trainer 1.20-1.28x faster.

How: `align` (the console script and `python -m alignment.cli`) re-executes itself once, before anything heavy is
imported, with the mimalloc library of the `cmeel-mimalloc` wheel in LD_PRELOAD; every process it starts (stages
of `align pipeline`, Slurm steps) inherits it. Freed pages are returned with MADV_FREE
(`MIMALLOC_PURGE_DECOMMITS=0`): the kernel takes them back only under memory pressure, so reusing them costs no
fault. `ALIGN_ALLOCATOR=system` keeps glibc's malloc; `mimalloc` insists on it (an error where it is missing);
unset or `auto` uses it where the wheel is installed on Linux.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CHOICES = ("auto", "mimalloc", "system")
ENV = "ALIGN_ALLOCATOR"
# Our defaults, each left alone when the user set it: MADV_FREE instead of decommitting freed pages; arenas
# committed as they are used, not up front (-27 MB RSS after torch + transformers' imports, -12 to -17 MB at the
# PPO bench's peak, the same speed; docs/ppo_bench.md).
MIMALLOC_DEFAULTS = {"MIMALLOC_PURGE_DECOMMITS": "0", "MIMALLOC_ARENA_EAGER_COMMIT": "0"}


def choice() -> str:
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    return value


def mimalloc_library() -> Path | None:
    """libmimalloc.so of the installed cmeel-mimalloc wheel, or None."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "libmimalloc.so":
            path = Path(dist.locate_file(f)).resolve()
            return path if path.is_file() else None
    return None


def loaded() -> str:
    """The allocator this process runs on: 'mimalloc' when its library is mapped, else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"


def preload_env(env: dict[str, str], lib: Path) -> dict[str, str]:
    """`env` with `lib` first in LD_PRELOAD and our mimalloc defaults where unset."""
    rest = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != str(lib)]
    return {**MIMALLOC_DEFAULTS, **env, "LD_PRELOAD": ":".join([str(lib), *rest])}


def reexec_with_mimalloc() -> None:
    """Replace this process by itself with mimalloc preloaded, when the choice asks for it and it is not loaded
    yet. Call before importing torch (the re-exec repeats only Python's start-up). Returns when nothing is to do;
    raises ValueError for a bad ALIGN_ALLOCATOR or `mimalloc` where the library is missing."""
    want = choice()
    if want == "system" or not sys.platform.startswith("linux") or loaded() == "mimalloc":
        return
    lib = mimalloc_library()
    if lib is None:
        if want == "mimalloc":
            raise ValueError(f"{ENV}=mimalloc: the cmeel-mimalloc package is not installed "
                             f"(pip install cmeel-mimalloc, or {ENV}=system)")
        return
    if os.environ.get("LD_PRELOAD", "").split(":")[:1] == [str(lib)]:
        return  # preloaded but not mapped: the loader refused it; do not loop
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, [sys.executable, *argv[1:]], preload_env(dict(os.environ), lib))


# Where a process keeps glibc's malloc (ALIGN_ALLOCATOR=system, or no mimalloc wheel), the PPO trainer returns
# freed memory to the OS and serves large tensors by their own mmap, so its RSS follows the live tensors.
def _glibc(name: str):
    """A glibc function, or None where there is none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """glibc's malloc_trim(0): return the free memory of the malloc heaps to the OS."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = _glibc("malloc_trim") or False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Serve every allocation above `nbytes` by its own mmap (and stop glibc's dynamic threshold from rising): a
    freed activation tensor then goes straight back to the OS. Process-wide. False where there is no glibc."""
    mallopt = _glibc("mallopt")
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, nbytes))
