"""`align`: run stages, pipelines, show configs and the state of a run.

    align run STAGE -c FILE [key.path=value ...] [--artifacts DIR] [--run NAME] [--force]
    align pipeline -c FILE [--artifacts DIR] [--run NAME] [--force]
    align slurm -c FILE [--run NAME] [--artifacts DIR] [--out DIR] [--dry-run]
    align status [RUN] [--artifacts DIR]
    align config show -c FILE [key.path=value ...]
"""

from __future__ import annotations

import os

# Before torch is imported: with two threads next to any busy process, OpenMP spin-waiting
# slows CPU steps 5-30x. Passive waiting costs nothing measurable when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from alignment.errors import AlignError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align", description="RLHF/RLAIF alignment pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)

    def store_args(sp, run_arg=True):
        sp.add_argument("--artifacts", metavar="DIR", help="artifact root (default $ALIGN_ARTIFACTS or ./artifacts)")
        if run_arg:
            sp.add_argument("--run", metavar="NAME", help="run name (default $ALIGN_RUN or the config's run)")

    r = sub.add_parser("run", help="run one stage")
    r.add_argument("stage")
    r.add_argument("-c", "--config", required=True, metavar="FILE")
    r.add_argument("overrides", nargs="*", metavar="key.path=value")
    r.add_argument("--force", action="store_true", help="re-run even if up to date (the old artifact is kept aside)")
    store_args(r)

    pl = sub.add_parser("pipeline", help="run the stages a pipeline file lists")
    pl.add_argument("-c", "--config", required=True, metavar="FILE")
    pl.add_argument("--force", action="store_true")
    store_args(pl)

    sl = sub.add_parser("slurm", help="submit a pipeline as a chain of Slurm jobs (afterok dependencies)")
    sl.add_argument("-c", "--config", required=True, metavar="FILE")
    sl.add_argument("--out", default="slurm", metavar="DIR", help="where the sbatch scripts and logs go")
    sl.add_argument("--dry-run", action="store_true", help="write the scripts, submit nothing")
    store_args(sl)

    st = sub.add_parser("status", help="table of a run's stages")
    st.add_argument("run_name", nargs="?", metavar="RUN")
    store_args(st, run_arg=False)

    c = sub.add_parser("config", help="config tools")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    show.add_argument("-c", "--config", required=True, metavar="FILE")
    show.add_argument("overrides", nargs="*", metavar="key.path=value")
    csub.add_parser("schema", help="print the JSON Schema of manifest.json")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`-c F a=1 --run x b=2`): argparse stops the
    # positional list at the first option, so collect the rest from the leftovers.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    bad = [a for a in extra if not (takes_overrides and "=" in a and not a.startswith("-"))]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("align").setLevel(logging.INFO)
    try:
        return _dispatch(args)
    except AlignError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"align: error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("align: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from alignment import runner

    if args.cmd == "run":
        runner.run_stage(args.stage, args.config, args.overrides, root=args.artifacts, run=args.run, force=args.force)
    elif args.cmd == "pipeline":
        runner.run_pipeline(args.config, root=args.artifacts, run=args.run, force=args.force)
    elif args.cmd == "slurm":
        from alignment.cluster import submit_chain

        for item in submit_chain(args.config, run=args.run, artifacts=args.artifacts, out_dir=args.out,
                                 dry_run=args.dry_run):
            print(item)
    elif args.cmd == "status":
        from alignment.status import print_status

        print_status(args.artifacts, args.run_name)
    elif args.config_cmd == "show":
        from alignment.config import config_dict
        import yaml

        stage = runner.stage_of_file(args.config)
        cfg = runner.load_stage_config(stage, args.config, args.overrides)
        print(yaml.safe_dump(config_dict(cfg), sort_keys=False), end="")
    else:
        from alignment.manifest import json_schema

        print(json.dumps(json_schema(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
