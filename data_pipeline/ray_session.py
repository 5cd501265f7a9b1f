"""Starting (or joining) the Ray session every Ray stage runs in: the streaming loaders, `train`, `infer` and
the LoID trainer. Ray's own bookkeeping chatter (each worker's "Reporting training result" line, the placement
group cleaner's State API warnings, Ray Data's execution plans, torch.distributed's deprecation notices) is silenced in every Ray process through a
worker setup hook and stays in Ray's session logs; what the stages print themselves (tqdm bars, validation
rounds, warnings) still reaches the console. `RECLLM_RAY_VERBOSE=1` (the CLI's `-v`) keeps everything.
"""

from __future__ import annotations

import logging
import os
import socket

from data_pipeline.library_log import LOG_DIR_VARIABLE, route_library_logs, verbose

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
"""Ray's own variable for the GCS port of a head it starts (ray._private.ray_constants)."""

QUIET_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.train.v2._internal.execution.worker_group": logging.WARNING,
    "ray.train": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled": recllm draws its own
    "DeepSpeed": logging.WARNING,
}


def quiet_ray_logs() -> None:
    """Worker setup hook: lower the loggers that narrate Ray's own work (runs in every Ray worker process), and
    send the libraries' loggers to run_dir/logs/libraries.log."""
    if verbose():
        return
    route_library_logs()
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
    """Ray Train's own console level (its LoggingConfig): its per-report and checkpoint lines, and its warnings,
    stay in its logs (the Ray session's ray-train-*.log). A loaded CPU makes its controller warn "Failed to send
    resource request ... safe to ignore" with a traceback; the level must be set here, because Ray Train's
    logging config resets every ``ray.train.*`` logger's own level in its controller (QUIET_LOGGERS cannot)."""
    return "INFO" if verbose() else "ERROR"


def worker_log_level(rank: int) -> int:
    """The level of this project's loggers in a training worker: rank 0 narrates, the others only warn."""
    if verbose():
        return logging.INFO
    return logging.INFO if rank == 0 else logging.WARNING


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def connect_ray(env_vars: dict[str, str] | None = None) -> None:
    """ray.init for this process unless a session is already up: the cluster in RAY_ADDRESS, else a local one.

    A local Ray gets a GCS port of its own, and its workers get that address in RAY_ADDRESS. Without it, code
    inside Ray that asks for "the" cluster with no address (Ray Train's placement-group cleaner, through the State
    API) scans the host's processes, finds a second run's Ray and dies with "Found multiple active Ray instances".
    So two pipelines on one machine each see only their own Ray.
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict = {"worker_process_setup_hook": "data_pipeline.ray_session.quiet_ray_logs"}
    address = os.environ.get("RAY_ADDRESS") or None
    worker_env = dict(env_vars or {})
    for name in (LOG_DIR_VARIABLE, "HF_HUB_DISABLE_PROGRESS_BARS"):
        if name in os.environ:
            worker_env.setdefault(name, os.environ[name])
    route_library_logs()  # before ray.init: its start-up notices (token authentication) go to the file
    gcs_port = None
    if address is None:
        from ray._private.services import get_node_ip_address

        gcs_port = free_port()
        worker_env["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
        os.environ[GCS_PORT_VARIABLE] = str(gcs_port)  # read by Ray when it starts the local head
    if worker_env:
        runtime_env["env_vars"] = worker_env
    try:
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False,
                 log_to_driver=True, logging_level=logging.INFO if verbose() else logging.WARNING)
    finally:
        if gcs_port is not None:
            os.environ.pop(GCS_PORT_VARIABLE, None)  # a later local Ray (after ray.shutdown) picks its own
    quiet_ray_logs()
