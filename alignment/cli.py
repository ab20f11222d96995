"""`align`: run stages, pipelines, show configs and the state of a run.

    align run STAGE -c FILE [key.path=value ...] [--artifacts DIR] [--run NAME] [--force]
    align pipeline -c FILE [STAGE.key.path=value | key.path=value ...] [--artifacts DIR] [--run NAME] [--force] [-j N]
    align submit -c FILE [--profile NAME|FILE] [--partition P] [--account A] [--time T] [--nodes N]
                 [--gpus-per-node G] [--begin TIME] [--run NAME] [--artifacts DIR] [--out DIR] [--dry-run]
                 [STAGE:key.path=value | key.path=value ...]          (`align slurm` is the same command)
    align status [RUN] [--artifacts DIR]
    align verify [RUN] [--artifacts DIR]                       re-hash every published artifact (exit 2 if broken)
    align report RUN [--artifacts DIR] [--out FILE]
    align config show -c FILE [key.path=value ...]
    align export RUN STAGE [--format hf|gguf] [--out PATH] [--artifacts DIR]
    align config schema STAGE|manifest
    (every command takes -q/--quiet and -v/--verbose)
    align judge audit -c LABEL_FILE [key.path=value ...] [--data FILE] [--limit N] [--out PNG] [--json FILE]
    align data inspect FILE... [--tokenizer PATH] [--threshold J] [--out PNG] [--json FILE]
    align data clean FILE --out FILE [--force] [--against EVAL...] [--threshold J] [--min-words N] [--max-words N]

Errors are one line each (`align: error: ...`), exit 2; `--debug` anywhere (or ALIGN_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import os

# Before torch is imported: with two threads next to any busy process, OpenMP spin-waiting
# slows CPU steps 5-30x. Passive waiting costs nothing measurable when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from alignment.errors import AlignError, ConfigError, io_error  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (the usage is one `-h` away)."""

    def error(self, message: str):
        # argparse lists the optional key=value overrides as required too when an argument before them is missing
        message = message.replace(", key.path=value", "")
        where = "" if self.prog == "align" else f"{self.prog}: "
        print(f"align: error: {where}{message} (see {self.prog} -h)", file=sys.stderr)
        raise SystemExit(2)


def _verbosity_flags() -> argparse.ArgumentParser:
    """-q/-v, accepted before or after the command (`align -q pipeline ...`, `align pipeline ... -q`)."""
    v = argparse.ArgumentParser(add_help=False)
    v.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                   help="warnings and errors only, no progress bars (the stage log in the artifact keeps everything)")
    v.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="debug lines and the resolved config on the console")
    return v


def _with_flags(subparsers, flags):
    """Every sub-command parser made from `subparsers` also takes -q/-v."""
    add_parser = subparsers.add_parser
    subparsers.add_parser = lambda *a, **kw: add_parser(*a, parents=[flags, *kw.pop("parents", [])], **kw)
    return subparsers


def _parser() -> argparse.ArgumentParser:
    flags = _verbosity_flags()
    p = _Parser(prog="align", description="RLHF/RLAIF alignment pipeline", parents=[flags])
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (anywhere on the line; "
                                                        "or ALIGN_DEBUG=1)")
    sub = _with_flags(p.add_subparsers(dest="cmd", required=True), flags)
    _add_run_commands(sub)
    _add_submit(sub)
    _add_store_commands(sub)
    _add_config_and_judge(sub, flags)
    from alignment.data_quality import add_parser as add_data_parser  # `align data inspect|clean`

    add_data_parser(sub, flags)
    return p


def _store_args(sp, run_arg=True):
    sp.add_argument("--artifacts", metavar="DIR", help="artifact root (default $ALIGN_ARTIFACTS or ./artifacts)")
    if run_arg:
        sp.add_argument("--run", metavar="NAME", help="run name (default $ALIGN_RUN or the config's run)")


def _run_positional(sp, required=False) -> None:
    """RUN, given as `align status RUN` or, as `run` and `pipeline` take it, `--run RUN`."""
    sp.add_argument("run_name", nargs="?", metavar="RUN",
                    help="the run" + ("" if required else " (default: every run)"))
    sp.add_argument("--run", dest="run_option", metavar="RUN", help="the same as RUN")
    sp.set_defaults(run_required=required)


def _one_run(args) -> None:
    """RUN from the positional or --run (not two different ones); required where the command needs one."""
    if "run_option" not in args:
        return
    if args.run_name and args.run_option and args.run_name != args.run_option:
        print(f"align: error: align {args.cmd}: RUN {args.run_name!r} and --run {args.run_option!r} disagree; "
              "give one", file=sys.stderr)
        raise SystemExit(2)
    args.run_name = args.run_name or args.run_option
    if args.run_required and not args.run_name:
        print(f"align: error: align {args.cmd}: the run is required: `align {args.cmd} RUN`", file=sys.stderr)
        raise SystemExit(2)


