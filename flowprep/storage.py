"""Where an output lives: a local folder, or a prefix on object storage (``s3://bucket/prefix``,
``gs://bucket/prefix``) reached through ``pyarrow.fs``.

The layout (:mod:`flowprep.shards.layout`) names files relative to the output, ``/``-separated
(``shards/shard-00000.arrow``), and does the few things it needs through a :class:`Storage`:
read an object whole or by ranges, write one whole, list a folder, size, delete. The two kinds
differ in how a file becomes visible:

- a local folder writes a file under a staged name of its own, ``<name>.<token>.partial`` with a
  token new to each writer (:func:`staged_name`), and renames it (after an fsync) when it is
  complete: big files by :meth:`~LocalStorage.open_output` and :meth:`~LocalStorage.publish`,
  small files at once (:meth:`LocalStorage.write`). No two writers ever share a staged file, so
  a writer thought lost that still runs writes only into its own;
- object storage has no rename (a copy would cost the object's size again), but an upload is all
  or nothing: an object appears whole once its upload completes, never in part. Its big objects
  are therefore written under their final name, and the layout decides when one counts (a shard
  counts once its index part exists, docs/format.md).

S3 takes the standard AWS environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible server.
``pyarrow.fs.FileSystem.from_uri`` reads ``AWS_ENDPOINT_URL`` itself (pyarrow 26; the
``S3FileSystem()`` constructor does not), so that is how the file system is made. GCS takes
Google's application default credentials.

The file system is connected lazily, once per process: a :class:`Storage` pickles without its
connection, so DataLoader or Ray workers (fork or spawn) each open their own.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

PARTIAL = ".partial"
OBJECT_SCHEMES = ("s3", "gs", "gcs")
# A staged name: <name>.<16 hex digits>.partial, or <name>.partial as earlier versions wrote it.
_STAGED = re.compile(r"(.+?)(?:\.[0-9a-f]{16})?\.partial")


def staged_name(name: str) -> str:
    """A new staged name for ``name``: ``<name>.<token>.partial``, the token random, so that each
    writer of ``name`` has a file of its own."""
    return f"{name}.{secrets.token_hex(8)}{PARTIAL}"


def staged_target(filename: str) -> str | None:
    """The name that ``filename`` stages (:func:`staged_name`, or the ``<name>.partial`` of
    earlier versions), or ``None`` when it is not a staged name."""
    match = _STAGED.fullmatch(filename)
    return match and match.group(1)


class Uri(str):
    """An object storage location as text, ``/`` appending a name like a :class:`~pathlib.Path`:
    what messages show for an object."""

    def __truediv__(self, name: str) -> Uri:
        return Uri(f"{self.rstrip('/')}/{name}")


def storage(location: str | Path | Storage) -> Storage:
    """The :class:`Storage` of ``location``: a local path, or ``s3://``/``gs://`` URI (a
    ``Storage`` is returned as it is). ``ValueError`` for another scheme."""
    if isinstance(location, Storage):
        return location
    text = str(location)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if not scheme:
        return LocalStorage(Path(location))
    if scheme not in OBJECT_SCHEMES:
        raise ValueError(f"{text}: unsupported location; a local path, s3://bucket/prefix or gs://bucket/prefix")
    return ObjectStorage(text)


class Storage:
    """An output location. ``location`` is what messages show: a :class:`~pathlib.Path`, or a
    :class:`Uri`; ``storage / name`` is the location of ``name`` in it."""

    local: bool
    location: Path | Uri

    def __truediv__(self, name: str) -> Path | Uri:
        return self.location / name

    def __str__(self) -> str:
        return str(self.location)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def staged(self, name: str) -> str:
        """The name one writer writes ``name`` under (:meth:`open_output`) until :meth:`publish`:
        here ``name`` itself, an upload being all or nothing; locally a new staged name on each
        call (:func:`staged_name`)."""
        return name


class LocalStorage(Storage):
    """A local folder: plain files, written whole by rename, read by memory map."""

    local = True

    def __init__(self, folder: Path):
        self.location = Path(folder)

    def exists(self, name: str) -> bool:
        return (self.location / name).is_file()

    def size(self, name: str) -> int:
        return (self.location / name).stat().st_size

    def modified(self, name: str) -> float:
        """Last modification, seconds since the epoch."""
        return (self.location / name).stat().st_mtime

    def read_bytes(self, name: str) -> bytes:
        return (self.location / name).read_bytes()

    def open_input(self, name: str) -> pa.NativeFile:
        """Random access to ``name``: a memory map (reading touches only the bytes asked for)."""
        return pa.memory_map(str(self.location / name))

    def write(self, name: str, data: bytes) -> None:
        """Write ``data`` so that ``name`` holds either its old content or all of the new."""
        path = self.location / name
        tmp = self.location / self.staged(name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def staged(self, name: str) -> str:
        return staged_name(name)

    def open_output(self, staged: str) -> pa.NativeFile:
        """A stream writing the staged name ``staged`` (:meth:`staged`): the file is invisible
        under its final name until :meth:`publish`."""
        return pa.OSFile(str(self.location / staged), "wb")

    def publish(self, staged: str, name: str) -> None:
        """Make the closed output ``staged`` of :meth:`open_output` visible as ``name``: synced,
        then renamed (the rename must never expose a file that is not on disk)."""
        path = self.location / staged
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(path, self.location / name)

    def entries(self, folder: str = "") -> list[tuple[str, str]]:
        """``(name, kind)`` in ``folder``, sorted by name; kind ``file``, ``dir`` or ``other``
        (a symbolic link or anything special: never flowprep's)."""
        path = self.location / folder
        if not path.is_dir():
            return []
        kinds = []
        for p in sorted(path.iterdir()):
            kind = "other" if p.is_symlink() else "file" if p.is_file() else "dir" if p.is_dir() else "other"
            kinds.append((p.name, kind))
        return kinds

    def files(self, folder: str = "") -> dict[str, int]:
        """Name -> size in bytes of the files in ``folder`` (none when it does not exist)."""
        path = self.location / folder
        return {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()} if path.is_dir() else {}

    def delete(self, name: str) -> None:
        (self.location / name).unlink(missing_ok=True)

    def makedirs(self, folder: str = "") -> None:
        (self.location / folder).mkdir(parents=True, exist_ok=True)

    def remove_empty_folder(self, folder: str) -> None:
        path = self.location / folder
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


class ObjectStorage(Storage):
    """A prefix on object storage: objects written whole (an upload completes or is not seen),
    read by ranged requests. Folders are only name prefixes: nothing to make or remove."""

    local = False

    def __init__(self, uri: str):
        self.location = Uri(uri.rstrip("/"))
        self._root = self.location.split("://", 1)[1]
        self._fs: pafs.FileSystem | None = None
        self._pid: int | None = None

    @property
    def fs(self) -> pafs.FileSystem:
        """This process's connection, made on first use."""
        if self._fs is None or self._pid != os.getpid():
            self._fs, _ = pafs.FileSystem.from_uri(self.location)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": None}

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}".rstrip("/")

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type == pafs.FileType.File

    def size(self, name: str) -> int:
        info = self.fs.get_file_info(self._path(name))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self / name} does not exist")
        return info.size

    def modified(self, name: str) -> float:
        info = self.fs.get_file_info(self._path(name))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self / name} does not exist")
        return info.mtime.timestamp()

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._path(name)) as f:
            return f.read()

    def open_input(self, name: str) -> pa.NativeFile:
        """Random access to ``name``: each read is a ranged GET of the bytes asked for."""
        return self.fs.open_input_file(self._path(name))

    def write(self, name: str, data: bytes) -> None:
        """Upload ``data`` as ``name``: readers see the old object or the new one, never a part."""
        with self.fs.open_output_stream(self._path(name)) as f:
            f.write(data)

    def open_output(self, staged: str) -> pa.NativeFile:
        """A stream uploading ``staged`` (:meth:`staged`: the final name itself, in parts for a
        big object): it appears, whole, when the stream is closed; a killed upload leaves no
        object (docs/format.md)."""
        return self.fs.open_output_stream(self._path(staged))

    def publish(self, staged: str, name: str) -> None:
        pass  # the closed upload already is the object: the layout decides when it counts

    def entries(self, folder: str = "") -> list[tuple[str, str]]:
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted((i.base_name, "file" if i.type == pafs.FileType.File else "dir") for i in infos)

    def files(self, folder: str = "") -> dict[str, int]:
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True)
        return {i.base_name: i.size for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File}

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._path(name))
        except FileNotFoundError:
            pass

    def makedirs(self, folder: str = "") -> None:
        pass

    def remove_empty_folder(self, folder: str) -> None:
        pass
