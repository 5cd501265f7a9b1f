"""Local and s3:// paths through fsspec: read with UTF-8 checks, publish folders atomically.

Every stage writes through here, so every output appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import posixpath
import uuid
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.errors import DataError


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a remote URI such as s3://bucket/key."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        return posixpath.join(uri, *parts)
    import os
    return os.path.join(uri, *parts)


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


def write_bytes(uri: str, data: bytes) -> None:
    """One small file (a marker, a log): written whole by one put, so a reader sees all of it or nothing."""
    fs, path = filesystem(uri)
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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def is_local(uri: str) -> bool:
    """True for a path on this machine's filesystem, False for s3:// and other object stores."""
    return _is_local(filesystem(uri)[0])


class StagedFolder:
    """Files written under a hidden temporary folder, renamed to ``final`` only on ``publish()``.

    Keeps a sha256 and row count of every file for the manifest.
    """

    def __init__(self, final: str):
        self.final = final.rstrip("/")
        self.fs, self.final_path = filesystem(self.final)
        parent, name = posixpath.split(self.final_path)
        self.tmp_path = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.files: dict[str, dict] = {}

    def write_bytes(self, rel: str, data: bytes, rows: int | None = None) -> None:
        full = posixpath.join(self.tmp_path, rel)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        with self.fs.open(full, "wb") as f:
            f.write(data)
        self.files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if rows is not None:
            self.files[rel]["rows"] = rows

    def put_file(self, rel: str, local_path: str) -> None:
        """A local file copied in (large weights stream rather than pass through memory)."""
        full = posixpath.join(self.tmp_path, rel)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with open(local_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        self.fs.put_file(local_path, full)
        self.files[rel] = {"sha256": digest.hexdigest(), "bytes": size}

    def write_parquet(self, rel: str, table: pa.Table, row_group_size: int = 8192) -> None:
        self.write_bytes(rel, parquet_bytes(table, row_group_size), rows=table.num_rows)

    def publish(self) -> None:
        if _is_local(self.fs):
            self._publish_by_rename()
        else:
            self._publish_by_copy()

    def _publish_by_rename(self) -> None:
        old = None
        if self.fs.exists(self.final_path):
            old = self.final_path + f".old-{uuid.uuid4().hex[:8]}"
            self.fs.mv(self.final_path, old, recursive=True)
        self.fs.mv(self.tmp_path, self.final_path, recursive=True)
        if old:
            self.fs.rm(old, recursive=True)

    def _publish_by_copy(self) -> None:
        """Object stores have no rename: copy file by file, manifest.json last (readers wait for it)."""
        if self.fs.exists(self.final_path):
            self.fs.rm(self.final_path, recursive=True)
        rels = sorted(self.files, key=lambda r: r == "manifest.json")
        for rel in rels:
            self.fs.copy(posixpath.join(self.tmp_path, rel), posixpath.join(self.final_path, rel))
        self.fs.rm(self.tmp_path, recursive=True)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(self.tmp_path):
                self.fs.rm(self.tmp_path, recursive=True)


@contextlib.contextmanager
def staged_folder(final: str) -> Iterator[StagedFolder]:
    """Write into a temporary folder; publish on success, delete on any error."""
    staged = StagedFolder(final)
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise
    staged.publish()
