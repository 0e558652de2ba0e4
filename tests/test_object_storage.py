"""Outputs on object storage: ``extract --out s3://...`` against an S3-compatible server (moto)
started here on loopback, and every reader on such an output."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from flowprep import ClipDataset, ShardReader
from flowprep.cli import main
from flowprep.lock import LOCK
from flowprep.shards.layout import complete_shards, index_part, read_failures
from flowprep.storage import storage

from conftest import kill_cli_when, textured_image, write_video

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
BUCKET = "flowprep-test"
# One video per shard (so a resume has shards to keep and shards to redo) of 4 record batches.
ARGS = ["--short-side", "64", "--max-frames", "8", "--chunk-frames", "2", "--shard-size", "1", "--flow", "opencv",
        "--workers", "0", "--no-progress"]
VIDEOS = 4


def flowprep(*args) -> tuple[int, str]:
    """``flowprep ARGS`` in this process: exit status and what it printed; a traceback fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback with bucket ``BUCKET``, and the AWS environment pointing at it
    (AWS_ENDPOINT_URL included: flowprep must find the server through it)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # poll until it answers; a server that exited fails at once
            try:
                urllib.request.urlopen(endpoint, timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # not listening yet, or still starting up
                assert server.poll() is None, "moto server exited"
                assert time.monotonic() < deadline, "moto server did not answer within 30 s"
                try:
                    server.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="test", secret_key="test",
                          region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "test")
            env.setenv("AWS_SECRET_ACCESS_KEY", "test")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            yield f"s3://{BUCKET}"
    finally:
        server.kill()
        server.wait()


def objects(uri: str) -> dict[str, int]:
    """Every object under ``uri`` (relative name -> size)."""
    store = storage(uri)
    root = uri.split("://", 1)[1]
    infos = store.fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Four panning videos of 10 frames (8 kept), two classes."""
    root = tmp_path_factory.mktemp("src")
    image = textured_image(64, 96)
    for v in range(VIDEOS):
        write_video(root / ("left", "right")[v % 2] / f"pan{v}.mp4", [np.roll(image, (v + 1) * i, axis=1) for i in range(10)])
    return root


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    """The same extraction into a local folder."""
    out = tmp_path_factory.mktemp("reference") / "out"
    status, output = flowprep("extract", "--src", src, "--out", out, *ARGS)
    assert status == 0, output
    return out


@pytest.fixture(scope="module")
def on_s3(s3, src) -> str:
    out = f"{s3}/runs/whole"
    status, output = flowprep("extract", "--src", src, "--out", out, *ARGS)
    assert status == 0, output
    assert f"{VIDEOS} written" in output
    return out


def assert_same_output(uri: str, local: Path) -> None:
    """``uri`` holds the shards, index parts, index and failures of ``local``, byte for byte,
    and nothing else of flowprep's (no .partial names: object storage never renames)."""
    shards = complete_shards(local)
    assert complete_shards(uri) == shards and len(shards) == VIDEOS
    names = [*shards, *map(index_part, shards), "failures.jsonl", "plan.parquet"]
    store = storage(uri)
    for name in names:
        assert store.read_bytes(name) == (local / name).read_bytes(), name
    assert pq.read_table(store.open_input("index.parquet")).equals(pq.read_table(local / "index.parquet"))
    assert sorted(objects(uri)) == sorted([*names, "dataset.json", "index.parquet"])


def test_extract_to_s3_writes_the_bytes_of_a_local_run(on_s3, reference, src):
    assert_same_output(on_s3, reference)
    assert storage(on_s3).read_bytes("dataset.json") == (reference / "dataset.json").read_bytes()
    # A rerun is a resume with nothing left to do, and changes no object.
    before = objects(on_s3)
    status, output = flowprep("extract", "--src", src, "--out", on_s3, *ARGS)
    assert status == 0 and f"{VIDEOS} already done, 0 written" in output
    assert objects(on_s3) == before


@pytest.mark.ray
def test_decoders_on_ray_write_shards_straight_to_s3(s3, src, reference):
    import ray

    out = f"{s3}/runs/ray"
    try:
        status, output = flowprep("extract", "--src", src, "--out", out, *ARGS, "--workers", "1")  # the last --workers counts
    finally:
        ray.shutdown()
    assert status == 0 and f"{VIDEOS} written" in output, output
    assert_same_output(out, reference)


