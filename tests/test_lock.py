"""One writer per output folder: the lock, its staleness rules, and two runs into one folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import flowprep.extract
import flowprep.lock
from flowprep.extract import extract
from flowprep.lock import LOCK, STALE_S, LockLost, OutputLocked, output_lock
from flowprep.pipeline import ExtractConfig
from flowprep.shards.layout import complete_shards

from conftest import textured_image, write_video


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def test_a_held_lock_refuses_a_second_writer_and_is_released(tmp_path):
    with output_lock(tmp_path) as lock:
        assert lock.path == tmp_path / LOCK
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            with output_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK).exists()
    with output_lock(tmp_path):  # free again
        pass


def test_stale_locks_are_taken_over(tmp_path, caplog):
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": "then", "command": "x"}))
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


def test_a_live_process_of_this_host_is_never_stale_however_old_its_lock(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "then", "command": "x", "token": "t"}))
    old = time.time() - 10 * STALE_S
    os.utime(lock, (old, old))  # a stopped process, or a late heartbeat
    with pytest.raises(OutputLocked, match=f"is being written by pid {os.getpid()} on {socket.gethostname()}"):
        with output_lock(tmp_path):
            pass
    assert json.loads(lock.read_text())["token"] == "t"


def test_two_runs_taking_over_one_stale_lock_cannot_both_get_in(tmp_path, monkeypatch):
    """Run B judges the stale lock, then run A judges it too, takes it over and holds it; only
    then does B act on its judgement. B must neither remove A's lock nor get in."""
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": "then", "command": "x"}))
    judge = flowprep.lock._judge
    b_judged, a_holds = threading.Event(), threading.Event()

    def judge_then_let_a_go_first(store):
        found = judge(store)
        if threading.current_thread().name == "B" and not b_judged.is_set():
            b_judged.set()
            assert a_holds.wait(60)
        return found

    monkeypatch.setattr(flowprep.lock, "_judge", judge_then_let_a_go_first)
    outcome = {}

    def run_b():
        try:
            with output_lock(tmp_path):
                outcome["b"] = "got in"
        except OutputLocked as e:
            outcome["b"] = str(e)

    b = threading.Thread(target=run_b, name="B")
    b.start()
    assert b_judged.wait(60)
    with output_lock(tmp_path) as a:
        a_holds.set()
        b.join()
        assert outcome["b"].startswith(f"{tmp_path} is being written by pid {os.getpid()}")
        a.check()  # still A's own
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # nothing moved aside is left
    assert not (tmp_path / LOCK).exists()


def test_a_run_that_lost_its_lock_stops_and_leaves_the_new_holder_s_lock(tmp_path):
    other = {"host": "elsewhere", "pid": 1, "started": "now", "command": "flowprep extract", "token": "other"}
    with output_lock(tmp_path) as lock:
        lock.check()
        (tmp_path / LOCK).write_text(json.dumps(other))  # taken over by a run that judged this one stale
        lock.refresh()  # the heartbeat finds it and refreshes nothing
        with pytest.raises(LockLost, match=f"lost its lock {tmp_path / LOCK}: the lock file now names pid 1 on elsewhere"):
            lock.check()
    assert json.loads((tmp_path / LOCK).read_text()) == other  # released only its own
    (tmp_path / LOCK).unlink()
    with output_lock(tmp_path) as lock:
        (tmp_path / LOCK).unlink()
        with pytest.raises(LockLost, match="its lock file is gone"):
            lock.check()


def test_an_extract_that_loses_its_lock_commits_no_further_shard(tmp_path, monkeypatch):
    src = tmp_path / "src" / "pan"
    image = textured_image(64, 96)
    for v in range(3):
        write_video(src / f"p{v}.mp4", [np.roll(image, (v + 1) * i, axis=1) for i in range(6)])
    out = tmp_path / "out"
    other = {"host": "elsewhere", "pid": 1, "started": "now", "command": "flowprep extract", "token": "other"}
    commit = flowprep.extract.commit_shard

    def commit_then_lose_the_lock(store, result):
        commit(store, result)
        (out / LOCK).write_text(json.dumps(other))

    monkeypatch.setattr(flowprep.extract, "commit_shard", commit_then_lose_the_lock)
    with pytest.raises(LockLost, match="now names pid 1 on elsewhere"):
        extract(src.parent, out, ExtractConfig(short_side=64, shard_size=1, flow_backend="none"), workers=0, progress=False)
    assert complete_shards(out) == ["shards/shard-00000.arrow"]
    assert json.loads((out / LOCK).read_text()) == other
