"""Ray wiring's cleanup and the Kinetics cluster job's split handling."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from flowprep.cluster import kill_actors
from flowprep.samples import sample_clip
from flowprep.shards import ShardReader
from flowprep.shards.layout import complete_shards
from flowprep.teacher.targets import TeacherTargets

from conftest import RayCluster, textured_image, write_video
from test_teacher import save_checkpoint

KINETICS_JOB = Path(__file__).resolve().parents[1] / "pipelines" / "kinetics.py"


@pytest.mark.ray
def test_cleanup_after_ray_is_down_starts_no_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    actor = ray.remote(num_cpus=0)(type("Idle", (), {"ping": lambda self: 1})).remote()
    assert ray.get(actor.ping.remote()) == 1
    ray.shutdown()
    kill_actors([actor])
    assert not ray.is_initialized()


def kinetics_download(root: Path, splits: tuple[str, ...]) -> Path:
    """A Kinetics download of one real clip per split (bikes.mp4 as youtube id 'bikes_<split>')."""
    (root / "annotations").mkdir(parents=True)
    for split in splits:
        (root / split).mkdir()
        shutil.copy(sample_clip("bikes.mp4"), root / split / f"bikes_{split}.mp4")
        (root / "annotations" / f"{split}.csv").write_text(f"label,youtube_id,time_start,time_end,split\nriding bike,bikes_{split},0,1,{split}\n")
    return root


def kinetics(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KINETICS_JOB), *map(str, args)], capture_output=True, text=True)


def test_missing_default_splits_are_skipped_and_a_named_one_is_an_error(tmp_path):
    root = kinetics_download(tmp_path / "k400", ("train", "val"))
    out = tmp_path / "out"
    extract = ["--", "--workers", 0, "--max-frames", 4, "--short-side", 32, "--no-progress"]
    done = kinetics("--root", root, "--out", out, *extract)
    assert done.returncode == 0, done.stderr
    assert "split test skipped" in done.stderr
    assert [ShardReader(out / s).video_ids for s in ("train", "val")] == [["bikes_train"], ["bikes_val"]]
    refused = kinetics("--root", root, "--out", tmp_path / "out2", "--splits", "train,test", *extract)
    assert refused.returncode == 2 and "--splits names test" in refused.stderr
    assert not (tmp_path / "out2").exists()


def actor_pids(cluster: RayCluster, actor: str = "FlowWorker") -> list[int]:
    """The processes of ``actor`` on ``cluster``'s nodes (each node a session of its own), not
    those of any other Ray on this machine."""
    sessions = ",".join(str(node.pid) for node in cluster.nodes)
    found = subprocess.run(["pgrep", "-s", sessions, "-f", f"ray::{actor}"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


@pytest.fixture(scope="module")
def pans(tmp_path_factory):
    """Six small panning videos and their in-process extraction (the reference bytes)."""
    root = tmp_path_factory.mktemp("pans")
    image = textured_image(96, 128)
    for v in range(6):
        write_video(root / "src" / "pans" / f"pan{v}.mp4", [np.roll(image, v + 1 + i, axis=1) for i in range(10)])
    # OpenCV's default TV-L1: seconds of work left when the first shard completes, for the faults to hit.
    args = ["extract", "--src", root / "src", "--shard-size", "1", "--short-side", "96", "--chunk-frames", "4", "--no-progress"]
    result = subprocess.run([sys.executable, "-m", "flowprep.cli", *map(str, args), "--out", root / "reference", "--workers", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return args, root / "reference"


def run_and_fault(args, fault, env=None) -> tuple[int, str, str]:
    """Run ``flowprep ARGS``, call ``fault()`` once the first shard is complete; returns the
    exit status, stdout and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "flowprep.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    log, faulted = [], False
    for line in proc.stderr:
        log.append(line)
        if not faulted and "shard complete" in line:
            fault()
            faulted = True
    assert faulted, "".join(log)
    return proc.wait(), proc.stdout.read(), "".join(log)


def assert_same_shards(out: Path, reference: Path) -> None:
    assert complete_shards(out) == complete_shards(reference)
    for shard in complete_shards(reference):
        assert (out / shard).read_bytes() == (reference / shard).read_bytes(), shard


@pytest.mark.cluster
def test_a_killed_flow_worker_costs_no_video_and_changes_no_byte(pans, ray_cluster, tmp_path):
    args, reference = pans
    status, stdout, log = run_and_fault([*args, "--out", tmp_path / "out", "--workers", 2, "--ray-address", ray_cluster.address],
                                        lambda: os.kill(actor_pids(ray_cluster)[0], signal.SIGKILL), env=ray_cluster.env)
    assert status == 0, log
    assert "6 written, 0 failed" in stdout and " lost (" in log  # the decoder's word that it sent the chunk elsewhere
    assert_same_shards(tmp_path / "out", reference)


@pytest.mark.cluster
def test_a_lost_node_costs_no_video_and_changes_no_byte(pans, ray_cluster, tmp_path):
    args, reference = pans
    status, stdout, log = run_and_fault([*args, "--out", tmp_path / "out", "--workers", 2, "--ray-address", ray_cluster.address],
                                        lambda: ray_cluster.kill_node(ray_cluster.nodes[1]), env=ray_cluster.env)
    assert status == 0, log
    assert "6 written, 0 failed" in stdout
    assert_same_shards(tmp_path / "out", reference)