def test_a_killed_run_resumes_to_the_same_output_and_its_leftovers_go(s3, src, reference):
    out = f"{s3}/runs/killed"
    assert kill_cli_when(["extract", "--src", src, "--out", out, *ARGS], "shard complete") == -signal.SIGKILL
    killed_at = complete_shards(out)
    assert 1 <= len(killed_at) < VIDEOS
    # What a kill between a shard's upload and its index part leaves: the shard object alone. It
    # is not part of the output: no reader sees it.
    store = storage(out)
    orphan = f"shards/shard-{len(killed_at):05d}.arrow"
    store.write(orphan, b"an upload that was never committed")
    store.write("shards/shard-00042.arrow", b"garbage")
    assert complete_shards(out) == killed_at
    reader = ShardReader(out)
    assert {reader.meta(v)["shard"] for v in reader.video_ids} == set(killed_at)

    status, output = flowprep("-q", "verify", out)
    assert status == 1 and f"{out}/{orphan}: left by an interrupted run" in output

    status, output = flowprep("extract", "--src", src, "--out", out, *ARGS)
    assert status == 0, output
    assert f"{VIDEOS - len(killed_at)} written" in output
    assert not store.exists("shards/shard-00042.arrow")
    assert_same_output(out, reference)


def test_readers_read_s3_by_ranges(on_s3, reference):
    reader = ShardReader(on_s3)
    local = ShardReader(reference)
    video = reader.video_ids[1]
    assert reader.video_ids == local.video_ids
    np.testing.assert_array_equal(reader.rgb(video, 2, 4), local.rgb(video, 2, 4))
    np.testing.assert_array_equal(reader.flow(video, 2, 4), local.flow(video, 2, 4))

    # Count what a fresh reader fetches for one clip: the footer and one record batch, not the shard.
    fetched = []

    class Counting(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, offset, whence=0):
            return self.f.seek(offset, whence)

        def tell(self):
            return self.f.tell()

        def readinto(self, buffer):
            data = self.f.read(len(buffer))
            buffer[: len(data)] = data
            fetched.append(len(data))
            return len(data)

    counted = ShardReader(on_s3)
    open_input = counted.storage.open_input
    counted.storage.open_input = lambda name: Counting(open_input(name))
    clip = counted.rgb(video, 2, 4)
    np.testing.assert_array_equal(clip, local.rgb(video, 2, 4))
    size = counted.storage.size(counted.meta(video)["shard"])
    print(f"one 2-frame clip (one batch of four): {sum(fetched)} bytes fetched in {len(fetched)} reads of a {size}-byte shard object")
    assert 0 < sum(fetched) < size / 2


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_clip_dataset_from_s3_in_dataloader_workers(on_s3, reference, start):
    dataset = ClipDataset(on_s3, modalities=("rgb", "flow"), clip_len=4, crop=32, train=False)
    expected = ClipDataset(reference, modalities=("rgb", "flow"), clip_len=4, crop=32, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context=start)
    batches = list(loader)
    assert sum(len(b["video_id"]) for b in batches) == len(expected) == VIDEOS
    for i, batch in enumerate(batches):
        for j in range(len(batch["video_id"])):
            item = expected[2 * i + j]
            assert batch["video_id"][j] == item["video_id"]
            assert torch.equal(batch["rgb"][j], item["rgb"]) and torch.equal(batch["flow"][j], item["flow"])


def test_verify_info_and_show_on_s3(on_s3, reference, tmp_path):
    status, output = flowprep("verify", on_s3)
    assert status == 0 and f"{on_s3}: {VIDEOS} videos verified, no problem" in output
    status, output = flowprep("info", on_s3, "--json")
    assert status == 0, output
    summary, local = json.loads(output), json.loads(flowprep("info", reference, "--json")[1])
    assert summary["out"] == on_s3
    assert {k: v for k, v in summary.items() if k != "out"} == {k: v for k, v in local.items() if k != "out"}
    status, output = flowprep("show", on_s3, "pan0", "--out", tmp_path / "pan0.png")
    assert status == 0 and (tmp_path / "pan0.png").stat().st_size > 0


