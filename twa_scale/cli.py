"""``twa-scale`` console entry: run the stages, inspect snapshot runs.

    twa-scale train [flags]              what `launch/train.py` does (same flags, --config, --preset)
    twa-scale twa [flags]                what `launch/twa.py` does
    twa-scale snapshots ls URL/RUN       committed snapshots: seq, step, epoch, bytes
    twa-scale snapshots verify URL/RUN   check every checksum; non-zero exit naming each bad object
    twa-scale data pack SRC DST          ImageFolder tree -> WebDataset shards + index.json (resumable)
    twa-scale data verify URL            check every shard's sha256; exit 1 naming each bad shard

An installed package launches with DeepSpeed's launcher as a module or through the console script:
    deepspeed --num_gpus 2 --module twa_scale train --epochs 1
    deepspeed --num_gpus 2 $(which twa-scale) twa --snapshot-url URL --run-id RUN

Further command groups register themselves in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

__all__ = ["main", "split_run_url", "COMMANDS", "launch_main", "run_stage"]


def launch_main(parse: Callable[[], object], run: Callable[[object], object],
                errors: tuple[type[BaseException], ...] = (ValueError,)) -> int:
    """The body of every `launch/*.py`: parse, run, clean up; return the exit status.

    Exit statuses follow :mod:`twa_scale.errors`: bad flags and bad input (``errors``, any
    ``ConfigError``) print one `error: ...` line and exit 2 (permanent); transient infrastructure
    (``TransientError``: store unreachable, rendezvous timeout) prints one line and exits 75, so a
    restart policy retries; SIGTERM exits 143 (``streamer.Preempted``). Anything else is a bug and
    keeps its traceback.
    """
    import logging

    from twa_scale import comm
    from twa_scale.errors import EXIT_CONFIG, exit_code

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse()
    except ValueError as e:  # before any process group exists
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        run(cfg)
    except Exception as e:  # noqa: BLE001 - classified; unexpected ones are re-raised
        code = exit_code(e, errors)
        if code is None:
            raise
        prefix = "error" if code == EXIT_CONFIG else f"transient error (exit {code}, a restart may succeed)"
        print(f"{prefix}: {e}", file=sys.stderr)
        return code
    finally:
        comm.destroy()
    return 0


def run_stage(stage: str, argv: list[str] | None = None) -> int:
    """`launch/train.py` (stage `train`) or `launch/twa.py` (stage `twa`) with ``argv``; the exit status."""
    if stage == "train":
        from twa_scale.config import parse_train_args
        from twa_scale.pipeline import run_pipeline

        return launch_main(lambda: parse_train_args(argv), run_pipeline)
    from twa_scale.twa import parse_twa_args, run_twa

    # corrupt shards are IOErrors and missing keys KeyErrors: bad input, one line each
    return launch_main(lambda: parse_twa_args(argv), run_twa, errors=(ValueError, OSError, KeyError))


def split_run_url(target: str) -> tuple[str, str]:
    """``URL/RUN`` -> (URL, RUN): the last path component names the run."""
    target = target.rstrip("/")
    base, sep, run = target.rpartition("/")
    if not sep or not run or base.endswith(":/") or base.endswith(":"):
        raise ValueError(f"{target!r} is not URL/RUN (e.g. s3://bucket/prefix/my-run or file:///data/snaps/my-run)")
    return base, run


def _snapshots_ls(args) -> int:
    from twa_scale.store import open_run

    url, run = split_run_url(args.target)
    reader = open_run(url, run, storage_options=args.storage_options)
    infos = reader.snapshots()
    if args.json:
        print(json.dumps([{"seq": i.seq, "step": i.step, "epoch": i.epoch, "epoch_fraction": i.epoch_fraction,
                           "bytes": i.nbytes} for i in infos]))
        return 0
    m = reader.manifest
    print(f"run {run} at {url}: model {m.model}, D={m.D}, {m.dtype}, "
          f"{len(infos)} committed snapshot(s)")
    print(f"{'seq':>6} {'step':>10} {'epoch':>6} {'bytes':>14}")
    for i in infos:
        print(f"{i.seq:>6} {i.step:>10} {i.epoch:>6} {i.nbytes:>14}")
    return 0


def _snapshots_verify(args) -> int:
    from twa_scale.store import open_run

    url, run = split_run_url(args.target)
    reader = open_run(url, run, storage_options=args.storage_options)
    problems = reader.verify()
    n = len(reader.snapshots())
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        print(f"verify {url}/{run}: {len(problems)} problem(s) in {n} committed snapshot(s)", file=sys.stderr)
        return 1
    print(f"verify {url}/{run}: {n} committed snapshot(s), all checksums OK")
    return 0


def _add_snapshots(sub) -> None:
    p = sub.add_parser("snapshots", help="list or verify the snapshots of a run")
    cmds = p.add_subparsers(dest="snapshots_command", required=True)
    ls = cmds.add_parser("ls", help="committed snapshots: seq, step, epoch, bytes")
    ls.add_argument("target", metavar="URL/RUN")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.add_argument("--storage-options", metavar="JSON", help="fsspec filesystem arguments (a JSON object)")
    ls.set_defaults(func=_snapshots_ls)
    ver = cmds.add_parser("verify", help="check every checksum; exit 1 naming each bad object")
    ver.add_argument("target", metavar="URL/RUN")
    ver.add_argument("--storage-options", metavar="JSON", help="fsspec filesystem arguments (a JSON object)")
    ver.set_defaults(func=_snapshots_verify)


def _add_data(sub) -> None:
    from twa_scale.shards import add_cli_command

    add_cli_command(sub)


# name -> function(subparsers) that adds a command group; another module may add e.g. "report".
COMMANDS: dict[str, Callable] = {"snapshots": _add_snapshots, "data": _add_data}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twa-scale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, what in (("train", "train with DeepSpeed (as launch/train.py; see `twa-scale train --help`)"),
                        ("twa", "run the TWA stage (as launch/twa.py; see `twa-scale twa --help`)")):
        sub.add_parser(stage, help=what, add_help=False)  # main() hands these their argv untouched
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for bad input, naming it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0].startswith("--local_rank"):  # DeepSpeed's launcher puts it before the command
        argv = argv[1 if "=" in argv[0] else 2:]
    if argv and argv[0] in ("train", "twa"):
        return run_stage(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        print(f"twa-scale: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
