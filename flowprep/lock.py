"""One writer per output folder: ``<folder>/flowprep.lock``.

The lock file holds the holder's host, pid, start time and command, and is created with
``O_EXCL`` so that two runs cannot both take it. The holder touches it every ``HEARTBEAT_S``
seconds. A lock is stale, and is taken over with a warning, when its holder was on this host and
its process is gone, or when it was not touched for ``STALE_S`` seconds (a holder on another host
of a shared file system that died or lost the storage). A run that finds a live lock is refused
at once with :class:`OutputLocked`, naming the holder.

On object storage (:mod:`flowprep.storage`) the lock is advisory: pyarrow offers no
create-if-absent, so a run reads the lock object, refuses a live one, writes its own (holder and a
random token), reads it back and goes on only if the token is still its own; the heartbeat
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

from flowprep.storage import Storage, storage

log = logging.getLogger(__name__)

LOCK = "flowprep.lock"
HEARTBEAT_S = 30
STALE_S = 300


class OutputLocked(Exception):
    """Another run writes into the folder."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(store: Storage) -> str | None:
    """Why the lock of ``store`` no longer protects anything, or ``None`` while its holder lives."""
    try:
        text, age = store.read_bytes(LOCK), time.time() - store.modified(LOCK)
    except FileNotFoundError:
        return "gone"
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
        return f"its process {holder.get('pid')} on this host is gone"
    if age > STALE_S:
        return f"not refreshed for {age:.0f} s"
    return None


def _take_file(store: Storage, holder: dict) -> bool:
    try:
        fd = os.open(store / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
    return True


def _take_object(store: Storage, holder: dict) -> bool:
    if store.exists(LOCK):
        return False
    store.write(LOCK, json.dumps(holder).encode())
    try:  # the last writer wins: a run that finds another's token lost the race
        if json.loads(store.read_bytes(LOCK)).get("token") == holder["token"]:
            return True
    except (FileNotFoundError, ValueError):
        pass
    raise OutputLocked(f"{store} was locked by another run at the same moment as this one: wait for it to end")


def _holds(store: Storage, holder: dict) -> bool:
    try:
        return json.loads(store.read_bytes(LOCK)).get("token") == holder["token"]
    except (FileNotFoundError, ValueError):
        return False


@contextmanager
def output_lock(folder: str | Path | Storage) -> Iterator[Path | str]:
    """Hold ``folder``'s lock while the block runs (a local folder must exist); yields where the
    lock is. Raises :class:`OutputLocked` when a live run holds it."""
    store = storage(folder)
    holder = {**_holder(), "token": uuid.uuid4().hex}
    take: Callable[[Storage, dict], bool] = _take_file if store.local else _take_object
    path = store / LOCK
    while not take(store, holder):
        reason = stale_reason(store)
        if reason is None:
            try:
                other = json.loads(store.read_bytes(LOCK))
                who = f"pid {other['pid']} on {other['host']}, started {other['started']}: {other['command']}"
            except (OSError, ValueError, KeyError):
                who = "a run whose lock file is unreadable"
            raise OutputLocked(f"{folder} is being written by {who}. Wait for it to end, or, if it is dead, delete {path}")
        if reason != "gone":
            log.warning("taking over %s: %s", path, reason)
            if store.local:
                # Renamed away first: of two runs taking over at once, only one removes the stale file.
                try:
                    os.replace(path, path.with_name(f"{LOCK}.stale-{os.getpid()}"))
                    path.with_name(f"{LOCK}.stale-{os.getpid()}").unlink()
                except FileNotFoundError:
                    pass
            else:
                store.delete(LOCK)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                if store.local:
                    os.utime(path)
                elif _holds(store, holder):
                    store.write(LOCK, json.dumps(holder).encode())
            except FileNotFoundError:
                return

    beat = threading.Thread(target=heartbeat, daemon=True, name="flowprep-lock")
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join()
        if store.local or _holds(store, holder):
            store.delete(LOCK)
