"""The pipeline's last lines: its wall time, where the report, plots, logs and training curves are, and one "next:".

Called by the CLI after `recllm pipeline` succeeds (launcher/cli.py); reads nothing but run_dir's listing.
"""

from __future__ import annotations

import shlex

from data_pipeline import storage
from data_pipeline.library_log import library_log_path
from data_pipeline.run_layout import RunLayout


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def summary_lines(cfg, config_path: str, seconds: float) -> list[str]:
    layout = RunLayout(cfg.run_dir)
    lines = [f"done in {_minutes(seconds)}: {cfg.run_dir}"]
    report = layout.report("report.md")
    if storage.exists(report):
        plots = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(layout.report(), ".png")]
        lines.append(f"  report: {report}" + (f"  (plots: {', '.join(plots)})" if plots else ""))
    log = library_log_path()
    if log is not None and log.exists():
        lines.append(f"  logs:   {log}  (Ray, DeepSpeed and the other libraries)")
    if "://" not in cfg.run_dir:
        lines.append(f"  curves: tensorboard --logdir {shlex.quote(cfg.run_dir)}")
    topk = layout.path("topk")
    run = f"run_dir={shlex.quote(cfg.run_dir)}"
    if storage.exists(topk):
        lines.append(f"next: serve {topk}/ (top-{cfg.infer.top_k} per user); each night, "
                     f"recllm infer {shlex.quote(config_path)} {run} scores only users whose history changed")
    else:
        lines.append(f"next: recllm infer {shlex.quote(config_path)} {run}")
    return lines
