"""Where other libraries' chatter goes: run_dir/logs/libraries.log, not the console.

The CLI names the folder (`RECLLM_LOG_DIR`) before the first stage; `connect_ray` hands it to every Ray process,
whose setup hook calls `route_library_logs` too. Ray's, Ray Data's, Ray Train's, DeepSpeed's, transformers' and
torch's loggers, and Python warnings, then write there (at the levels they set) and no longer reach the console; what recllm
prints itself (stage lines, progress bars, validation rounds, its own warnings) still does. DeepSpeed's bare
`print`s are caught with `prints_to_log`. `-v` (RECLLM_RAY_VERBOSE=1) leaves everything on the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

LOG_DIR_VARIABLE = "RECLLM_LOG_DIR"
LOG_NAME = "libraries.log"
LIBRARY_LOGGERS = ("ray", "DeepSpeed", "deepspeed", "transformers", "torch", "py.warnings", "filelock", "fsspec",
                   "s3fs", "urllib3", "accelerate", "peft")
_FORMAT = "%(asctime)s pid %(process)d %(name)s %(levelname)s %(message)s"


def verbose() -> bool:
    return os.environ.get("RECLLM_RAY_VERBOSE") == "1"


def library_log_path() -> Path | None:
    folder = os.environ.get(LOG_DIR_VARIABLE)
    return Path(folder) / LOG_NAME if folder else None


def set_log_dir(run_dir: str) -> Path:
    """run_dir/logs for a local run_dir; a local folder named after it for s3:// (logs stay on this machine)."""
    if "://" in run_dir:
        import hashlib
        import tempfile

        folder = Path(tempfile.gettempdir()) / "recllm-logs" / hashlib.sha256(run_dir.encode()).hexdigest()[:12]
    else:
        folder = Path(run_dir).absolute() / "logs"
    os.environ[LOG_DIR_VARIABLE] = str(folder)  # made on the first line written: a run that logs nothing has none
    if not verbose():
        # transformers' own bars ("Loading weights", "Writing model shards") read this when it is imported...
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "huggingface_hub" in sys.modules:  # ...or huggingface_hub's switch, when that was imported before
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:  # ...and its own switch when it already was
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    return folder


_handler: logging.Handler | None = None


class _FolderMakingFileHandler(logging.FileHandler):
    """Opens (and makes the folder of) the log file on the first record, not before."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def route_library_logs() -> None:
    """Send the library loggers of this process to the log file (once per process; no-op without a folder)."""
    path = library_log_path()
    if path is None or verbose():
        return
    global _handler
    if _handler is None:
        _handler = _FolderMakingFileHandler(path, encoding="utf-8", delay=True)  # append: every process writes here
        _handler.setFormatter(logging.Formatter(_FORMAT))
        _handler.set_name("recllm-library-log")
    handler = _handler
    logging.captureWarnings(True)
    existing = [name for name, logger in logging.Logger.manager.loggerDict.items()
                if isinstance(logger, logging.Logger) and name.split(".")[0] in LIBRARY_LOGGERS]
    for name in sorted(set(LIBRARY_LOGGERS) | set(existing)):
        logger = logging.getLogger(name)
        consoles = [h for h in logger.handlers if _is_console(h)]
        for console in consoles:
            logger.removeHandler(console)  # Ray, Ray Data, transformers and DeepSpeed attach their own
        top = name in LIBRARY_LOGGERS
        if (top or consoles or not logger.propagate) and not any(h.get_name() == handler.get_name()
                                                                  for h in logger.handlers):
            logger.addHandler(handler)
        if top:
            logger.propagate = False  # levels stay the libraries' own: their warnings, not their INFO


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
        getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


_log_stream = None


def _stream():
    """This process's open handle on the log file, kept for its life (handlers made under it keep writing)."""
    global _log_stream
    if _log_stream is None:
        library_log_path().parent.mkdir(parents=True, exist_ok=True)
        _log_stream = open(library_log_path(), "a", encoding="utf-8", buffering=1)
    return _log_stream


def import_quietly(module: str) -> None:
    """Import a library that talks while it loads (DeepSpeed: its accelerator notice, and a console handler it
    creates on import) with stdout and stderr on the log file, so that its handler writes there from then on."""
    import importlib

    if module in sys.modules or library_log_path() is None or verbose():
        importlib.import_module(module)
        return
    with contextlib.redirect_stdout(_stream()), contextlib.redirect_stderr(_stream()):
        importlib.import_module(module)


@contextlib.contextmanager
def prints_to_log():
    """stdout inside the block goes to the log file (a library's bare prints); the console without a folder."""
    path = library_log_path()
    if path is None or verbose():
        yield
        return
    with contextlib.redirect_stdout(_stream()):
        yield
