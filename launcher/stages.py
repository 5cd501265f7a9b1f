"""The stages of the flow, in order, each a function of the composed config; `pipeline` runs them in turn."""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("recllm")


def prepare(cfg) -> None:
    from data_pipeline.prepare import run_prepare

    manifest = run_prepare(cfg.data, cfg.run_dir)
    c = manifest["counts"]
    print(f"dataset: {c['users']} users, {c['items']} items, {c['interactions']} interactions; "
          f"rows train={c['train_rows']} valid={c['valid_rows']} test={c['test_rows']} -> {cfg.run_dir}/dataset")


STAGES: dict[str, Callable] = {"prepare": prepare}


def pipeline(cfg) -> None:
    for name in cfg.stages:
        log.info("stage %s", name)
        STAGES[name](cfg)