def test_hdf5_teacher_targets_and_a_held_lock_are_refused_on_s3(s3, src, on_s3):
    out = f"{s3}/runs/hdf5"
    status, output = flowprep("extract", "--src", src, "--out", out, *ARGS, "--format", "hdf5")
    assert status == 2 and "--format hdf5 needs a local --out" in output
    assert objects(out) == {}

    status, output = flowprep("teacher", "--shards", on_s3, "--name", "t", "--model", "tests.nothing:model", "--workers", "0")
    assert status == 1 and "teacher targets need a local --shards folder" in output

    # A live holder's lock object (this process) refuses a second run, which deletes nothing.
    store = storage(on_s3)
    before = objects(on_s3)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "command": "flowprep extract", "token": "x"}
    store.write(LOCK, json.dumps(holder).encode())
    try:
        status, output = flowprep("extract", "--src", src, "--out", on_s3, *ARGS, "--overwrite")
        assert status == 1 and "is being written by pid" in output
        assert objects(on_s3) == {**before, LOCK: len(json.dumps(holder))}
    finally:
        store.delete(LOCK)


def test_overwrite_on_s3_deletes_only_flowprep_objects(s3, src):
    out = f"{s3}/runs/foreign"
    store = storage(out)
    store.write("notes.txt", b"not flowprep's")
    status, output = flowprep("extract", "--src", src, "--out", out, *ARGS, "--overwrite")
    assert status == 1 and f"holds files that flowprep did not write: {out}/notes.txt" in output
    assert objects(out) == {"notes.txt": 14}
    assert read_failures(out) == []


def test_info_on_s3_summarises_its_teachers(s3, src, tmp_path):
    from flowprep.teacher.run import TeacherConfig, compute_targets
    from flowprep.teacher.views import ViewGrid

    local = tmp_path / "out"
    assert flowprep("extract", "--src", src, "--out", local, *ARGS)[0] == 0
    torch.manual_seed(0)
    config = TeacherConfig("test_train:tiny", None, ViewGrid(clip_len=4, crop=48, window_stride=4), num_classes=2)
    assert compute_targets(local, "tiny", config, workers=0, progress=False).written == VIDEOS
    out = f"{s3}/runs/taught"
    store = storage(out)
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != LOCK):
        store.write(str(path.relative_to(local)), path.read_bytes())
    status, output = flowprep("info", out)
    assert status == 0 and f"teacher: tiny: test_train:tiny, {VIDEOS} videos (0 failed)" in output
    targets = ClipDataset(out, ("rgb",), clip_len=4, crop=48, teacher="tiny")  # served from S3 too
    assert len(targets) == VIDEOS and targets[0]["teacher_logits"].shape == (2,)


def test_the_flow_teacher_trains_on_shards_on_s3(s3, tmp_path):
    """train_teacher.py --shards s3://... reads the shards there (the URI is passed on as it is,
    not made a local path) and trains as on a local copy of the same extraction."""
    sys.path.insert(0, str(PIPELINES))
    import train_teacher

    src = tmp_path / "src"
    image = textured_image(64, 96)
    for label, speed in (("left", 1), ("right", -1)):
        write_video(src / "train" / label / f"pan_{label}.mp4", [np.roll(image, speed * i, axis=1) for i in range(10)])
    uri, local = f"{s3}/runs/train", tmp_path / "local"
    for out in (uri, local):
        status, output = flowprep("extract", "--src", src, "--out", out, *ARGS)
        assert status == 0, output
    options = ["--model", "test_train:tiny", "--epochs", "1", "--batch-size", "2", "--clip-len", "4", "--crop", "32",
               "--lr", "0.01", "--num-workers", "0", "--device", "cpu"]
    on_s3 = train_teacher.main(["--shards", uri, "--out", str(tmp_path / "run-s3"), *options])
    reference = train_teacher.main(["--shards", str(local), "--out", str(tmp_path / "run-local"), *options])
    start = json.loads((tmp_path / "run-s3" / "log.jsonl").read_text().splitlines()[0])
    assert start["args"]["shards"] == [uri]
    assert on_s3.end["step"] == reference.end["step"] == 1 and on_s3.end["loss"] == reference.end["loss"]
