"""A later stage starts from what its run_dir recorded (issue #27): the config a command runs with is the given
CONFIG + overrides, except the sections of the stages before it, which come from run_dir/config/stages.json (what
each of those stages was last built with; see run_record). A value the CONFIG file alone differs in is taken from
the record, with one line saying so; an override that changes what an earlier stage used is refused in one line
naming the field, because the run_dir's outputs were not built with it. Sits between the CLI and the config loader.
"""

from __future__ import annotations

from typing import Any

import yaml

from data_pipeline import storage
from data_pipeline.config_schema import ConfigError, parse_overrides, to_dict
from launcher.run_record import RECORD_DIR, STAGE_SECTIONS, STAGES_FILE


def stages_before(first_stage: str | None) -> list[str]:
    """The pipeline stages before ``first_stage`` (none for a command that is no pipeline stage)."""
    order = list(STAGE_SECTIONS)
    return order[:order.index(first_stage)] if first_stage in order else []


def _differences(prefix: str, recorded: Any, given: Any):
    """(dotted field, recorded value, given value) for every leaf where the two differ."""
    if isinstance(recorded, dict) and isinstance(given, dict):
        for key in given:
            if key in recorded:
                yield from _differences(f"{prefix}.{key}", recorded[key], given[key])
    elif recorded != given:
        yield prefix, recorded, given


def _overridden(dotted: str, keys: set[str]) -> str | None:
    return next((k for k in keys if dotted == k or dotted.startswith(k + ".") or k.startswith(dotted + ".")), None)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def merge_recorded(given: dict, stages: dict, first_stage: str | None, overrides: list[str],
                   record_uri: str) -> tuple[dict, list[str]]:
    """``given`` (a resolved config as a dict) with the sections of the stages before ``first_stage`` taken from
    ``stages`` (stages.json), and the fields it took. Raises ConfigError when an override changes one of them."""
    given = yaml.safe_load(yaml.safe_dump(given))  # the record's own types: lists, plain scalars
    keys = {key for key, _ in parse_overrides(overrides)}
    taken = []
    for stage in stages_before(first_stage):
        for section, recorded in stages.get(stage, {}).get("sections", {}).items():
            for dotted, old, new in _differences(section, recorded, given.get(section)):
                if _overridden(dotted, keys) is not None:
                    raise ConfigError([f"{dotted}={new!r} conflicts with {old!r}, which `{stage}` used for this "
                                       f"run_dir ({record_uri}); drop the override, rerun from that stage (`recllm "
                                       f"pipeline CONFIG --from {stage}`) or use a new run_dir"], "run_dir record")
                _set(given, dotted, old)
                taken.append(dotted)
    return given, taken


def start_from_record(cfg, config_path: str, overrides: list[str], first_stage: str | None, build):
    """``cfg`` (CONFIG + overrides) with what run_dir's record says the stages before ``first_stage`` used, rebuilt
    through ``build(dict)``; and the one line to print when it took anything (else None)."""
    uri = storage.join(cfg.run_dir, RECORD_DIR, STAGES_FILE)
    if not stages_before(first_stage) or not storage.exists(uri):
        return cfg, None
    merged, taken = merge_recorded(to_dict(cfg), storage.read_json(uri), first_stage, overrides, uri)
    if not taken:
        return cfg, None
    shown = ", ".join(taken[:4]) + (f" and {len(taken) - 4} more" if len(taken) > 4 else "")
    return build(merged), (f"recllm: {len(taken)} setting(s) the earlier stages used differ from {config_path}; "
                           f"using the run_dir's ({uri}): {shown}")
