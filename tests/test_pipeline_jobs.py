"""`align pipeline -j N` (alignment/pipeline_jobs.py): which steps wait for which, at most N at once, a failure
stops new starts but lets the running ones finish, and every config is checked before the first stage runs."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from alignment.errors import ConfigError
from alignment.pipeline_jobs import Step, dependencies, run_steps, shown, threads_for
from alignment.runner import _plan_steps, route_overrides, run_pipeline

REPO = Path(__file__).resolve().parent.parent


def test_each_step_waits_for_the_nearest_earlier_step_of_each_stage_it_reads():
    stages = ["base", "sft", "reward", "dpo", "sft", "ppo"]
    reads = [set(), {"base"}, {"sft"}, {"sft"}, {"base"}, {"sft", "reward", "eval"}]
    # ppo reads the second sft (step 4), not the first; eval is not earlier in the list, so nothing to wait for;
    # the second sft also waits for the first (one folder), unless asked for what it reads alone
    assert dependencies(stages, reads) == [set(), {0}, {1}, {1}, {0, 1}, {4, 2}]
    assert dependencies(stages, reads, own_stage=False) == [set(), {0}, {1}, {1}, {0}, {4, 2}]


def test_the_default_chain_puts_the_reward_model_beside_sft_and_dpo_and_the_first_eval_beside_ppo(tmp_path):
    path = REPO / "configs/smollm2/pipeline.yaml"
    import yaml

    steps = yaml.safe_load(path.read_text())["stages"]
    names = [s["stage"] for s in steps]
    assert names == ["base", "sft", "reward", "dpo", "eval", "ppo", "eval"]
    planned = _plan_steps(path, steps, route_overrides([], names), tmp_path, None, False, jobs=2)
    assert len(planned) == len(steps)  # an empty store: nothing is up to date, so nothing is left out
    deps = [{names[j] for j in step.deps} for step, _ in planned]
    # the reward model starts from the base (configs/smollm2/reward.yaml init: base), so it trains beside sft and dpo
    assert deps[1] == {"base"} and deps[2] == {"base"} and deps[3] - {"base"} == {"sft"}
    assert deps[4] == {"base", "sft", "reward", "dpo"} and deps[5] - {"base"} == {"sft", "reward"}
    assert planned[6][0].deps >= {4, 5}  # the last eval after the first (one folder) and after ppo
    # with two at once, the stages that can overlap share the cores; the ones that never can keep them all
    cores = __import__("os").cpu_count() or 1
    given = [next(a for a in step.command if a.startswith("threads=")) for step, _ in planned]
    half = f"threads={max(1, cores // 2)}"
    assert given == [f"threads={cores}", half, half, half, half, half, f"threads={cores}"]
    one = _plan_steps(path, steps, route_overrides([], names), tmp_path, None, False, jobs=1)
    assert not any(a.startswith("threads=") for step, _ in one for a in step.command)


def test_threads_are_shared_only_by_the_steps_that_can_run_side_by_side():
    # a -> b, a -> c, c -> d, {b, d} -> e: b can overlap c and d; a and e never overlap anything
    deps = [set(), {0}, {0}, {2}, {1, 3}]
    assert threads_for(deps, jobs=2, cores=8) == [8, 4, 4, 4, 8]
    assert threads_for(deps, jobs=1, cores=8) == [8, 8, 8, 8, 8]  # one at a time: every core
    wide = [set(), {0}, {0}, {0}, {1, 2, 3}]  # three side by side, but -j 2: two at once
    assert threads_for(wide, jobs=2, cores=8) == [8, 4, 4, 4, 8]
    assert threads_for(wide, jobs=3, cores=8) == [8, 2, 2, 2, 8]
    assert threads_for(wide, jobs=3, cores=2) == [2, 1, 1, 1, 2]  # never below one


def _writer(tmp: Path, name: str, seconds: float, code: int = 0) -> list[str]:
    """A step that records when it started and ended, sleeps, and exits with `code`."""
    src = (f"import json, sys, time; t = time.time(); time.sleep({seconds}); "
           f"open({str(tmp / 'events.jsonl')!r}, 'a').write(json.dumps([{name!r}, t, time.time()]) + '\\n'); "
           f"print('hello from {name}'); sys.exit({code})")
    return [sys.executable, "-c", src]


def _events(tmp: Path) -> dict:
    return {n: (a, b) for n, a, b in map(json.loads, (tmp / "events.jsonl").read_text().splitlines())}


def test_steps_run_side_by_side_only_after_what_they_read(tmp_path):
    steps = [Step(0, "a", _writer(tmp_path, "a", 0.3)), Step(1, "b", _writer(tmp_path, "b", 1.0), {0}),
             Step(2, "c", _writer(tmp_path, "c", 1.0), {0}), Step(3, "d", _writer(tmp_path, "d", 0.1), {1, 2})]
    done = run_steps(steps, jobs=2, log_dir=tmp_path / "logs")
    ev = _events(tmp_path)
    assert [f.code for f in done] == [0, 0, 0, 0]
    assert ev["b"][0] >= ev["a"][1] and ev["c"][0] >= ev["a"][1]  # after a
    # b and c overlap: each sleeps 1 s, so one after the other would start c after b ended (or b after c). The
    # steps' own clocks, not the run's wall time, which a busy machine (two test workers) stretches
    assert ev["b"][0] < ev["c"][1] and ev["c"][0] < ev["b"][1]
    assert ev["d"][0] >= max(ev["b"][1], ev["c"][1])  # d after both
    assert (tmp_path / "logs" / "c.log").read_text().strip() == "hello from c"
    assert all(f.wall_s > 0 and f.user_s >= 0 for f in done)


def test_never_more_than_jobs_at_once(tmp_path):
    steps = [Step(i, f"s{i}", _writer(tmp_path, f"s{i}", 0.4)) for i in range(3)]
    run_steps(steps, jobs=2, log_dir=tmp_path / "logs")
    spans = sorted(_events(tmp_path).values())
    # the third starts only once one of the first two has ended
    assert spans[2][0] >= min(spans[0][1], spans[1][1])


def test_a_failure_stops_new_starts_and_lets_the_running_sibling_finish(tmp_path):
    steps = [Step(0, "bad", _writer(tmp_path, "bad", 0.2, code=3)), Step(1, "slow", _writer(tmp_path, "slow", 1.0)),
             Step(2, "after_bad", _writer(tmp_path, "after_bad", 0.1), {0}),
             Step(3, "later", _writer(tmp_path, "later", 0.1))]
    done = run_steps(steps, jobs=2, log_dir=tmp_path / "logs")
    codes = {f.step.stage: f.code for f in done}
    assert codes == {"bad": 3, "slow": 0}  # slow finished; neither after_bad nor later started
    assert set(_events(tmp_path)) == {"bad", "slow"}


def test_a_bad_key_in_a_later_stage_fails_before_the_first_stage_runs(tmp_path):
    pipe = tmp_path / "p.yaml"
    pipe.write_text("run: early\nstages:\n"
                    f"  - {{stage: base, config: {REPO / 'configs/tiny/base.yaml'}}}\n"
                    f"  - {{stage: sft, config: {REPO / 'configs/tiny/sft.yaml'}, overrides: [train.bogus=1]}}\n")
    with pytest.raises(ConfigError, match="train.bogus"):
        run_pipeline(str(pipe), root=tmp_path / "art", jobs=2)
    assert not (tmp_path / "art" / "early").exists()  # base never ran


@pytest.mark.parametrize("text, jobs, where", [("jobs: 0\n", None, "p.yaml: jobs"),
                                               ("jobs: two\n", None, "p.yaml: jobs"),
                                               ("", 0, "command line: -j/--jobs")])
def test_jobs_must_be_a_whole_number_of_at_least_one(tmp_path, text, jobs, where):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(text + f"stages:\n  - {{stage: base, config: {REPO / 'configs/tiny/base.yaml'}}}\n")
    with pytest.raises(ConfigError, match=where):
        run_pipeline(str(pipe), root=tmp_path / "art", jobs=jobs)


def test_an_earlier_step_of_a_repeated_stage_is_left_out_only_when_the_last_is_fresh_and_nothing_reads_it(
        tmp_path, monkeypatch):
    from types import SimpleNamespace

    from alignment import runner

    stale: set[str] = set()
    monkeypatch.setattr(runner, "_looks_up_to_date", lambda store, run, stage, cfg: stage not in stale)

    def plan(*steps):  # (stage, stages it reads)
        cfg = SimpleNamespace(run="r")
        return runner.superseded([(s, None, [], cfg, set(r)) for s, r in steps], tmp_path, "r")

    chain = [("base", ""), ("sft", ["base"]), ("dpo", ["sft"]), ("eval", ["sft", "dpo"]), ("ppo", ["sft"]),
             ("eval", ["sft", "dpo", "ppo"])]
    assert plan(*chain) == {3}  # every manifest matches: the first eval would only be replaced
    stale.add("ppo")  # ppo will re-run, so the last eval will too: the first one is worth running
    assert plan(*chain) == set()
    stale.clear()
    stale.add("eval")  # the last eval's own manifest names another config
    assert plan(*chain) == set()
    stale.clear()
    assert plan(("base", ""), ("sft", ["base"]), ("sft", ["base"])) == {1}
    # a step between reads the first sft: leaving that one out would change what it reads
    assert plan(("base", ""), ("sft", ["base"]), ("dpo", ["sft"]), ("sft", ["base"])) == set()
    assert plan(*chain[:5]) == set()  # no stage listed twice: nothing to leave out


def test_a_step_header_is_an_align_command_a_user_can_paste(tmp_path, caplog):
    import yaml

    path = REPO / "configs/tiny/pipeline.yaml"
    steps = yaml.safe_load(path.read_text())["stages"]
    names = [s["stage"] for s in steps]
    planned = _plan_steps(path, steps, route_overrides([], names), tmp_path, "r", False, jobs=1)
    command = planned[names.index("eval")][0].command  # overrides: policies=[dpo], a shell glob unquoted
    line = shown(command)
    assert line.startswith(f"align run eval -c {REPO / 'configs/tiny/eval.yaml'} 'policies=[dpo]'")
    assert shlex.split(line) == ["align", *command[3:]]
    # -j 1: the header the terminal gets (a cheap `align` command, forked as a stage is)
    caplog.set_level("INFO", logger="align")
    show = [sys.executable, "-m", "alignment.cli", "config", "show", "-c", "configs/tiny/eval.yaml", "policies=[dpo]"]
    assert [f.code for f in run_steps([Step(0, "eval", show, preload=False)], jobs=1, log_dir=None)] == [0]
    assert "== eval: align config show -c configs/tiny/eval.yaml 'policies=[dpo]'" in caplog.text


def test_a_step_that_leaves_its_manifest_as_it_was_ends_up_to_date_not_done(tmp_path, caplog):
    run = tmp_path / "r"
    for stage in ("kept", "rerun", "other"):
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text("{}")

    def step(i, stage, publish=False, known=True):  # publish: a new manifest, as a stage that ran writes
        src = f"open({str(run / stage / 'manifest.json')!r}, 'w').write('[]')" if publish else "pass"
        return Step(i, stage, [sys.executable, "-c", src], published=run / stage if known else None)

    caplog.set_level("INFO", logger="align")
    # `other`: where it publishes is not known, so nothing is claimed for it
    done = run_steps([step(0, "kept"), step(1, "rerun", publish=True), step(2, "other", known=False)],
                     jobs=2, log_dir=run / "logs")
    assert {f.step.stage: f.skipped for f in done} == {"kept": True, "rerun": False, "other": False}
    assert "== kept up to date (skipped) in " in caplog.text
    assert "== rerun done in " in caplog.text and "== other done in " in caplog.text


@pytest.mark.parametrize("last_failed", [False, True])
def test_a_pipeline_removes_only_what_it_published_and_replaced_itself(tmp_path, last_failed):
    from alignment.manifest import sha256_file
    from alignment.pipeline_jobs import Finished, drop_replaced_intermediates

    def folder(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
        return sha256_file(tmp_path / name / "manifest.json")

    users = folder("eval.old-20261201-100000", '{"an earlier command": 1}')   # a result the user had: kept
    first = folder("eval.old-20261205-100000", '{"this command, eval for dpo": 1}')
    last = folder("eval", '{"this command, the last eval": 1}')
    other = folder("sft.old-20261205-090000", '{"this command": "sft"}')        # no later sft step: kept
    published = tmp_path / "eval"
    steps = [Step(0, "eval", [], published=published), Step(1, "sft", [], published=tmp_path / "sft"),
             Step(2, "eval", [], published=published)]
    finished = [Finished(steps[2], 1 if last_failed else 0, 1, 1, 0, digest=last),
                Finished(steps[0], 0, 1, 1, 0, digest=first), Finished(steps[1], 0, 1, 1, 0, digest=other)]
    removed = drop_replaced_intermediates(finished)
    left = sorted(p.name for p in tmp_path.iterdir())
    if last_failed:  # the last eval published nothing: the first eval's artifact is the one in place, not replaced
        assert removed == [] and "eval.old-20261205-100000" in left
    else:
        assert removed == [tmp_path / "eval.old-20261205-100000"]
        assert left == ["eval", "eval.old-20261201-100000", "sft.old-20261205-090000"]
    assert users and sha256_file(tmp_path / "eval.old-20261201-100000" / "manifest.json") == users
