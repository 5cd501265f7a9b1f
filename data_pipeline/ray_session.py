"""Starting (or joining) the Ray session every Ray stage runs in: the streaming loaders, `train`, `infer` and
the LoID trainer. Ray's own bookkeeping chatter (each worker's "Reporting training result" line, the placement
group cleaner's State API warnings, Ray Data's execution plans, torch.distributed's deprecation notices) is silenced in every Ray process through a
worker setup hook and stays in Ray's session logs; what the stages print themselves (tqdm bars, validation
rounds, warnings) still reaches the console. `RECLLM_RAY_VERBOSE=1` (the CLI's `-v`) keeps everything.
"""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.train.v2._internal.execution.worker_group": logging.WARNING,
    "ray.train": logging.WARNING,
    "ray.data": logging.WARNING,
    "DeepSpeed": logging.WARNING,
}


def quiet_ray_logs() -> None:
    """Worker setup hook: lower the loggers that narrate Ray's own work (runs in every Ray worker process)."""
    if os.environ.get("RECLLM_RAY_VERBOSE") == "1":
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:  # Ray Train's context logs each report under its file path, not a dotted name
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    import warnings

    # torch.distributed's deprecation notice for the gloo/NCCL call DeepSpeed makes, once per worker
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def ray_train_log_level() -> str:
    """Ray Train's own console level (its LoggingConfig): its per-report and checkpoint lines stay in its logs."""
    return "INFO" if os.environ.get("RECLLM_RAY_VERBOSE") == "1" else "WARNING"


def worker_log_level(rank: int) -> int:
    """The level of this project's loggers in a training worker: rank 0 narrates, the others only warn."""
    if os.environ.get("RECLLM_RAY_VERBOSE") == "1":
        return logging.INFO
    return logging.INFO if rank == 0 else logging.WARNING


def connect_ray(env_vars: dict[str, str] | None = None) -> None:
    """ray.init for this process unless a session is already up: the cluster in RAY_ADDRESS, else a local one."""
    import ray

    if ray.is_initialized():
        return
    verbose = os.environ.get("RECLLM_RAY_VERBOSE") == "1"
    runtime_env: dict = {"worker_process_setup_hook": "data_pipeline.ray_session.quiet_ray_logs"}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env, include_dashboard=False,
             log_to_driver=True, logging_level=logging.INFO if verbose else logging.WARNING)
    quiet_ray_logs()
