"""bench/ppo_vs_trl.py's sides: each side's allocator (ours on mimalloc as `align` runs, TRL on the system's unless
told) and the ratio table against every TRL side of the same round. The benchmark itself is not a test (it takes
minutes); docs/ppo_bench.md has its figures."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_ppo_vs_trl", REPO / "bench" / "ppo_vs_trl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_each_side_gets_its_allocator_and_a_bad_one_is_refused(monkeypatch):
    assert bench.allocator_of("ours") == "mimalloc"
    assert bench.allocator_of("ours:allocator=system+micro_batch_size=4") == "system"
    assert bench.allocator_of("trl") == "system"
    assert bench.allocator_of("trl:allocator=mimalloc") == "mimalloc"
    with pytest.raises(SystemExit, match="allocator must be system or mimalloc, got 'jemalloc'"):
        bench.allocator_of("trl:allocator=jemalloc")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("LD_PRELOAD", "/opt/a.so")
        assert bench.child_env("trl", 1)["LD_PRELOAD"] == "/opt/a.so"
        assert bench.child_env("ours", 1)["LD_PRELOAD"].split(":")[0].endswith("libmimalloc.so")
        monkeypatch.setenv("LD_PRELOAD", bench.child_env("ours", 1)["LD_PRELOAD"])  # a driver already preloaded
        assert bench.child_env("ours:allocator=system", 1)["LD_PRELOAD"] == "/opt/a.so"


def _row(side, eps, cpu, rss, repeat=0):
    return dict(side=side, mode="lora", repeat=repeat, episodes_per_s=eps, train_cpu_s_per_episode=cpu,
                peak_rss_mb=rss, train_s=64 / eps, load_s=1.0, trainable_params=3.2e6, score_first=0.0,
                score_last=0.1, allocator=bench.allocator_of(side))


def test_every_ours_side_is_compared_with_every_trl_side_of_its_round():
    rows = [_row("trl", 1.0, 1.0, 3000), _row("trl:allocator=mimalloc", 1.1, 0.9, 2800),
            _row("ours", 2.2, 0.45, 1050), _row("ours", 9.9, 0.1, 10, repeat=1)]
    ratios = [line for line in bench.table(rows).splitlines() if line.startswith("| lora | 1 | ours |")]
    assert ratios == ["| lora | 1 | ours | trl | 2.20x | 2.22x | 0.35x |",
                      "| lora | 1 | ours | trl:allocator=mimalloc | 2.00x | 2.00x | 0.38x |"]
    assert "| lora | fp32 | trl:allocator=mimalloc | mimalloc | default | 1 | 1.10 |" in bench.table(rows)


def test_ours_runs_with_the_ppo_recipes_onednn_cache_and_trl_with_onednns_default(monkeypatch):
    import yaml

    shipped = yaml.safe_load((REPO / "configs" / "smollm2" / "ppo.yaml").read_text())["onednn_cache"]
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "5")  # the driver's own is not inherited
    assert bench.child_env("ours", 1)["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(shipped)
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in bench.child_env("trl", 1)
    assert bench.child_env("trl:onednn_cache=64", 1)["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in bench.child_env("ours:onednn_cache=default", 1)
    with pytest.raises(SystemExit, match="onednn_cache must be a number of primitives or default, got 'lots'"):
        bench.child_env("ours:onednn_cache=lots", 1)
