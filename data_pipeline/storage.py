"""Local and s3:// paths through fsspec: read with UTF-8 and JSON checks, publish folders atomically.

Every stage writes through here, so every output appears complete or not at all: a write that fails (disk
full, quota) is a WriteError naming the file, and a killed writer leaves only hidden temporaries, which the
next writer of that folder removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import socket
import sys
import time
import uuid
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.errors import DataError, WriteError


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a remote URI such as s3://bucket/key."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        return posixpath.join(uri, *parts)
    import os
    return os.path.join(uri, *parts)


def umask_file_mode() -> int:
    """The mode a plain open() gives a new file here (0o666 less the umask): every published file gets it, also
    those a library wrote through a private temporary file (transformers' model.safetensors came out 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A URI every process can resolve: remote URIs as they are, local paths made absolute."""
    import os

    return uri if is_remote(uri) else os.path.abspath(uri)


def remove(uri: str) -> None:
    """Delete a file or folder; nothing to delete is fine."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def writing(uri: str, consequence: str = "") -> Iterator[None]:
    """Turn an OSError raised while writing ``uri`` (ENOSPC, EDQUOT, EROFS, EACCES...) into a WriteError naming
    it: the OS's own message often names no file at all."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        code = f" [{errno.errorcode.get(exc.errno, exc.errno)}]" if exc.errno else ""
        raise WriteError(uri, f"cannot write: {reason}{code}{consequence}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """One small file (a marker, a log): written whole by one put, so a reader sees all of it or nothing."""
    fs, path = filesystem(uri)
    with writing(uri):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)


def upload_folder(local: str, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (a no-op when ``uri`` is that folder)."""
    import os

    if not is_remote(uri) and os.path.abspath(uri) == os.path.abspath(local):
        return
    fs, path = filesystem(uri)
    for root, _, names in os.walk(local):
        for name in names:
            src = os.path.join(root, name)
            dst = posixpath.join(path, os.path.relpath(src, local).replace(os.sep, "/"))
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.put_file(src, dst)


def local_copy(uri: str) -> str:
    """A local folder holding ``uri``'s files: the folder itself when local, else a copy in a fresh temporary
    folder (libraries such as transformers' from_pretrained read local paths only)."""
    import tempfile

    if not is_remote(uri):
        return uri
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise DataError(uri, "not found")
    target = tempfile.mkdtemp(prefix="recllm-copy-")
    fs.get(path.rstrip("/") + "/", target, recursive=True)
    return target


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(uri, "file not found") from None
    except IsADirectoryError:
        raise DataError(uri, "expected a file, found a folder") from None


def read_json(uri: str, missing: str = "file not found"):
    """A JSON file's content. Absent (``missing`` says what to do about it) or not JSON is a DataError naming
    the file, and the line where the JSON breaks."""
    if not exists(uri):
        raise DataError(uri, missing)
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(uri, f"not valid JSON ({exc.msg}, column {exc.colno})", row=f"line {exc.lineno}") from None


def read_text(uri: str) -> str:
    """Whole file as text; invalid UTF-8 is an error naming the line."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(uri, f"invalid UTF-8 at byte {exc.start}", row=f"line {line}") from None


def list_files(uri: str, suffix: str) -> list[str]:
    """Sorted URIs of files under ``uri`` (recursive) ending in ``suffix``."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    found = sorted(p for p in fs.find(path) if p.endswith(suffix))
    proto = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [proto + p if proto and not p.startswith(proto) else p for p in found]


def parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    return buf.getvalue()


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file or folder; a corrupt file is an error naming it."""
    fs, path = filesystem(uri)
    files = [path] if fs.isfile(path) else sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not files:
        raise DataError(uri, "no Parquet files found")
    tables = []
    for p in files:
        try:
            with fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(p, f"corrupt or unreadable Parquet: {exc}") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(folder: str, files: dict[str, dict], manifest: str, rebuild: str) -> None:
    """Check that ``folder`` holds exactly the files ``manifest`` lists (``files``: rel -> {sha256, bytes}), with
    those bytes: a file from another run, or a missing, extra, truncated or edited one, is a DataError whose
    message ends with ``rebuild`` (what to run)."""
    fs, root = filesystem(folder)
    for rel in sorted(files):
        uri, entry = join(folder, rel), files[rel]
        if not fs.exists(posixpath.join(root, rel)):
            raise DataError(uri, f"listed in {manifest} but missing; {rebuild}")
        size = fs.size(posixpath.join(root, rel))
        if "bytes" in entry and size != entry["bytes"]:
            raise DataError(uri, f"{size} bytes where {manifest} records {entry['bytes']} (truncated, or from "
                                 f"another run); {rebuild}", field="bytes")
        if "sha256" in entry and _sha256(fs, posixpath.join(root, rel)) != entry["sha256"]:
            raise DataError(uri, f"sha256 differs from the one {manifest} records (from another run, or edited); "
                                 f"{rebuild}", field="sha256")
    manifest_name = posixpath.basename(manifest)
    for path in sorted(fs.find(root)):
        rel = posixpath.relpath(path, root)
        if rel != manifest_name and rel not in files and not posixpath.basename(rel).startswith("."):
            raise DataError(join(folder, rel), f"not listed in {manifest} (from another run?); {rebuild}")


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return _protocol(fs) in ("file", "local")


def is_local(uri: str) -> bool:
    """True for a path on this machine's filesystem, False for s3:// and other object stores."""
    return _is_local(filesystem(uri)[0])


def _exchange(a: str, b: str) -> bool:
    """Swap two local paths in one step (Linux renameat2 RENAME_EXCHANGE), so a reader or a SIGKILL never sees
    ``b`` missing; False where this OS or filesystem cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), a)


_HOST = socket.gethostname()
_SIBLING = re.compile(r"\.(?:tmp|old)-[0-9a-f]{8}(?:-(\d+)@(.+))?$")
STALE_AFTER_S = 24 * 3600
"""A temporary written from another host is removed only once this old (its writer cannot be checked)."""


def _sibling(parent: str, name: str, kind: str) -> str:
    """A hidden sibling of ``name`` that says who wrote it: .NAME.KIND-UUID-PID@HOST."""
    return posixpath.join(parent, f".{name}.{kind}-{uuid.uuid4().hex[:8]}-{os.getpid()}@{_HOST}")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


MANIFEST_FILE = "manifest.json"
"""A staged folder's manifest: published last on an object store, so a reader that finds it finds every file."""
KEPT_MARKER = "_KEPT"
"""Written last into an object-store copy of a previous output taken before it is replaced: the copy is whole."""
_IN_USE: set[str] = set()
"""This process's hidden siblings still in use (its own, so the pid check cannot tell them from a failed one's)."""


def _published_last(rel: str) -> bool:
    return rel in (MANIFEST_FILE, "_SUCCESS")


class StagedFolder:
    """Files written under a hidden temporary folder, renamed to ``final`` only on ``publish()``.

    Keeps a sha256 and row count of every file for the manifest. Hidden siblings ``.<name>.tmp-*`` are a
    killed writer's leftovers (or an old copy on its way out) and ``.<name>.old-*`` a complete previous output
    that a killed fallback publish moved aside. Their names carry the writer's pid and host, so
    ``clear_leftovers`` tidies only those whose writer is gone and never a live one's (readers such as
    evaluate write caches without the run_dir lock).
    """

    def __init__(self, final: str):
        self.final = final.rstrip("/")
        self.fs, self.final_path = filesystem(self.final)
        parent, name = posixpath.split(self.final_path)
        self.parent, self.name = parent, name
        self.tmp_path = _sibling(parent, name, "tmp")
        self.old_path: str | None = None
        self.files: dict[str, dict] = {}

    def _stale(self, path: str) -> bool:
        match = _SIBLING.search(posixpath.basename(path.rstrip("/")))
        if match is None or path.rstrip("/") == self.tmp_path:
            return False
        pid, host = match.groups()
        if pid is None:  # written before names carried their writer: no writer left to wait for
            return True
        if host == _HOST:
            if int(pid) == os.getpid():  # this process's own: stale unless one of its folders still uses it
                return path.rstrip("/") not in _IN_USE
            return _process_gone(int(pid))
        modified = self.fs.info(path).get("mtime")
        return modified is not None and time.time() - float(modified) > STALE_AFTER_S

    def _leftovers(self, kind: str) -> list[str]:
        if not self.fs.exists(self.parent):
            return []
        found = self.fs.glob(posixpath.join(self.parent, f".{self.name}.{kind}-*"))
        return sorted(p for p in found if self._stale(p))

    def clear_leftovers(self) -> bool:
        """Put back a complete previous output that an interrupted publish moved aside (True if it did), and
        delete the temporaries of writers that are gone."""
        old, restored = self._leftovers("old"), False
        if _is_local(self.fs):  # moved aside by rename: whole, and needed only when the final name is free
            if old and not self.fs.exists(self.final_path):
                self.fs.mv(old.pop(), self.final_path, recursive=True)
                restored = True
        else:  # copied aside: whole once its marker is there; then the final folder may be half replaced
            kept = [p for p in old if self.fs.exists(posixpath.join(p, KEPT_MARKER))]
            if kept:
                self._restore_copy(kept[-1])
                restored = True
        for path in old + self._leftovers("tmp"):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        return restored

    def _restore_copy(self, old: str) -> None:
        if self.fs.exists(self.final_path):
            self.fs.rm(self.final_path, recursive=True)
        rels = [posixpath.relpath(p, old) for p in self.fs.find(old)]
        for rel in sorted((r for r in rels if r != KEPT_MARKER), key=_published_last):
            self.fs.copy(posixpath.join(old, rel), posixpath.join(self.final_path, rel))

    def _consequence(self) -> str:
        return f"; nothing was published, {self.final} is as it was"

    def write_bytes(self, rel: str, data: bytes, rows: int | None = None) -> None:
        full = posixpath.join(self.tmp_path, rel)
        with writing(join(self.final, rel), self._consequence()):
            self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
            with self.fs.open(full, "wb") as f:
                f.write(data)
        self.files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if rows is not None:
            self.files[rel]["rows"] = rows

    def put_file(self, rel: str, local_path: str) -> None:
        """A local file copied in (large weights stream rather than pass through memory)."""
        full = posixpath.join(self.tmp_path, rel)
        digest, size = hashlib.sha256(), 0
        with open(local_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        with writing(join(self.final, rel), self._consequence()):
            self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
            self.fs.put_file(local_path, full)
        self.files[rel] = {"sha256": digest.hexdigest(), "bytes": size}

    def adopt(self, path: str) -> None:
        """Publish a folder written elsewhere (``path``, on this folder's filesystem, e.g. infer's resumable
        staging folder) instead of the temporary one: every file under it, as it is."""
        self.tmp_path = path.rstrip("/")
        self.files = {posixpath.relpath(p, self.tmp_path): {} for p in self.fs.find(self.tmp_path)}

    def write_parquet(self, rel: str, table: pa.Table, row_group_size: int = 8192) -> None:
        self.write_bytes(rel, parquet_bytes(table, row_group_size), rows=table.num_rows)

    def publish(self) -> None:
        consequence = (self._consequence() if _is_local(self.fs) else
                       f"; {self.final} may be half replaced, which readers refuse: the next writing stage in this "
                       "run_dir puts the previous output back (kept whole in a hidden copy)")
        try:
            with writing(self.final, consequence):
                if _is_local(self.fs):
                    self._publish_by_rename()
                else:
                    self._publish_by_copy()
        finally:  # removed, or left for the next writer to put back: no longer this process's to keep
            _IN_USE.discard(self.old_path)

    def _publish_by_rename(self) -> None:
        if not self.fs.exists(self.final_path):
            self.fs.mv(self.tmp_path, self.final_path, recursive=True)
        elif _exchange(self.tmp_path, self.final_path):
            self.fs.rm(self.tmp_path, recursive=True)  # the previous output, now under the temporary name
        else:  # two renames: a kill between them leaves the previous output whole under .old-, put back later
            old = _sibling(self.parent, self.name, "old")
            self.fs.mv(self.final_path, old, recursive=True)
            self.fs.mv(self.tmp_path, self.final_path, recursive=True)
            self.fs.mv(old, self.tmp_path, recursive=True)  # a half-deleted copy must never be named .old-
            self.fs.rm(self.tmp_path, recursive=True)

    def _publish_by_copy(self) -> None:
        """Object stores have no rename: copy file by file, the marker readers wait for (manifest.json, or
        _SUCCESS for the top-K cache) last. The previous output is first copied aside whole (its own marker
        last), so an outage or a kill while the final folder is half replaced loses nothing: readers refuse
        the half (no marker), and the next writer in this run_dir puts the previous output back
        (``restore_interrupted_publishes``)."""
        old = None
        if self.fs.exists(self.final_path):
            old = self.old_path = _sibling(self.parent, self.name, "old")
            _IN_USE.add(old)
            for rel in [posixpath.relpath(p, self.final_path) for p in self.fs.find(self.final_path)]:
                self.fs.copy(posixpath.join(self.final_path, rel), posixpath.join(old, rel))
            self.fs.pipe_file(posixpath.join(old, KEPT_MARKER), b"")
            self.fs.rm(self.final_path, recursive=True)
        for rel in sorted(self.files, key=_published_last):
            self.fs.copy(posixpath.join(self.tmp_path, rel), posixpath.join(self.final_path, rel))
        if old is not None:
            self.fs.rm(old, recursive=True)
        self.fs.rm(self.tmp_path, recursive=True)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(self.tmp_path):
                self.fs.rm(self.tmp_path, recursive=True)


@contextlib.contextmanager
def staged_folder(final: str) -> Iterator[StagedFolder]:
    """Write into a temporary folder; publish on success, delete on any error. A killed earlier writer's
    leftovers are tidied first."""
    staged = StagedFolder(final)
    _IN_USE.add(staged.tmp_path)
    try:
        staged.clear_leftovers()
        try:
            yield staged
        except BaseException:
            staged.discard()
            raise
        staged.publish()
    finally:  # published, or left for the next writer to tidy: no longer this process's to keep
        _IN_USE.discard(staged.tmp_path)


def restore_interrupted_publishes(run_dir: str, depth: int = 2) -> list[str]:
    """Put back every output under ``run_dir`` (``depth`` folders deep) whose publish a kill or an outage
    interrupted while it replaced the output, and tidy gone writers' temporaries; returns the outputs it
    put back. A writing stage calls it under the run_dir lock, before it reads its inputs."""
    fs, root = filesystem(run_dir)
    if not fs.exists(root):
        return []
    outputs = set()
    for level in range(depth):
        for path in fs.glob(posixpath.join(root, *["*"] * level, ".*")):
            name = posixpath.basename(path.rstrip("/"))
            if _SIBLING.search(name):
                outputs.add(posixpath.join(posixpath.dirname(path.rstrip("/")), _SIBLING.sub("", name)[1:]))
    touched = []
    for path in sorted(outputs):
        uri = path if _is_local(fs) else f"{_protocol(fs)}://{path}"
        if StagedFolder(uri).clear_leftovers():
            touched.append(uri)
    return touched
