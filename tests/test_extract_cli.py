"""``flowprep extract`` as a user runs it: a subprocess, a real local Ray, real and broken videos."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from flowprep import ShardReader
from flowprep.samples import sample_clip
from flowprep.shards.layout import complete_shards

from conftest import index_frame, kill_cli_when, read_index, textured_image, write_video

SMALL = ["--short-side", "48", "--max-frames", "10", "--chunk-frames", "4", "--no-progress"]


def flowprep(*args, check_status: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "flowprep.cli", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check_status is not None:
        assert result.returncode == check_status, result.stdout + result.stderr
    return result


def failures(out) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_kinetics_folder_end_to_end_on_ray(kinetics_folder, tmp_path):
    out = tmp_path / "out"
    result = flowprep("extract", "--src", kinetics_folder, "--out", out, "--workers", 2, *SMALL)
    assert "4 written, 0 failed" in result.stdout
    reader = ShardReader(out)
    assert sorted(reader.video_ids) == ["bikes", "carphone", "index_mpeg4", "index_vp9"]
    assert reader.label_map == {"counting": 0, "riding_bike": 1, "talking": 2}
    bikes = reader.meta("bikes")
    assert (bikes["label"], bikes["split"], bikes["label_index"], bikes["num_frames"]) == ("riding_bike", "train", 1, 10)
    assert reader.rgb("bikes").shape == (10, 48, 113, 3)
    # 30 fps and 15 fps sources at 25 fps: frame k shows source frame floor(k * fps / 25)
    assert [read_index(f) for f in reader.rgb("index_vp9")] == [k * 30 // 25 for k in range(10)]
    assert [read_index(f) for f in reader.rgb("index_mpeg4")] == [k * 15 // 25 for k in range(10)]
    assert reader.meta("index_mpeg4")["source_codec"] == "mpeg4"
    info = json.loads(flowprep("info", out, "--json").stdout)
    assert (info["videos"], info["frames"], info["flow_pairs"], info["failed"]) == (4, 40, 36, 0)
    assert info["videos_per_split"] == {"train": 2, "val": 2}
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["params"]["flow_backend"] == "opencv" and dataset["params"]["flow_params"]["warps"] == 5
    assert {"flowprep", "opencv", "pyav", "ffmpeg"} <= dataset["versions"].keys()


@pytest.fixture()
def broken_folder(tmp_path):
    root = tmp_path / "src" / "things"
    root.mkdir(parents=True)
    write_video(root / "good.mp4", [index_frame(i) for i in range(8)])
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    data = sample_clip("bikes.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    write_video(root / "one_frame.mp4", [index_frame(1)])
    import av

    with av.open(str(root / "audio_only.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
    return root.parent


@pytest.mark.ray
def test_broken_videos_are_recorded_and_the_rest_written(broken_folder, tmp_path):
    out = tmp_path / "out"
    result = flowprep("extract", "--src", broken_folder, "--out", out, "--workers", 2, *SMALL, check_status=3)
    assert "1 written, 5 failed" in result.stdout
    assert ShardReader(out).video_ids == ["good"]
    records = {r["video_id"]: r for r in failures(out)}
    assert sorted(records) == ["audio_only", "empty", "one_frame", "text", "truncated"]
    assert all(r["stage"] == "decode" and r["source"].endswith(r["video_id"] + ".mp4") for r in records.values())
    assert records["empty"]["error"] == "empty file (0 bytes)"
    assert records["audio_only"]["error"] == "no video stream"
    assert "at least 2" in records["one_frame"]["error"]
    assert records["text"]["error"].startswith("FFmpeg cannot open it")


def test_exit_status_follows_allow_failures(broken_folder, tmp_path):
    out = tmp_path / "out"
    args = ["extract", "--src", broken_folder, "--out", out, "--workers", 0, *SMALL]
    flowprep(*args, check_status=3)  # 5 of 6 failed, none allowed
    flowprep(*args, "--allow-failures", "4", check_status=3)
    flowprep(*args, "--allow-failures", "5", check_status=0)
    flowprep(*args, "--allow-failures", "0.8", check_status=3)  # int(0.8 * 6) = 4 < 5
    flowprep(*args, "--allow-failures", "0.9", check_status=0)  # int(0.9 * 6) = 5
    result = flowprep(*args, "--allow-failures", "0.9", "--short-side", "64", check_status=1)
    assert "other params" in result.stderr and "--overwrite" in result.stderr
    assert "Exit status" in flowprep("extract", "--help").stdout


def test_annotation_csv_with_missing_rows_and_trim(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    write_video(src / "abc_000001_000002.mp4", [index_frame(i) for i in range(10)])
    write_video(src / "full.mp4", [index_frame(i) for i in range(100)])  # 4 s at 25 fps, cut to [1, 2)
    csv = tmp_path / "train.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\n"
                   "waving,abc,1,2,train\nwaving,full,1,2,train\nclapping,gone,5,15,train\nwaving,abc,1,2,train\n")
    out = tmp_path / "out"
    flowprep("extract", "--src", src, "--out", out, "--annotations", csv, "--trim", "--workers", 0, "--allow-failures", 2, *SMALL[:2], "--no-progress")
    reader = ShardReader(out)
    assert reader.video_ids == ["abc_000001_000002", "full"]
    assert reader.label_map == {"clapping": 0, "waving": 1}
    full = reader.meta("full")
    assert (full["segment_start"], full["segment_end"], full["num_frames"]) == (1.0, 2.0, 25)
    assert [read_index(f) for f in reader.rgb("full", 0, 3)] == [25, 26, 27]
    assert failures(out) == [
        {"video_id": "gone_000005_000015", "source": str(src / "gone_000005_000015.*"), "stage": "source", "error": "file not found", "shard": None},
        {"video_id": "abc_000001_000002", "source": str(src / "abc_000001_000002.mp4"), "stage": "source",
         "error": "duplicate video id in the annotations", "shard": None},
    ]


@pytest.mark.ray
def test_killed_run_resumes_to_the_same_output(tmp_path):
    src = tmp_path / "src" / "pans"
    image = textured_image(96, 160)
    for v in range(6):
        write_video(src / f"pan{v}.mp4", [np.roll(image, (v + 1) * i, axis=1) for i in range(10)])
    # A video that fails part-way: its first chunks are written (and dropped) before the decoder
    # meets the damage. Resuming must reproduce that too.
    data = bytearray(write_video(tmp_path / "v.mp4", [index_frame(i) for i in range(40)]).read_bytes())
    data[len(data) // 2 - 200 : len(data) // 2 + 200] = np.random.default_rng(0).integers(0, 256, 400, np.uint8).tobytes()
    (src / "pan2_damaged.mp4").write_bytes(bytes(data))
    reference, out = tmp_path / "reference", tmp_path / "out"
    args = ["--src", src.parent, "--shard-size", "1", "--short-side", "64", "--chunk-frames", "4", "--no-progress",
            "--allow-failures", "1"]
    flowprep("extract", *args, "--out", reference, "--workers", 0)
    assert [f["video_id"] for f in failures(reference)] == ["pan2_damaged"]
    assert "decoder error after" in failures(reference)[0]["error"]

    # Kill the whole process group (driver and its local Ray) once the first shard is complete.
    assert kill_cli_when(["extract", *args, "--out", out, "--workers", 1], "shard complete") == -signal.SIGKILL
    killed_at = complete_shards(out)
    assert 1 <= len(killed_at) < 6
    assert {r["video_id"] for r in pq.read_table(out / "index.parquet").to_pylist()} < {f"pan{v}" for v in range(6)}

    result = flowprep("extract", *args, "--out", out, "--workers", 1)
    assert f"{6 - len(killed_at)} written" in result.stdout
    assert not list(out.glob("**/*.partial"))
    assert failures(out) == failures(reference)
    assert complete_shards(out) == complete_shards(reference)
    for shard in complete_shards(reference):
        assert (out / shard).read_bytes() == (reference / shard).read_bytes(), shard
    index = pq.read_table(out / "index.parquet")
    assert sorted(index.column("video_id").to_pylist()) == [f"pan{v}" for v in range(6)]
    assert index.equals(pq.read_table(reference / "index.parquet"))
    shutil.rmtree(out)


@pytest.mark.ray
def test_demo_extracts_the_sample_clips_and_reads_one_back(tmp_path):
    out = tmp_path / "demo"
    result = flowprep("demo", "--out", out, "--workers", 2)
    assert "3 written, 0 failed" in result.stdout and "read back" in result.stdout
    assert sorted(ShardReader(out).video_ids) == ["bigbuckbunny", "bikes", "carphone"]


def test_a_command_ends_after_pythons_exit_work_with_its_status(tmp_path):
    """flowprep's commands end through run_and_exit: exit handlers run and piped output is all
    there, and the status is the command's, whatever C++ destructors would have done."""
    script = tmp_path / "cmd.py"
    script.write_text(
        "import atexit, sys, threading\n"
        "from flowprep.process import run_and_exit\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "printed = threading.Event()\n"
        "def main():\n"
        "    threading.Thread(target=lambda: printed.wait() and print('thread done')).start()\n"
        "    print('x' * 100000)\n"
        "    printed.set()\n"
        "    sys.exit(int(sys.argv[1]))\n"
        "run_and_exit(main)\n")
    for status in (0, 3):
        result = subprocess.run([sys.executable, str(script), str(status)], capture_output=True, text=True)
        assert result.returncode == status
        assert result.stdout == "x" * 100000 + "\nthread done\nhandler ran\n"
