"""`recllm <command> CONFIG [key=value ...]`: parse the config, run one stage (or the pipeline), exit.

Every command that writes into run_dir holds run_dir/.lock while it runs (data_pipeline/run_lock.py). Bad input
(config, data, a missing stage input, a plan that cannot fit) ends in one line and exit 2; --debug adds the traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import traceback

from data_pipeline.config_schema import ConfigError
from data_pipeline.errors import DataError, WriteError
from trainers.memory_plan import PlanError


def _commands():
    from launcher import stages

    return {**stages.STAGES, "pipeline": stages.pipeline, "plan": stages.plan}


USAGE = ("usage: recllm <command> CONFIG [key=value ...] [--break-lock] [--debug] [-v] [--from STAGE]\n"
         "commands: {}, submit")
READERS = {"plan", "infer", "evaluate", "evaluate-loid", "evaluate-reviews"}
"""Commands that run without run_dir/.lock; every other one (a new stage too) takes it."""
FLAGS = {"--break-lock", "--debug", "-v"}
"""-v: Ray's, Ray Train's and DeepSpeed's own INFO lines on the console too (by default they stay in Ray's logs)."""
USER_ERRORS = (ConfigError, DataError, PlanError, WriteError, FileNotFoundError)
"""What a user fixes (the stages raise FileNotFoundError for a missing input: `run recllm build-ids first`)."""
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""An OSError with one of these (full disk, quota, read-only) is one line too, wherever it was raised."""


def _from_object_store(exc: BaseException) -> bool:
    """An object store that still failed after the client's retries (an S3 outage: s3fs raises OSError from
    botocore's error): nothing for a traceback to show, one line says it."""
    return any(type(e).__module__.split(".")[0] in ("botocore", "aiobotocore") for e in (exc, exc.__cause__))


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, USER_ERRORS) or (isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS) or \
        _from_object_store(exc)


@contextlib.contextmanager
def _writer_lock(command: str, cfg, break_lock: bool):
    """run_dir/.lock around a writing command; SIGTERM (kill, `ray job stop`) then unwinds like Ctrl-C and
    releases it, so only SIGKILL leaves a lock behind (broken by --break-lock once its pid is gone)."""
    if command in READERS:
        yield
        return
    from data_pipeline.run_lock import run_dir_lock

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # a SIGTERM while the lock is being taken waits until the handler can release it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with run_dir_lock(cfg.run_dir, command, break_lock=break_lock, max_age_s=cfg.lock_max_age_hours * 3600):
            if main_thread:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a pending one exits here, unlocking
            from data_pipeline import storage

            for output in storage.restore_interrupted_publishes(cfg.run_dir):
                print(f"recllm {command}: {output}: put back the previous output that an interrupted publish had "
                      "half replaced", file=sys.stderr)
            yield
    finally:
        if main_thread:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.signal(signal.SIGTERM, previous)