@pytest.mark.cluster
def test_shards_written_on_the_nodes_are_the_bytes_of_one_process_though_a_node_is_lost(pans, ray_cluster, tmp_path):
    args, reference = pans
    out = tmp_path / "out"
    status, stdout, log = run_and_fault([*args, "--out", out, "--workers", 2, "--writers", "workers", "--ray-address", ray_cluster.address],
                                        lambda: ray_cluster.kill_node(ray_cluster.nodes[1]), env=ray_cluster.env)
    assert status == 0, log
    assert "6 written, 0 failed" in stdout and "each written by its decoder" in log
    assert_same_shards(out, reference)
    assert (out / "index.parquet").read_bytes() == (reference / "index.parquet").read_bytes()
    assert (out / "plan.parquet").read_bytes() == (reference / "plan.parquet").read_bytes()


@pytest.mark.cluster
def test_ray_job_submit_runs_the_kinetics_job(tmp_path):
    cluster = RayCluster(tmp_path, dashboard=True)
    try:
        root = kinetics_download(tmp_path / "k400", ("train", "val"))
        ray = Path(sys.executable).with_name("ray")
        submitted = subprocess.run(
            [str(ray), "job", "submit", "--address", cluster.dashboard, "--", sys.executable, str(KINETICS_JOB), "--root", str(root),
             "--out", str(tmp_path / "out"), "--", "--max-frames", "4", "--short-side", "32", "--no-progress"],
            capture_output=True, text=True, env=cluster.env, timeout=600)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "succeeded" in submitted.stdout
        assert [ShardReader(tmp_path / "out" / s).video_ids for s in ("train", "val")] == [["bikes_train"], ["bikes_val"]]
    finally:
        cluster.stop()


@pytest.mark.cluster
def test_a_run_starts_with_the_workers_it_can_get_beside_another_job(pans, ray_cluster, tmp_path):
    args, reference = pans
    holder = ("import ray, sys\nray.init()\n"
              "a = ray.remote(num_cpus=1)(type('Hold', (), {'ok': lambda self: 1})).remote()\n"
              "ray.get(a.ok.remote())\nprint('held', flush=True)\nsys.stdin.read()\n")
    other_job = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address})
    try:
        assert other_job.stdout.readline().strip() == "held"  # one of the cluster's two CPUs is taken
        result = subprocess.run([sys.executable, "-m", "flowprep.cli", *map(str, args), "--out", tmp_path / "out",
                                 "--ray-address", ray_cluster.address], capture_output=True, text=True, env=ray_cluster.env, timeout=600)
    finally:
        other_job.stdin.close()
        other_job.wait()
    assert result.returncode == 0, result.stderr
    assert "1 of 2 flow workers started" in result.stderr and "6 written, 0 failed" in result.stdout
    assert_same_shards(tmp_path / "out", reference)


def test_a_second_run_into_the_same_output_is_refused_and_the_first_is_unharmed(pans, tmp_path):
    args, reference = pans
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "flowprep.cli", *map(str, args), "--out", str(out), "--workers", "0"]
    first = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in first.stderr:
        if "shard complete" in line:
            os.killpg(first.pid, signal.SIGSTOP)  # frozen mid-run, holding the lock
            break
    second = subprocess.run(cli, capture_output=True, text=True)
    os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 1 and f"is being written by pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    stdout, stderr = first.communicate()
    assert first.returncode == 0 and "6 written, 0 failed" in stdout, stderr
    assert_same_shards(out, reference)
    assert not (out / "flowprep.lock").exists()


@pytest.fixture(scope="module")
def teacher_run(small_shards, tmp_path_factory):
    """A copy of the small shards, the arguments of a teacher run over them, and its targets
    computed in this process (``reference``)."""
    root = tmp_path_factory.mktemp("teacher")
    out = root / "shards"
    shutil.copytree(small_shards, out)
    args = ["teacher", "--shards", out, "--model", "s3dg", "--checkpoint", save_checkpoint(root / "s3dg.pt", "s3dg"),
            "--clip-len", 8, "--crop", 112, "--window-stride", 8, "--batch-size", 4, "--no-progress"]
    result = subprocess.run([sys.executable, "-m", "flowprep.cli", *map(str, args), "--name", "reference", "--workers", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return args, out


def assert_targets_match(out: Path, name: str, reference: str = "reference") -> None:
    """Every view of ``reference`` has targets under ``name`` too, equal but for the float16
    rounding of arithmetic done with other thread counts."""
    faulted, local = TeacherTargets(out, name), TeacherTargets(out, reference)
    assert faulted.video_ids == local.video_ids and len(local) == 5
    for video_id in local.video_ids:
        assert faulted.views(video_id) == local.views(video_id)
        for view in local.views(video_id):
            np.testing.assert_allclose(faulted.get(video_id, *view)["logits"], local.get(video_id, *view)["logits"], atol=2e-3, rtol=2e-3)


@pytest.mark.cluster
def test_a_killed_teacher_worker_costs_no_target(teacher_run, ray_cluster):
    args, out = teacher_run
    status, stdout, log = run_and_fault([*args, "--name", "killed", "--workers", 2, "--ray-address", ray_cluster.address],
                                        lambda: os.kill(actor_pids(ray_cluster, "TeacherWorker")[0], signal.SIGKILL), env=ray_cluster.env)
    assert status == 0, log
    assert "0 failed" in stdout and "5 of 5 videos have targets" in stdout and "lost with its teacher worker" in log
    assert_targets_match(out, "killed")


@pytest.mark.cluster
def test_a_lost_node_during_a_teacher_run_costs_no_target(teacher_run, ray_cluster):
    args, out = teacher_run
    status, stdout, log = run_and_fault([*args, "--name", "node", "--workers", 2, "--ray-address", ray_cluster.address],
                                        lambda: ray_cluster.kill_node(ray_cluster.nodes[1]), env=ray_cluster.env)
    assert status == 0, log
    assert "0 failed" in stdout and "5 of 5 videos have targets" in stdout and "lost with its teacher worker" in log
    assert_targets_match(out, "node")
