"""``twa-scale`` console entry: run the stages, inspect snapshot runs.

    twa-scale train [flags]              what `launch/train.py` does (same flags, --config, --preset)
    twa-scale twa [flags]                what `launch/twa.py` does
    twa-scale snapshots ls URL/RUN       committed snapshots: seq, step, epoch, size (--json: bytes); damaged marked
    twa-scale snapshots verify URL/RUN   check every checksum; exit 1 naming each bad object (--json)
    twa-scale runs ls URL                runs: fingerprint, lease holder, state, snapshot count (--json)
    twa-scale data pack SRC DST          ImageFolder tree -> WebDataset shards + index.json (resumable)
    twa-scale data verify URL            check every shard's sha256; exit 1 naming each bad shard (--json)
    twa-scale stop URL/RUN [--reason T]  ask the training job to end after its next snapshot (control/STOP.json);
                                         a finished run gets no marker; --clear removes one (--json)
    twa-scale --version

An installed package launches with DeepSpeed's launcher as a module or through the console script:
    deepspeed --num_gpus 2 --module twa_scale train --epochs 1
    deepspeed --num_gpus 2 $(which twa-scale) twa --snapshot-url URL --run-id RUN
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, NoReturn

__all__ = ["main", "console", "exit_process", "split_run_url", "launch_main", "run_stage"]


def launch_main(parse: Callable[[], object], run: Callable[[object], object],
                errors: tuple[type[BaseException], ...] | None = None) -> int:
    """The body of every `launch/*.py`: parse, run, clean up; return the exit status.

    Exit statuses follow :mod:`twa_scale.errors`: bad flags and bad input (``errors``, any
    ``ConfigError``) print one `error: ...` line and exit 2 (permanent); transient infrastructure
    (``TransientError``: store unreachable, rendezvous timeout) prints one line and exits 75, so a
    restart policy retries; SIGTERM exits 143 (``streamer.Preempted``). Anything else is a bug and
    keeps its traceback.
    """
    from twa_scale import logs
    from twa_scale.errors import EXPECTED_ERRORS

    errors = EXPECTED_ERRORS if errors is None else tuple(errors) + EXPECTED_ERRORS
    with logs.configured():  # rank from the launcher's environment; the flags refine it once parsed
        return _parse_and_run(parse, run, errors)


def _parse_and_run(parse, run, errors) -> int:
    from twa_scale import comm, logs
    from twa_scale.errors import EXIT_CONFIG, exit_code

    try:
        cfg = parse()
    except ValueError as e:  # before any process group exists
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(log_format=getattr(cfg, "log_format", "text"), all_ranks=getattr(cfg, "log_all_ranks", False))
    try:
        run(cfg)
        comm.barrier()  # every rank is past its last collective before any tears the group down
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


def run_stage(stage: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """`launch/train.py` (stage `train`) or `launch/twa.py` (stage `twa`) with ``argv``; the exit status.
    ``prog``: the command name ``--help`` shows (`twa-scale train` from the console script)."""
    if stage == "train":
        from twa_scale.train.config import parse_train_args
        from twa_scale.pipeline import run_pipeline

        return launch_main(lambda: parse_train_args(argv, prog=prog or "launch/train.py"), run_pipeline)
    from twa_scale.twa import parse_twa_args, run_twa
    from twa_scale.twa.follow import run_follow

    # corrupt shards are IOErrors and missing keys KeyErrors: bad input, one line each
    return launch_main(lambda: parse_twa_args(argv, prog=prog or "launch/twa.py"),
                       lambda cfg: (run_follow if cfg.follow else run_twa)(cfg), errors=(ValueError, OSError, KeyError))


def split_run_url(target: str) -> tuple[str, str]:
    """``URL/RUN`` -> (URL, RUN): the last path component names the run."""
    target = target.rstrip("/")
    base, sep, run = target.rpartition("/")
    if not sep or not run or base.endswith(":/") or base.endswith(":"):
        raise ValueError(f"{target!r} is not URL/RUN (e.g. s3://bucket/prefix/my-run or file:///data/snaps/my-run)")
    return base, run


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _snapshots_ls(args) -> int:
    from twa_scale.store import open_run

    url, run = split_run_url(args.target)
    reader = open_run(url, run, storage_options=args.storage_options)
    infos, damaged = reader.scan()
    if args.json:
        rows = [{"seq": i.seq, "step": i.step, "epoch": i.epoch, "epoch_fraction": i.epoch_fraction,
                 "bytes": i.nbytes} for i in infos]
        rows += [{"seq": seq, "damaged": why} for seq, why in damaged.items()]
        print(json.dumps(sorted(rows, key=lambda r: r["seq"])))
        return 0
    m = reader.manifest
    print(f"run {run} at {url}: model {m.model}, D={m.D}, {m.dtype}, {len(infos)} committed snapshot(s)"
          + (f", {len(damaged)} DAMAGED" if damaged else ""))
    print(f"{'seq':>6} {'step':>10} {'epoch':>8} {'size':>10}")
    lines = {i.seq: f"{i.seq:>6} {i.step:>10} {_epoch(i):>8} {human_bytes(i.nbytes):>10}" for i in infos}
    lines.update({seq: f"{seq:>6} {'DAMAGED':>10} {'':>8} {'':>10}  {why}" for seq, why in damaged.items()})
    for seq in sorted(lines):
        print(lines[seq])
    return 0


def _epoch(info) -> str:
    if info.epoch_fraction is not None and info.epoch_fraction != info.epoch:
        return f"{info.epoch_fraction:.3g}"
    return str(info.epoch)


def _snapshots_verify(args) -> int:
    from twa_scale.store import open_run

    url, run = split_run_url(args.target)
    reader = open_run(url, run, storage_options=args.storage_options)
    problems = reader.verify()
    n = len(reader.snapshots())
    if args.json:
        print(json.dumps({"run": f"{url}/{run}", "snapshots": n, "ok": not problems, "problems": problems}))
        return 1 if problems else 0
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        print(f"verify {url}/{run}: {len(problems)} problem(s) in {n} committed snapshot(s)", file=sys.stderr)
        return 1
    print(f"verify {url}/{run}: {n} committed snapshot(s), all checksums OK")
    return 0


def _runs_ls(args) -> int:
    import hashlib
    import time

    from twa_scale.store import FormatError, Lease, RunManifest, RunPaths, check_url, open_run, open_store

    check_url(args.url)
    st = open_store(args.url, args.storage_options)
    now, rows = time.time(), []
    names = st.list_dirs("")
    if not names and hasattr(st, "fs") and not st.fs.exists(st.root):
        raise FileNotFoundError(f"{args.url}: no such location (nothing is stored there; check the URL)")
    for name in names:
        paths = RunPaths(name)
        try:
            m = RunManifest.from_json(st.get(paths.manifest), st.describe(paths.manifest))
        except FileNotFoundError:
            continue  # not a run
        except FormatError as e:
            rows.append({"run": name, "state": "damaged", "problem": str(e)})
            continue
        ident = m.identity or {"layout_fingerprint": m.fingerprint}
        fp = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        try:
            lease = Lease.from_json(st.get(paths.lease), st.describe(paths.lease))
            age = lease.age_seconds(now)
            state = "writing" if age < lease.timeout_seconds else "stale-lease"
            holder = {"session": lease.session, "host": lease.host, "heartbeat_age_seconds": round(age, 1)}
        except FileNotFoundError:
            state, holder = "idle", None
        except FormatError as e:
            state, holder = "invalid-lease", {"problem": str(e)}
        intact, damaged = open_run(args.url, name, storage_options=args.storage_options).scan()  # as snapshots ls
        rows.append({"run": name, "model": m.model, "D": m.D, "dtype": m.dtype, "created_at": m.created_at,
                     "fingerprint": fp, "identity": m.identity, "state": state, "lease": holder,
                     "snapshots": len(intact), "damaged_snapshots": len(damaged)})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'run':<28} {'model':<12} {'fingerprint':<13} {'snapshots':>9}  state")
    for r in rows:
        if "problem" in r:
            print(f"{r['run']:<28} {'':<12} {'':<13} {'':>9}  DAMAGED {r['problem']}")
            continue
        who = (f" (session {r['lease']['session']} on {r['lease']['host']}, heartbeat "
               f"{r['lease']['heartbeat_age_seconds']:.0f}s ago)") if r["lease"] and "session" in r["lease"] else ""
        print(f"{r['run']:<28} {str(r['model']):<12} {r['fingerprint']:<13} {r['snapshots']:>9}  {r['state']}{who}")
    return 0


def _add_snapshots(sub) -> None:
    p = sub.add_parser("snapshots", help="list or verify the snapshots of a run")
    cmds = p.add_subparsers(dest="snapshots_command", required=True)
    _store_command(cmds, "ls", "committed snapshots: seq, step, epoch, size; damaged ones marked",
                   _snapshots_ls, target="URL/RUN", json_help="print JSON (sizes in bytes) instead of a table")
    _store_command(cmds, "verify", "check every checksum; exit 1 naming each bad object", _snapshots_verify,
                   target="URL/RUN", json_help="print the verdict as JSON (ok, problems)")


def _store_command(cmds, name: str, help_text: str, func: Callable, *, target: str, json_help: str | None = None):
    """A subcommand over one store location: its positional target, optional --json, --storage-options."""
    p = cmds.add_parser(name, help=help_text)
    p.add_argument("url" if target == "URL" else "target", metavar=target)
    if json_help:
        p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--storage-options", metavar="JSON", help="fsspec filesystem arguments (a JSON object)")
    p.set_defaults(func=func)


def _add_data(sub) -> None:
    from twa_scale.data.shards import add_cli_command

    add_cli_command(sub)


def _add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list the runs under a snapshot URL")
    cmds = p.add_subparsers(dest="runs_command", required=True)
    _store_command(cmds, "ls", "runs with their fingerprint, lease holder, state and snapshot count", _runs_ls,
                   target="URL", json_help="print JSON instead of a table")


def _stop(args) -> int:
    from twa_scale.store.control import clear_stop, finished, write_stop

    url, run = split_run_url(args.target)
    where = f"{url}/{run}"
    if args.clear:
        removed = clear_stop(url, run, storage_options=args.storage_options)
        out = {"run": where, "action": "cleared" if removed else "no_marker"}
        text = f"{where}: stop marker removed" if removed else f"{where}: no stop marker to remove"
    elif (final := finished(url, run, storage_options=args.storage_options)) is not None:
        out = {"run": where, "action": "already_finished", "final": final}
        text = (f"{where} has already finished ({final.get('epochs')} epochs, val accuracy "
                f"{final.get('val_accuracy')}); no stop marker written")
    else:
        marker = write_stop(url, run, reason=args.reason, rule="manual", by="user",
                            storage_options=args.storage_options)
        out = {"run": where, "action": "requested", "reason": marker.reason}
        text = f"stop requested for {where}: {marker.reason} (training ends after its next snapshot)"
    print(json.dumps(out) if args.json else text)
    return 0


def _add_stop(sub) -> None:
    p = sub.add_parser("stop", help="ask a training job to end cleanly after its next snapshot (writes "
                                    "<run>/control/STOP.json, as the live TWA follower's stop rule does)")
    p.add_argument("target", metavar="URL/RUN")
    p.add_argument("--reason", default="stopped by hand (twa-scale stop)", help="recorded in the marker")
    p.add_argument("--clear", action="store_true", help="remove the run's stop marker instead (e.g. before a "
                                                        "--resume that should run on)")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec filesystem arguments (a JSON object)")
    p.set_defaults(func=_stop)


def build_parser() -> argparse.ArgumentParser:
    from twa_scale import __version__

    parser = argparse.ArgumentParser(prog="twa-scale", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"twa-scale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, what in (("train", "train with DeepSpeed (as launch/train.py; see `twa-scale train --help`)"),
                        ("twa", "run the TWA stage (as launch/twa.py; see `twa-scale twa --help`)")):
        sub.add_parser(stage, help=what, add_help=False)  # main() hands these their argv untouched
    for add in (_add_snapshots, _add_runs, _add_data, _add_stop):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for bad input, naming it)."""
    import os

    from twa_scale.errors import EXPECTED_ERRORS, exit_code

    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0].startswith("--local_rank"):  # DeepSpeed's launcher puts it before the command
        argv = argv[1 if "=" in argv[0] else 2:]
    if argv and argv[0] in ("train", "twa"):
        return run_stage(argv[0], argv[1:], prog=f"twa-scale {argv[0]}")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `twa-scale snapshots ls ... | head -2`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - classified; unexpected ones keep their traceback
        code = exit_code(e, (*EXPECTED_ERRORS, OSError))
        if code is None:
            raise
        # a KeyError's str() is its repr: take the message itself (stripping quotes unbalanced others)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"twa-scale: error: {msg}", file=sys.stderr)
        return code


def exit_process(code: int) -> NoReturn:
    """End a `twa-scale` process with ``code``: atexit handlers run (the metrics endpoint's last scrape
    window among them) and the streams flush, but the interpreter is not finalized. After a clean
    ``destroy_process_group`` gloo's worker threads can still abort a finalizing interpreter (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#179291): seen here on 2-rank TWA runs
    whose results were already written, and a launcher or Kubernetes counts that job as failed."""
    import atexit
    import logging
    import os

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone (a pipe whose reader left)
            pass
    os._exit(code)


def console() -> NoReturn:
    """The `twa-scale` console script: :func:`main`, ended by :func:`exit_process`."""
    exit_process(main())


if __name__ == "__main__":
    console()