def submit(argv: list[str]) -> int:
    """`recllm submit CONFIG --address URL [key=value ...]`: validate here, run on a Ray cluster as a Ray Job."""
    import argparse
    import json
    import os

    from cluster.job_submission import build_submission, open_cluster_refusal, run_submission, use_cluster_token
    from launcher.stages import STAGES

    parser = argparse.ArgumentParser(prog="recllm submit", description=submit.__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    parser.add_argument("--stage", default="pipeline", choices=["pipeline", *STAGES], help="default: pipeline")
    parser.add_argument("--dry-run", action="store_true", help="print the submission as JSON and send nothing")
    parser.add_argument("--install-requirements", action="store_true",
                        help="pip-install requirements.txt into the job (when the cluster image lacks them)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job environment variable")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plain http to a non-loopback address with no cluster token")
    args = parser.parse_intermixed_args(argv)
    if not (args.address or args.dry_run):
        parser.error("--address is required (or set RAY_API_SERVER_ADDRESS)")
    try:
        job = build_submission(args.config, args.overrides, stage=args.stage, address=args.address,
                               install_requirements=args.install_requirements, env=args.env)
    except ConfigError as exc:
        print(f"recllm submit: error: {exc}", file=sys.stderr)
        return 2
    token = use_cluster_token()
    refusal = None if args.insecure or not args.address else open_cluster_refusal(args.address, token)
    if args.dry_run:
        would = (f"refused: {refusal}" if refusal else
                 f"sent to {args.address} with {'the cluster token' if token else 'no cluster token'}"
                 if args.address else "nothing: no --address")
        print(json.dumps(job.as_dict(), indent=2))  # exactly the submission; what would happen goes to stderr
        print(f"recllm submit --dry-run: the real submit would be {would}", file=sys.stderr)
        return 0
    if refusal:
        print(f"recllm submit: error: {refusal}", file=sys.stderr)
        return 2
    return run_submission(job)


RECORDLESS = READERS
"""Commands that take no lock (readers, plan) record nothing: only a writer may change run_dir's own files."""


def _take_from(argv: list[str]) -> tuple[list[str], str | None]:
    """`--from STAGE` / `--from=STAGE` (pipeline only): removed from argv, returned apart."""
    out, stage, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--from" and i + 1 < len(argv):
            stage, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--from="):
            stage = argv[i].split("=", 1)[1]
        else:
            out.append(argv[i])
        i += 1
    return out, stage


def _stages_from(stages: list[str], start: str) -> list[str]:
    from data_pipeline.config_schema import ConfigError
    from launcher.command_help import did_you_mean

    if start not in stages:
        raise ConfigError([f"--from {start}: not among this config's stages {stages}{did_you_mean(start, stages)}"],
                          "command line")
    return stages[stages.index(start):]


def command_help_hint(flag: str) -> str:
    from launcher.command_help import did_you_mean

    return did_you_mean(flag, FLAGS | {"--help", "--version"})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recllm")
    except PackageNotFoundError:
        return "unknown"


def _help(argv: list[str]) -> int | None:
    """--help / -h / --version / `recllm config`: answered from the config schema alone (no torch, no Ray)."""
    from launcher import command_help
    from launcher.config import RecllmConfig

    if argv[:1] in (["--version"], ["-V"]):
        print(f"recllm {_version()}")
        return 0
    if not argv or argv[0] in ("--help", "-h", "help"):
        print(command_help.overview(_version()))
        return 0 if argv else 2
    if argv[0] not in command_help.COMMANDS:
        print(f"recllm: unknown command {argv[0]!r}{command_help.did_you_mean(argv[0], command_help.COMMANDS)}\n"
              f"{command_help.USAGE}\n(`recllm --help` lists the commands)", file=sys.stderr)
        return 2
    if "--help" in argv or "-h" in argv:
        print(command_help.command_help(RecllmConfig, argv[0]))
        return 0
    if argv[0] == "config":
        import yaml

        from data_pipeline.config_schema import to_dict
        from launcher.config import load_config

        if len(argv) < 2:
            print("usage: recllm config CONFIG [key=value ...]", file=sys.stderr)
            return 2
        try:
            print(yaml.safe_dump(to_dict(load_config(argv[1], argv[2:])), sort_keys=False), end="")
        except ConfigError as exc:
            print(f"recllm config: error: {exc}", file=sys.stderr)
            return 2
        return 0
    return None


def _start_from_record(cfg, argv: list[str], start_stage: str | None):
    """The sections of the stages before this command come from what run_dir recorded (launcher/recorded_config)."""
    from launcher.config import config_from_mapping
    from launcher.recorded_config import start_from_record

    command = argv[0]
    first = (start_stage or (cfg.stages[0] if cfg.stages else None)) if command == "pipeline" else command
    cfg, line = start_from_record(cfg, argv[1], argv[2:], first,
                                  lambda data: config_from_mapping(data, f"{argv[1]} + run_dir record"))
    if line:
        print(line, flush=True)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:
        return submit(argv[1:])
    answered = _help(argv)
    if answered is not None:
        return answered
    commands = _commands()
    argv, start_stage = _take_from(argv)
    flags = {a for a in argv if a.startswith("--") or a == "-v"}
    argv = [a for a in argv if a not in flags]
    if len(argv) < 2 or argv[0] not in commands or flags - FLAGS:
        unknown = sorted(flags - FLAGS)
        hint = f"\nunknown flag {unknown[0]}{command_help_hint(unknown[0])}" if unknown else ""
        print(USAGE.format(", ".join(commands)) + hint, file=sys.stderr)
        return 2
    # Quiet by default: each stage prints its own start and summary lines; -v brings the INFO log back.
    logging.basicConfig(level=logging.INFO if "-v" in flags else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if "-v" in flags:
        os.environ["RECLLM_RAY_VERBOSE"] = "1"  # read by data_pipeline.ray_session in this and every Ray process
    from launcher.config import load_config

    try:
        cfg = load_config(argv[1], argv[2:])
        cfg = _start_from_record(cfg, argv, start_stage)
        from launcher.preflight import preflight_problems

        problems = preflight_problems(cfg, argv[0])
        if problems:
            raise ConfigError(problems, "preflight")
        import datetime as dt

        started = dt.datetime.now(dt.timezone.utc)
        if argv[0] != "plan":
            from data_pipeline.library_log import route_library_logs, set_log_dir

            set_log_dir(cfg.run_dir)  # other libraries' chatter: run_dir/logs/libraries.log
            route_library_logs()
        with _writer_lock(argv[0], cfg, "--break-lock" in flags):
            if argv[0] == "pipeline" and start_stage:
                cfg.stages = _stages_from(cfg.stages, start_stage)
            commands[argv[0]](cfg)
            if argv[0] == "pipeline":
                from launcher.run_summary import summary_lines

                seconds = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
                print("\n".join(summary_lines(cfg, argv[1], seconds)), flush=True)
            if argv[0] not in RECORDLESS:
                from launcher.run_record import record_run, stages_run

                record_run(cfg, argv[0], argv[1], argv[2:], started, stages_run(cfg, argv[0]))
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        if "--debug" in flags:
            traceback.print_exc()
        store = "object store request failed after retries: " if _from_object_store(exc) else ""
        print(f"recllm {argv[0]}: error: {store}{exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
