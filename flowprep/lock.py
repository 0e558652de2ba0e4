"""One writer per output folder: ``<folder>/flowprep.lock``.

The lock file holds the holder's host, pid, start time, command and a random token, and is
created with ``O_EXCL`` so that two runs cannot both take it. The holder refreshes it every
``HEARTBEAT_S`` seconds. A lock is stale, and is taken over with a warning, when its holder was on
this host and its process is gone (a live process on this host is never stale, however old its
lock: it may be stopped, or its heartbeat late), or, for a holder on another host, when it was not
refreshed for ``STALE_S`` seconds (a holder of a shared file system that died or lost the
storage). A run that finds a live lock is refused at once with :class:`OutputLocked`, naming the
holder.

A takeover is atomic: the taker renames the lock file aside under a name of its own (of runs
taking over at once, one rename gets the file) and deletes it only when it is the stale lock it
judged; a lock that another run took meanwhile is put back. So two runs that judge one lock
stale cannot both get in.

A run holds its lock only while the lock file holds its token. The heartbeat checks that before
each refresh; a lock file gone, holding another run's token, or that cannot be refreshed marks the
lock lost, and :meth:`HeldLock.check`, which a writer calls before each commit, then raises
:class:`LockLost`: a run stops rather than go on writing unprotected. Leaving the block deletes
the lock file only while it is still the run's own.

On object storage (:mod:`flowprep.storage`) the lock is advisory: pyarrow offers no
create-if-absent (nor rename), so a run reads the lock object, refuses a live one, writes its own
(holder and a random token), reads it back and goes on only if it is still its own; the heartbeat
rewrites the object. Two runs started within the same second or so can both pass: this stops the
everyday mistake (a second job on the same prefix), not a race (docs/cluster.md).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flowprep.storage import Storage, staged_name, storage

log = logging.getLogger(__name__)

LOCK = "flowprep.lock"
HEARTBEAT_S = 30
STALE_S = 300


class OutputLocked(Exception):
    """Another run writes into the folder."""


class LockLost(OutputLocked):
    """This run no longer holds its lock (taken over, deleted, or it could not be refreshed): it
    must stop writing."""


def _holder() -> bytes:
    """A new holder's lock file content: this process, and a token no other run has."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "command": " ".join(sys.argv), "token": uuid.uuid4().hex}).encode()


def _parse(data: bytes) -> dict:
    """The holder recorded in a lock file's ``data`` (empty when it is unreadable)."""
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(data: bytes) -> str:
    """The holder a lock file's ``data`` names, for messages."""
    holder = _parse(data)
    try:
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except KeyError:
        return "a run whose lock file is unreadable"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(data: bytes, age: float) -> str | None:
    """Why a lock file holding ``data``, refreshed ``age`` seconds ago, no longer protects
    anything, or ``None`` while its holder may live: a holder on this host lives exactly as long
    as its process, whatever the lock's age; another (or an unreadable lock) until the lock was
    not refreshed for ``STALE_S`` seconds."""
    holder = _parse(data)
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
        return None if _pid_alive(pid) else f"its process {pid} on this host is gone"
    if age > STALE_S:
        return f"not refreshed for {age:.0f} s"
    return None


def _judge(store: Storage) -> tuple[bytes, str | None] | None:
    """The lock of ``store`` as found now: its content and why it is stale (``None``: its holder
    lives); ``None`` when there is no lock."""
    try:  # content first: a lock replaced between the two reads then looks younger, never older
        data = store.read_bytes(LOCK)
        age = time.time() - store.modified(LOCK)
    except FileNotFoundError:
        return None
    return data, stale_reason(data, age)


