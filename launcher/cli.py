"""`recllm <command> CONFIG [key=value ...]`: parse the config, run one stage (or the pipeline), exit."""

from __future__ import annotations

import logging
import sys

from data_pipeline.errors import DataError
from launcher.config_schema import ConfigError
from trainers.memory_plan import PlanError


def _commands():
    from launcher import stages

    return {**stages.STAGES, "pipeline": stages.pipeline, "plan": stages.plan}


USAGE = "usage: recllm <command> CONFIG [key=value ...]\ncommands: {}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if len(argv) < 2 or argv[0] not in commands:
        print(USAGE.format(", ".join(commands)), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from launcher.config import load_config

    try:
        cfg = load_config(argv[1], argv[2:])
        commands[argv[0]](cfg)
    except (ConfigError, DataError, PlanError) as exc:
        print(f"recllm {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