def _add_run_commands(sub) -> None:
    r = sub.add_parser("run", help="run one stage")
    r.add_argument("stage", help="the stage to run (base, sft, reward, ...); the -c file must configure it")
    r.add_argument("-c", "--config", required=True, metavar="FILE")
    r.add_argument("overrides", nargs="*", metavar="key.path=value")
    r.add_argument("--force", action="store_true", help="re-run even if up to date (the old artifact is kept aside)")
    # A Slurm chain's own bookkeeping (cluster.chain_flags writes them into the job scripts), not for users.
    r.add_argument("--record-published", metavar="FILE", help=argparse.SUPPRESS)
    r.add_argument("--drop-replaced", metavar="FILE", action="append", default=[], help=argparse.SUPPRESS)
    _store_args(r)

    pl = sub.add_parser("pipeline", help="run the stages a pipeline file lists")
    pl.add_argument("-c", "--config", required=True, metavar="FILE")
    pl.add_argument("overrides", nargs="*", metavar="[STAGE.]key.path=value",
                    help="STAGE.key=value (or STAGE:key=value) goes to that stage, key=value to every stage")
    pl.add_argument("--force", action="store_true")
    pl.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                    help="stage processes at once (default: the file's `jobs:`, else 1); a stage starts when the "
                         "stages it reads have finished; stages that can overlap share the cores")
    _store_args(pl)


def _add_submit(sub) -> None:
    sl = sub.add_parser("submit", aliases=["slurm"],
                        help="submit a pipeline as a chain of Slurm jobs (afterok dependencies, requeue on USR1)")
    sl.add_argument("-c", "--config", required=True, metavar="FILE", help="a pipeline file")
    sl.add_argument("overrides", nargs="*", metavar="[STAGE:]key.path=value",
                    help="passed to `align run` of every stage, or of STAGE only")
    sl.add_argument("--profile", metavar="NAME|FILE",
                    help="cluster profile: configs/cluster/NAME.yaml (default $ALIGN_CLUSTER_PROFILE or 'local')")
    sl.add_argument("--partition")
    sl.add_argument("--account")
    sl.add_argument("--time", metavar="D-HH:MM:SS", help="time limit per stage")
    sl.add_argument("--nodes", type=int)
    sl.add_argument("--gpus-per-node", type=int, metavar="G")
    sl.add_argument("--begin", metavar="TIME", help="Slurm --begin for the chain (e.g. now+1hour, 23:00, tomorrow)")
    sl.add_argument("--out", metavar="DIR", help="where the sbatch scripts and job logs go (default <artifacts>/<run>/slurm)")
    sl.add_argument("--dry-run", action="store_true",
                    help="write the scripts, print the sbatch chain (with -v the scripts too), submit nothing")
    _store_args(sl)


def _add_store_commands(sub) -> None:
    """Commands that read a run's published artifacts."""
    st = sub.add_parser("status", help="table of a run's stages")
    _run_positional(st)
    _store_args(st, run_arg=False)

    vf = sub.add_parser("verify", help="re-hash every published artifact of a run (or of all runs); exit 2 if broken")
    _run_positional(vf)
    _store_args(vf, run_arg=False)

    rp = sub.add_parser("report", help="one self-contained HTML page for a whole run (every stage, lineage, figures)")
    _run_positional(rp, required=True)
    rp.add_argument("--out", metavar="FILE", help="where to write it (default <artifacts>/<RUN>/report.html)")
    _store_args(rp, run_arg=False)

    ex = sub.add_parser("export", help="a policy as a standalone merged model folder (hf) or GGUF file, with a model card")
    ex.add_argument("run_name", metavar="RUN")
    ex.add_argument("stage", metavar="STAGE", help="a policy stage: sft, dpo, ppo, grpo (GRPO or RLOO), online_dpo "
                                                  "(or base)")
    ex.add_argument("--format", choices=["hf", "gguf"], default="hf")
    ex.add_argument("--out", metavar="PATH", help="default <artifacts>/<RUN>/exports/<STAGE>[.gguf]")
    ex.add_argument("--force", action="store_true", help="replace an earlier export there (after the new one is "
                                                          "written)")
    _store_args(ex, run_arg=False)