def _create_file(store: Storage, data: bytes) -> bool:
    """Create the lock file holding ``data`` unless there is one (``O_EXCL``: atomic)."""
    try:
        fd = os.open(store / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _create_object(store: Storage, data: bytes) -> bool:
    """Write the lock object holding ``data`` unless there is one (advisory: see above)."""
    if store.exists(LOCK):
        return False
    store.write(LOCK, data)
    try:  # the last writer wins: a run that finds another's token lost the race
        if store.read_bytes(LOCK) == data:
            return True
    except FileNotFoundError:
        pass
    raise OutputLocked(f"{store} was locked by another run at the same moment as this one: wait for it to end")


def _remove_stale(store: Storage, judged: bytes) -> None:
    """Delete the lock of ``store`` if it still is the stale one whose content was ``judged``,
    and never another: of runs that judged it stale at once, one removes it, and none removes
    the lock that one of them then took."""
    if not store.local:  # no rename: advisory, another run may write its lock between the read and the delete
        try:
            if store.read_bytes(LOCK) == judged:
                store.delete(LOCK)
        except FileNotFoundError:
            pass
        return
    path, aside = store / LOCK, store / staged_name(LOCK)
    try:
        os.replace(path, aside)  # one rename: of runs taking over at once, only one gets the file
    except FileNotFoundError:
        return  # another run got it
    data = aside.read_bytes()
    if data != judged:
        # A run took the lock after it was judged: give it back. Should a third run have taken
        # the free name meanwhile, the one moved aside is lost, and its holder stops at its
        # next check: still one writer.
        _create_file(store, data)
    aside.unlink()


class HeldLock:
    """The lock that a run holds (:func:`output_lock`): ``path`` says where it is; :meth:`check`
    raises :class:`LockLost` once it is no longer the run's."""

    def __init__(self, store: Storage, data: bytes):
        self.store = store
        self.path = store / LOCK
        self._data = data  # the lock file's content: this run's holder and token
        self._lost: str | None = None

    def _why_lost(self) -> str | None:
        """Why the lock file is no longer this run's (gone, or another run's), or ``None``."""
        try:
            found = self.store.read_bytes(LOCK)
        except FileNotFoundError:
            return "its lock file is gone"
        return None if found == self._data else f"the lock file now names {_describe(found)}"

    def refresh(self) -> None:
        """The heartbeat: refresh the lock file while it is this run's own; else, or when the
        refresh fails, record why, for :meth:`check` to raise."""
        if self._lost:
            return
        try:
            self._lost = self._why_lost()
            if self._lost is None:
                if self.store.local:
                    os.utime(self.path)
                else:
                    self.store.write(LOCK, self._data)
        except OSError as e:
            self._lost = f"refreshing it failed ({e})"

    def check(self) -> None:
        """Raise :class:`LockLost` unless this run still holds its lock: the heartbeat found it
        lost, or it is not the run's now. A writer calls it before each commit."""
        if self._lost is None:
            try:
                self._lost = self._why_lost()
            except OSError as e:
                self._lost = f"reading it failed ({e})"
        if self._lost:
            raise LockLost(f"this run lost its lock {self.path}: {self._lost}. It stops rather than write beside another "
                           "run; rerun the same command once no other run writes there (the output is resumable)")

    def release(self) -> None:
        """Delete the lock file if it is still this run's: a lock taken over is the other run's."""
        if self._why_lost() is None:
            self.store.delete(LOCK)


@contextmanager
def output_lock(folder: str | Path | Storage) -> Iterator[HeldLock]:
    """Hold ``folder``'s lock while the block runs (a local folder must exist); yields the
    :class:`HeldLock`. Raises :class:`OutputLocked` when a live run holds it."""
    store = storage(folder)
    data = _holder()
    create: Callable[[Storage, bytes], bool] = _create_file if store.local else _create_object
    path = store / LOCK
    while not create(store, data):
        found = _judge(store)
        if found is None:
            continue  # released meanwhile
        judged, reason = found
        if reason is None:
            raise OutputLocked(f"{folder} is being written by {_describe(judged)}. Wait for it to end, or, if it is dead, delete {path}")
        log.warning("taking over %s: %s", path, reason)
        _remove_stale(store, judged)
    held = HeldLock(store, data)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            held.refresh()

    beat = threading.Thread(target=heartbeat, daemon=True, name="flowprep-lock")
    beat.start()
    try:
        yield held
    finally:
        stop.set()
        beat.join()
        held.release()
