"""One writer per output folder: ``<folder>/flowprep.lock``.

The lock file holds the holder's host, pid, start time and command, and is created with
``O_EXCL`` so that two runs cannot both take it. The holder touches it every ``HEARTBEAT_S``
seconds. A lock is stale, and is taken over with a warning, when its holder was on this host and
its process is gone, or when it was not touched for ``STALE_S`` seconds (a holder on another host
of a shared file system that died or lost the storage). A run that finds a live lock is refused
at once with :class:`OutputLocked`, naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def stale_reason(path: Path) -> str | None:
    """Why the lock at ``path`` no longer protects anything, or ``None`` while its holder lives."""
    try:
        holder = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    except ValueError:
        holder, age = {}, time.time() - path.stat().st_mtime
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
        return f"its process {holder.get('pid')} on this host is gone"
    if age > STALE_S:
        return f"not refreshed for {age:.0f} s"
    return None


def _take(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(_holder(), f)
    return True


@contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s lock while the block runs (the folder must exist). Raises
    :class:`OutputLocked` when a live run holds it."""
    path = Path(folder) / LOCK
    while not _take(path):
        reason = stale_reason(path)
        if reason is None:
            try:
                holder = json.loads(path.read_text())
                who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
            except (OSError, ValueError, KeyError):
                who = "a run whose lock file is unreadable"
            raise OutputLocked(f"{folder} is being written by {who}. Wait for it to end, or, if it is dead, delete {path}")
        if reason != "gone":
            log.warning("taking over %s: %s", path, reason)
            # Renamed away first: of two runs taking over at once, only one removes the stale file.
            try:
                os.replace(path, path.with_name(f"{LOCK}.stale-{os.getpid()}"))
                path.with_name(f"{LOCK}.stale-{os.getpid()}").unlink()
            except FileNotFoundError:
                pass
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except FileNotFoundError:
                return

    beat = threading.Thread(target=heartbeat, daemon=True, name="flowprep-lock")
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join()
        path.unlink(missing_ok=True)
