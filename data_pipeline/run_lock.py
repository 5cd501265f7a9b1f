"""One writer per run_dir: run_dir/.lock (JSON: host, pid, start time, stage), created only if absent.

Local disk uses O_CREAT|O_EXCL; s3:// a put with `If-None-Match: *`, so two writers racing for the same run_dir
cannot both win. The CLI takes it around every stage that writes (the pipeline once for all); readers never do.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.run_layout import RunLayout


class RunLocked(DataError):
    """Another writer holds run_dir/.lock (or held it and left it behind)."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: tells a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return started is None or _process_start(pid) in (None, started)


def _describe(holder: dict) -> str:
    if not holder:
        return "an unreadable lock"
    age = time.time() - float(holder.get("started_unix", time.time()))
    return (f"stage {holder.get('stage')}, pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('started')} ({age / 60:.0f} min ago)")


def stale_reason(holder: dict, max_age_s: float, mtime: float | None = None) -> str | None:
    """Why a lock may be broken, or None while its holder may still be writing."""
    started = float(holder.get("started_unix", mtime or time.time()))
    if time.time() - started > max_age_s:
        return f"older than {max_age_s / 3600:g} h"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _pid_alive(holder["pid"], holder.get("pid_start")):
        return "its process is gone"
    return None


@dataclass
class RunLock:
    uri: str
    holder: dict
    created_dir: str | None = None
    """The local run_dir this lock had to create: removed again on release when the stage left it empty."""

    def release(self) -> None:
        """Remove the lock if it is still ours (a --break-lock by someone else may have replaced it)."""
        with contextlib.suppress(FileNotFoundError, DataError):
            if _read(self.uri)[0].get("nonce") == self.holder["nonce"]:
                fs, path = storage.filesystem(self.uri)
                fs.rm(path)
        if self.created_dir:
            with contextlib.suppress(OSError):  # not empty: the stage wrote its output there
                os.rmdir(self.created_dir)


def _read(uri: str) -> tuple[dict, float | None]:
    """(holder, modification time) of an existing lock; an unreadable one reads as {}."""
    fs, path = storage.filesystem(uri)
    try:
        mtime = fs.modified(path).timestamp()
    except (OSError, NotImplementedError, AttributeError):
        mtime = None
    try:
        holder = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise
    except (ValueError, OSError):
        holder = {}
    return (holder if isinstance(holder, dict) else {}), mtime


def _create(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there; False if something is."""
    fs, path = storage.filesystem(uri)
    if storage.is_local(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    try:
        fs.pipe_file(path, data, mode="create")  # S3: PutObject with If-None-Match: *
    except FileExistsError:
        return False
    return True


def acquire(run_dir: str, stage: str, *, break_lock: bool = False, max_age_s: float = 24 * 3600) -> RunLock:
    """Take run_dir/.lock for ``stage`` or raise RunLocked naming the holder."""
    uri = RunLayout(run_dir).lock
    pid = os.getpid()
    holder = {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid), "stage": stage,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "started_unix": time.time(),
              "nonce": uuid.uuid4().hex}
    data = json.dumps(holder, indent=1).encode()
    created_dir = run_dir if storage.is_local(run_dir) and not os.path.exists(run_dir) else None
    for _ in range(2):  # a second try only after breaking a stale lock
        if _create(uri, data):
            return RunLock(uri, holder, created_dir)
        try:
            other, mtime = _read(uri)
        except FileNotFoundError:
            continue  # released between our create and our read
        reason = stale_reason(other, max_age_s, mtime)
        if not (break_lock and reason):
            hint = f"; it is stale ({reason}): rerun with --break-lock" if reason else \
                "; wait for it, or if it is dead rerun with --break-lock"
            raise RunLocked(uri, f"run_dir is locked by {_describe(other)}{hint}")
        if _read(uri)[0] == other:  # still the lock we judged; another breaker may have replaced it
            fs, path = storage.filesystem(uri)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
    raise RunLocked(uri, "run_dir lock changed hands while breaking it; try again")


@contextlib.contextmanager
def run_dir_lock(run_dir: str, stage: str, *, break_lock: bool = False,
                 max_age_s: float = 24 * 3600) -> Iterator[RunLock]:
    """Hold run_dir/.lock for the ``with`` block; released on any exit that runs Python's finally."""
    lock = acquire(run_dir, stage, break_lock=break_lock, max_age_s=max_age_s)
    try:
        yield lock
    finally:
        lock.release()