def _add_config_and_judge(sub, flags) -> None:
    c = sub.add_parser("config", help="config tools")
    csub = _with_flags(c.add_subparsers(dest="config_cmd", required=True), flags)
    show = csub.add_parser("show", help="print the resolved config")
    show.add_argument("-c", "--config", required=True, metavar="FILE")
    show.add_argument("overrides", nargs="*", metavar="key.path=value")
    sc = csub.add_parser("schema", help="every key of a stage's config with its type, default and docstring "
                                         "(`manifest`: the JSON Schema of manifest.json)")
    sc.add_argument("what", metavar="STAGE|manifest")

    j = sub.add_parser("judge", help="RLAIF judge tools")
    jsub = _with_flags(j.add_subparsers(dest="judge_cmd", required=True), flags)
    au = jsub.add_parser("audit", help="agreement of a label config's judge with human preference labels")
    au.add_argument("-c", "--config", required=True, metavar="FILE", help="a label stage config (its judge: section)")
    au.add_argument("overrides", nargs="*", metavar="key.path=value")
    au.add_argument("--data", default="data/prefs/eval.jsonl", help="human-labelled pairs (chosen = preferred)")
    au.add_argument("--limit", type=int, metavar="N", help="judge only the first N pairs")
    au.add_argument("--out", default="judge_audit.png", metavar="PNG", help="where the plot goes")
    au.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    _store_args(au)


