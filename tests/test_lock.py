"""One writer per output folder: the lock, its staleness rules, and two runs into one folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from flowprep.lock import LOCK, STALE_S, OutputLocked, output_lock


def test_a_held_lock_refuses_a_second_writer_and_is_released(tmp_path):
    with output_lock(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            with output_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK).exists()
    with output_lock(tmp_path):  # free again
        pass


def test_stale_locks_are_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then", "command": "x"}))
    with output_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "is gone" in caplog.text

    # A holder on another host that stopped refreshing the lock.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then", "command": "x"}))
    with pytest.raises(OutputLocked, match="on elsewhere"):
        with output_lock(tmp_path):
            pass
    old = time.time() - STALE_S - 10
    os.utime(lock, (old, old))
    with output_lock(tmp_path):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert "not refreshed" in caplog.text


def test_a_teacher_run_is_refused_while_another_writes_the_same_targets(small_shards, tmp_path):
    from flowprep.teacher.run import TeacherConfig, compute_targets

    out = tmp_path / "shards"
    shutil.copytree(small_shards, out)
    folder = out / "teachers" / "t"
    folder.mkdir(parents=True)
    with output_lock(folder):
        with pytest.raises(OutputLocked, match="is being written by pid"):
            compute_targets(out, "t", TeacherConfig("s3dg", None, num_classes=2), workers=0)
    assert list(folder.iterdir()) == []  # nothing written, and the lock released