def _unrecognized(args, bad: list[str]):
    """One line naming the sub-command whose -h lists what it takes; `--run` where the run is positional says so."""
    prog = f"align {args.cmd}"
    hint = f"; the run is positional here: `{prog} RUN ...`" if "--run" in bad else ""
    print(f"align: error: {prog}: unrecognized arguments: {' '.join(bad)}{hint} (see {prog} -h)", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line itself (not a call from Python): run on mimalloc (alignment/allocator.py)
        from alignment import allocator

        try:
            allocator.reexec_with_mimalloc()
        except ValueError as e:
            print(f"align: error: {e}", file=sys.stderr)
            return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ALIGN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ["ALIGN_DEBUG"] = "1"  # the stage processes of `align pipeline` too
    parser = _parser()
    # Overrides may come before or after options (`-c F a=1 --run x b=2`): argparse stops the
    # positional list at the first option, so collect the rest from the leftovers.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    bad = [a for a in extra if not (takes_overrides and "=" in a and not a.startswith("-"))]
    if bad:
        _unrecognized(args, bad)
    if extra:
        args.overrides = list(args.overrides) + extra
    _one_run(args)
    from alignment.logs import setup_console

    given = "quiet" in args or "verbose" in args
    setup_console(getattr(args, "verbose", 0) - getattr(args, "quiet", 0) if given else None)
    from alignment.config import install_log_redaction

    install_log_redaction()
    try:
        return _dispatch(args)
    except AlignError as e:
        return _report(e, debug)
    except KeyboardInterrupt:
        print("align: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`align config schema ppo | head`): stop quietly, as `git log | head` does.
        _stdout_to_devnull()
        return 141
    except OSError as e:  # disk full, read-only, permissions, a file where a folder belongs
        return _report(io_error(e), debug, cause=e)
    except Exception as e:  # a bug or an unforeseen input: still one line, the traceback on request
        first = (str(e).strip().splitlines() or [""])[0][:300]
        err = AlignError(f"{type(e).__name__}: {first} (unexpected; re-run with --debug for the traceback)")
        err.exit_code = 1
        return _report(err, debug, cause=e)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on the closed pipe again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (a test's capture): nothing to flush
        pass


def _report(e: AlignError, debug: bool, cause: BaseException | None = None) -> int:
    """Print an error as `align: error: ...` lines (one per config problem, else one), secrets scrubbed."""
    from alignment.config import scrub_text

    if debug:
        traceback.print_exception(cause or e, file=sys.stderr)
    # A stage that checkpointed on request has not failed: say so without "error".
    prefix = "align: " if type(e).__name__ == "Requeue" else "align: error: "
    lines = e.problems if isinstance(e, ConfigError) else [str(e)]
    for line in lines or [type(e).__name__]:
        print(prefix + scrub_text(" ".join(str(line).split("\n"))), file=sys.stderr)
    return e.exit_code


def _dispatch(args) -> int:
    from alignment import runner

    if args.cmd == "run":
        _run(args)
    elif args.cmd == "pipeline":
        runner.run_pipeline(args.config, root=args.artifacts, run=args.run, force=args.force, overrides=args.overrides,
                            jobs=args.jobs)
    elif args.cmd in ("submit", "slurm"):
        _submit(args)
    elif args.cmd == "status":
        from alignment.status import print_status

        print_status(args.artifacts, args.run_name)
    elif args.cmd == "judge":
        from alignment.audit import audit_command

        audit_command(args.config, args.overrides, data=args.data, limit=args.limit, root=args.artifacts,
                      run=args.run, out=args.out, json_out=args.json)
    elif args.cmd == "verify":
        return _verify(args.artifacts, args.run_name)
    elif args.cmd == "export":
        from alignment.export import export_command

        return export_command(args)
    elif args.cmd == "data":
        args.func(args)
    elif args.cmd == "report":
        from alignment.artifacts import ArtifactStore
        from alignment.report import build_run_report

        store = ArtifactStore(args.artifacts)
        store.run_dir(args.run_name)  # one safe folder name
        print(build_run_report(store.root, args.run_name, args.out))
    else:
        _config_command(args)
    return 0


def _run(args) -> None:
    """`align run`: one stage; with -q its stdout goes nowhere."""
    import contextlib

    from alignment import runner
    from alignment.logs import verbosity
    from alignment.pipeline_jobs import manifest_digest

    chained = args.record_published or args.drop_replaced
    final = runner.stage_folder(args.stage, args.config, args.overrides, root=args.artifacts, run=args.run) \
        if chained else None
    before = manifest_digest(final) if chained else None
    # -q: the HF trainers print their logged rows on stdout (tqdm.write) whatever the bars do; the stage log
    # in the artifact keeps them, so a quiet run sends stdout nowhere.
    with open(os.devnull, "w") if verbosity() < 0 else contextlib.nullcontext(None) as sink, \
            contextlib.redirect_stdout(sink) if sink else contextlib.nullcontext():
        runner.run_stage(args.stage, args.config, args.overrides, root=args.artifacts, run=args.run,
                         force=args.force)
    if chained and os.environ.get("RANK", "0") == "0":
        from alignment.cluster import chain_step_done

        for old in chain_step_done(final, before, args.record_published, args.drop_replaced):
            runner.log.info("removed %s (published and replaced by this Slurm chain)", old)


def _submit(args) -> None:
    """`align submit`: the pipeline as a chain of sbatch jobs (or, with --dry-run, its scripts and commands)."""
    from pathlib import Path

    from alignment import runner
    from alignment.cluster import submit_chain

    if args.run is not None:
        runner._run_name(args.run, args.run)

    flags = {"partition": args.partition, "account": args.account, "time": args.time, "nodes": args.nodes,
             "gpus_per_node": args.gpus_per_node, "begin": args.begin}
    items = submit_chain(args.config, run=args.run, artifacts=args.artifacts, out_dir=args.out,
                         dry_run=args.dry_run, profile=args.profile, flags=flags, overrides=args.overrides)
    if args.dry_run:
        print(f"# the sbatch chain (nothing submitted); scripts in {Path(items[0]['script']).parent}:")
    for item in items:
        print(item["command"] if args.dry_run else item["job_id"])
    if args.dry_run and getattr(args, "verbose", 0):
        for item in items:
            print(f"# ---- {item['script']}\n{Path(item['script']).read_text()}", file=sys.stderr)


def _config_command(args) -> None:
    """`align config show|schema`."""
    from alignment import runner

    if args.config_cmd == "show":
        from alignment.config import config_dict
        import yaml

        stage = runner.stage_of_file(args.config)
        cfg = runner.load_stage_config(stage, args.config, args.overrides)
        print(yaml.safe_dump(config_dict(cfg), sort_keys=False), end="")
    elif args.what == "manifest":
        from alignment.manifest import json_schema

        print(json.dumps(json_schema(), indent=2))
    else:
        from alignment.config_schema import stage_schema

        print(stage_schema(args.what), end="")


def _verify(root, run: str | None) -> int:
    """`align verify`: every published artifact (and every one moved aside) re-hashed; a line per artifact."""
    from alignment.artifacts import ArtifactStore

    store = ArtifactStore(root)
    runs = [run] if run else store.runs()
    if run and not store.run_dir(run).is_dir():
        raise AlignError(f"run '{run}' not found under {store.root}")
    broken, checked = [], 0
    for name in runs:
        for folder, status, problems in store.verify_run(name):
            checked += 1
            print(f"{name}/{folder}: {'BROKEN' if problems else 'ok'} (manifest status {status})")
            for p in problems:
                print(f"    {p}")
            broken += [f"{name}/{folder}"] * bool(problems)
    if not checked:
        raise AlignError(f"no published artifacts under {store.root / run if run else store.root}")
    if broken:
        raise AlignError(f"{len(broken)} of {checked} artifact(s) do not verify: {', '.join(broken)}; re-run those "
                         "stages with --force (the broken copies are moved aside, not deleted)")
    print(f"{checked} artifact(s) verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
