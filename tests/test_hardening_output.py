"""The output folder, resume and reading under careless or hostile conditions (issue 11, items 1,
6, 7, 10, 12, 14): folders flowprep did not write, damaged shards, flipped bytes, a full disk,
missing files and the messages around them. Every input is built here."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from flowprep import ClipDataset, ShardReader
from flowprep.cli import main
from flowprep.codec import Codec
from flowprep.extract import extract
from flowprep.flow.opencv import opencv_cuda_devices
from flowprep.lock import output_lock
from flowprep.pipeline import ExtractConfig
from flowprep.samples import sample_clip
from flowprep.shards.layout import complete_shards, read_failures

from conftest import textured_image, write_video

CONFIG = ExtractConfig(short_side=64, chunk_frames=4, shard_size=1)  # one video per shard
ARGS = ["--short-side", "64", "--chunk-frames", "4", "--shard-size", "1", "--flow", "opencv", "--workers", "0", "--no-progress"]


def flowprep(*args) -> tuple[int, str]:
    """``flowprep ARGS`` in this process: exit status and what it printed. Fails the test on a
    traceback (an exception that is not the CLI's own exit)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Three panning videos of one class, no split; the middle one three times as long."""
    root = tmp_path_factory.mktemp("src")
    image = textured_image(64, 96)
    for name, frames in (("p0", 8), ("p1", 24), ("p2", 8)):
        write_video(root / "pan" / f"{name}.mp4", [np.roll(image, -2 * i, axis=1) for i in range(frames)])
    return root


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert extract(src, out, CONFIG, workers=0, progress=False).written == 3
    return out


@pytest.fixture()
def output(reference, tmp_path) -> Path:
    """A copy of the reference output, to damage."""
    return Path(shutil.copytree(reference, tmp_path / "out"))


def find_blob(out: Path, video_id: str, frame: int) -> tuple[Path, int, bytes]:
    """The shard of ``video_id``, the offset in it of its RGB frame ``frame``'s stored JPEG, and that JPEG."""
    with ShardReader(out) as reader:
        shard = out / reader.meta(video_id)["shard"]
        blob = bytes(reader.blobs(video_id, "rgb", [frame])[0])
    at = shard.read_bytes().find(blob)
    assert at > 0
    return shard, at, blob


def patch(path: Path, at: int, data: bytes) -> None:
    content = bytearray(path.read_bytes())
    content[at : at + len(data)] = data
    path.write_bytes(bytes(content))


# ---------------------------------------------------------------------------------------------
# item 1: flowprep deletes only what it can prove it wrote


def test_a_folder_flowprep_did_not_write_is_refused_and_left_alone(src, tmp_path):
    out = tmp_path / "mine"
    files = {"notes.txt": "my notes", "shards/features.parquet": "my table", "shards/shard-00000.arrow": "my shard"}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    for overwrite in ([], ["--overwrite"]):
        status, output = flowprep("extract", "--src", src, "--out", out, *ARGS, *overwrite)
        line = one_error_line(output)
        assert status == 1 and "notes.txt" in line and "features.parquet" in line and "--overwrite" not in line
        assert {name: (out / name).read_text() for name in files} == files
    # Only names flowprep uses, but no dataset.json of its own: it cannot tell they are its own.
    (out / "notes.txt").unlink()
    (out / "shards/features.parquet").unlink()
    status, output = flowprep("extract", "--src", src, "--out", out, *ARGS, "--overwrite")
    assert status == 1 and "dataset.json" in one_error_line(output)
    (out / "dataset.json").write_text('{"name": "my own dataset"}\n')
    status, output = flowprep("extract", "--src", src, "--out", out, *ARGS, "--overwrite")
    assert status == 1 and str(out / "dataset.json") in one_error_line(output) and "--overwrite" not in output
    assert (out / "dataset.json").read_text() == '{"name": "my own dataset"}\n'
    assert (out / "shards/shard-00000.arrow").read_text() == "my shard"


def test_resume_refuses_a_file_it_did_not_write_instead_of_deleting_it(output, src):
    (output / "shards" / "extra.parquet").write_bytes(b"mine")
    status, out = flowprep("extract", "--src", src, "--out", output, *ARGS)
    assert status == 1 and "extra.parquet" in one_error_line(out)
    assert (output / "shards" / "extra.parquet").read_bytes() == b"mine"


def test_overwrite_deletes_flowprep_files_teachers_and_leftovers_only(output, src):
    teacher = output / "teachers" / "flow"
    for name in ("teacher.json", "index.parquet", "shards/shard-00000.arrow", "shards/shard-00000.parquet"):
        (teacher / name).parent.mkdir(parents=True, exist_ok=True)
        (teacher / name).write_bytes(b"targets")
    (output / "shards" / "shard-00007.arrow.partial").write_bytes(b"left by a kill")
    (teacher / "notes.txt").write_text("mine")
    status, out = flowprep("extract", "--src", src, "--out", output, *ARGS, "--overwrite")
    assert status == 1 and "notes.txt" in one_error_line(out)
    assert len(complete_shards(output)) == 3 and (teacher / "shards" / "shard-00000.arrow").exists()
    (teacher / "notes.txt").unlink()
    status, out = flowprep("extract", "--src", src, "--out", output, *ARGS, "--overwrite")
    assert status == 0 and "3 written" in out
    assert not (output / "teachers").exists() and not (output / "shards" / "shard-00007.arrow.partial").exists()


def test_overwrite_is_refused_while_a_teacher_run_writes_its_targets(output, src):
    teacher = output / "teachers" / "flow"
    (teacher / "shards").mkdir(parents=True)
    for name in ("teacher.json", "shards/shard-00000.arrow.0123456789abcdef.partial"):
        (teacher / name).write_bytes(b"targets")
    before = sorted(p for p in output.rglob("*") if p.is_file())
    with output_lock(teacher):  # a teacher run in progress
        status, out = flowprep("extract", "--src", src, "--out", output, *ARGS, "--overwrite")
        line = one_error_line(out)
        assert status == 1 and f"{teacher} is being written by pid {os.getpid()}" in line
        assert sorted(p for p in output.rglob("*") if p.is_file() and p.name != "flowprep.lock") == before


# ---------------------------------------------------------------------------------------------
# item 6: damaged complete shards are found on resume; verify --repair drops them for a rerun


def test_damaged_shards_are_refused_on_resume_and_repaired(output, reference, src):
    first, second = (output / s for s in complete_shards(output)[:2])
    shard, at, blob = find_blob(output, "p0", 2)
    assert shard == first
    patch(first, at + len(blob) // 2, bytes([blob[len(blob) // 2] ^ 0x10]))  # a flipped bit: same size
    second.write_bytes(second.read_bytes()[:-100])  # cut short

    status, out = flowprep("extract", "--src", src, "--out", output, *ARGS)
    line = one_error_line(out)
    assert status == 1 and second.name in line and f"flowprep verify {output} --repair" in line
    status, out = flowprep("verify", output)
    assert status == 1 and first.name in out and "p0" in out and second.name in out
    status, out = flowprep("verify", output, "--repair")
    assert status == 0 and "dropped 2 damaged shard(s)" in out and "rerun the extract command" in out
    assert complete_shards(output) == ["shards/shard-00002.arrow"]

    status, out = flowprep("extract", "--src", src, "--out", output, *ARGS)
    assert status == 0 and "2 written" in out
    assert flowprep("verify", output)[0] == 0
    with ShardReader(output) as repaired, ShardReader(reference) as whole:
        assert sorted(repaired.video_ids) == sorted(whole.video_ids)
        for video_id in whole.video_ids:
            assert repaired.checksum(video_id) == whole.meta(video_id)["checksum"], video_id


def test_retry_failed_writes_a_mended_video_into_a_new_shard(tmp_path):
    """The failed video's shard is complete: the retried video must go into a shard of its own
    number, not back into that one (which the run would then skip as done)."""
    src = tmp_path / "src" / "pan"
    image = textured_image(64, 96)
    write_video(src / "a.mp4", [np.roll(image, -2 * i, axis=1) for i in range(8)])
    bikes = sample_clip("bikes.mp4").read_bytes()
    (src / "b.mp4").write_bytes(bikes[: len(bikes) // 3])  # truncated
    out = tmp_path / "out"
    args = ["extract", "--src", src.parent, "--out", out, "--flow", "none", "--shard-size", "1", "--workers", "0",
            "--short-side", "64", "--allow-failures", "1", "--no-progress"]
    status, output = flowprep(*args)
    assert status == 0 and "2 found, 0 already done, 1 written, 1 failed" in output
    assert [(f["video_id"], f["shard"]) for f in read_failures(out)] == [("b", "shards/shard-00001.arrow")]

    write_video(src / "b.mp4", [np.roll(image, 2 * i, axis=1) for i in range(8)])  # mended
    status, output = flowprep(*args, "--retry-failed")
    assert status == 0 and "2 found, 1 already done, 1 written, 0 failed" in output
    assert complete_shards(out) == [f"shards/shard-0000{n}.arrow" for n in range(3)]
    with ShardReader(out) as reader:
        assert reader.video_ids == ["a", "b"] and reader.meta("b")["shard"] == "shards/shard-00002.arrow"
        assert reader.rgb("b").shape == (8, 64, 96, 3)
    assert read_failures(out) == []


def test_verify_repair_is_refused_while_a_run_writes_and_deletes_nothing(output):
    in_flight = output / "shards" / "shard-00003.arrow.0123456789abcdef.partial"
    in_flight.write_bytes(b"a shard being written")
    with output_lock(output):  # an extract in progress
        status, out = flowprep("verify", output, "--repair")
        assert status == 1 and f"{output} is being written by pid {os.getpid()}" in one_error_line(out)
        assert in_flight.read_bytes() == b"a shard being written"
        status, out = flowprep("verify", output)  # plain verify only reads
        assert status == 1 and f"{in_flight}: left by an interrupted run" in out and in_flight.exists()
    status, out = flowprep("verify", output, "--repair")
    assert status == 0 and f"{in_flight}: left by an interrupted run, deleted" in out and not in_flight.exists()


# ---------------------------------------------------------------------------------------------
# item 7: reading fails loudly where the codec can tell, and on the checksum with verify=True


@pytest.mark.parametrize("spec", ["jpeg:95", "png:1", "zstd:3", "raw"])
def test_no_codec_returns_a_frame_of_another_shape(spec):
    codec = Codec.parse(spec)
    rng = np.random.default_rng(0)
    for channels in (3, 2):
        blob = codec.encode(rng.integers(0, 256, (8, 6, channels), dtype=np.uint8))
        for other in ((1, 6, channels), (8, 5, channels), (16, 6, channels)):
            with pytest.raises(ValueError, match=f"corrupt {codec.name} frame"):
                codec.decode(blob, other)


def test_a_damaged_frame_is_an_error_naming_shard_video_and_frame(output):
    shard, at, blob = find_blob(output, "p0", 2)
    sof = blob.find(b"\xff\xc0")  # baseline JPEG header: length, precision, then the height
    patch(shard, at + sof + 5, (1).to_bytes(2, "big"))  # one row: it would broadcast over the frame
    with pytest.raises(ValueError, match=rf"{shard.name}: p0 rgb frame 2: corrupt jpeg(-rst)? frame"):
        ShardReader(output).rgb("p0")
    status, out = flowprep("show", output, "p0", "--out", output.parent / "p0.png", "--frame", 2)
    assert status == 1 and "p0" in one_error_line(out)


def test_verify_true_checks_a_video_s_checksum_when_first_read(output, tmp_path):
    shard, at, blob = find_blob(output, "p1", 5)
    patch(shard, at + len(blob) // 2, bytes([blob[len(blob) // 2] ^ 0x10]))  # still a JPEG of the right shape
    assert ShardReader(output).rgb("p1", 5, 6).shape == (1, 64, 96, 3)  # no codec can tell
    reader = ShardReader(output, verify=True)
    assert reader.rgb("p0", 0, 1).shape == (1, 64, 96, 3)  # the others are whole
    with pytest.raises(ValueError, match=rf"{shard.name}: p1: stored bytes do not match the index checksum"):
        reader.flow("p1", 0, 1)
    dataset = ClipDataset(output, clip_len=4, crop=32, train=False, verify=True)
    p1 = [video_id for _, video_id in dataset.videos].index("p1")
    with pytest.raises(ValueError, match="p1: stored bytes do not match"):
        dataset[p1]
    status, out = flowprep("export", output, tmp_path / "dest")
    assert status == 1 and "p1" in one_error_line(out) and "checksum" in out


# ---------------------------------------------------------------------------------------------
# items 10 and 12: ordinary errors are one line with a documented exit status


def test_extract_errors_are_one_line(src, tmp_path):
    (tmp_path / "file").write_text("")
    status, out = flowprep("extract", "--src", src, "--out", tmp_path / "file" / "out", *ARGS)
    assert status == 1 and "Not a directory" in one_error_line(out)
    if opencv_cuda_devices():
        pytest.skip("this OpenCV has CUDA")
    status, out = flowprep("extract", "--src", src, "--out", tmp_path / "cuda", *ARGS, "--flow", "opencv-cuda")
    assert status == 2 and "opencv-cuda needs OpenCV built with CUDA" in out and "--flow" in out
    assert not (tmp_path / "cuda").exists()


@pytest.mark.parametrize("damage, message", [
    ("index.parquet", "index.parquet is missing: rerun the extract command"),
    ("shards/shard-00000.arrow", "shard-00000.arrow is missing"),
    ("cut shards/shard-00000.arrow", "shard-00000.arrow is corrupt or truncated"),
])
def test_show_and_export_name_a_missing_or_damaged_file_in_one_line(output, tmp_path, damage, message):
    if damage.startswith("cut "):
        path = output / damage.removeprefix("cut ")
        path.write_bytes(path.read_bytes()[:1000])
    else:
        (output / damage).unlink()
    for args in (["show", output, "p0", "--out", tmp_path / "p0.mp4"], ["export", output, tmp_path / "dest"]):
        status, out = flowprep(*args)
        assert status == 1 and message in one_error_line(out)


def test_a_broken_dataset_json_is_named(output):
    (output / "dataset.json").write_text('{"schema_version": 2, "params": {')
    status, out = flowprep("info", output)
    assert status == 1 and f"{output / 'dataset.json'} is not flowprep's: not valid JSON" in one_error_line(out)
    with pytest.raises(ValueError, match="dataset.json"):
        ShardReader(output)


def test_a_full_disk_stops_with_one_line_and_the_rerun_completes_the_same_output(src, reference, tmp_path):
    def small_file_limit():  # in the child: writes past 40 kB fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "out"
    command = [sys.executable, "-m", "flowprep.cli", "-q", "extract", "--src", str(src), "--out", str(out), *ARGS]
    full = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=small_file_limit)
    assert full.returncode == 1, full.stderr
    assert full.stderr.strip().splitlines() == [f"Error: out of space writing to {out} (File too large): the output is "
                                                "resumable, make room and rerun the same command"]
    assert complete_shards(out) == ["shards/shard-00000.arrow"]  # the first shard fits, p1's does not
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "1 already done, 2 written" in rerun.stdout, rerun.stderr
    assert complete_shards(out) == complete_shards(reference)
    for name in [*complete_shards(reference), "failures.jsonl"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(reference / "index.parquet"))


def test_a_full_disk_with_hdf5_shards_is_one_line_too(src, tmp_path):
    def small_file_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    reference, out = tmp_path / "reference", tmp_path / "out"
    command = [sys.executable, "-m", "flowprep.cli", "-q", "extract", "--src", str(src), *ARGS, "--format", "hdf5"]
    assert subprocess.run([*command, "--out", str(reference)], capture_output=True).returncode == 0
    full = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300, preexec_fn=small_file_limit)
    assert full.returncode == 1, full.stderr  # libhdf5 used to crash the process here
    assert full.stderr.strip().splitlines() == [f"Error: out of space writing to {out} (File too large): the output is "
                                                "resumable, make room and rerun the same command"]
    rerun = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "written" in rerun.stdout, rerun.stderr
    assert complete_shards(out) == complete_shards(reference)
    for name in complete_shards(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_failure_line_cut_short_is_redone_not_a_crash(output, src):
    with open(output / "failures.jsonl", "a") as f:
        f.write('{"video_id": "p1", "source": "x", "sta')  # a full disk or a kill in mid-line
    assert read_failures(output) == []
    status, out = flowprep("extract", "--src", src, "--out", output, *ARGS)
    assert status == 0 and "3 already done" in out and (output / "failures.jsonl").read_text() == ""


def test_an_out_of_range_or_inverted_trim_segment_says_so(tmp_path):
    src = tmp_path / "flat"
    for name in ("inverted", "beyond"):
        write_video(src / f"{name}.mp4", [textured_image(64, 96)] * 25)  # 1 s
    csv = tmp_path / "train.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\nx,inverted,0.6,0.2,train\nx,beyond,3,5,train\n")
    report = extract(src, tmp_path / "out", ExtractConfig(short_side=64, trim=True), annotations=csv, workers=0, progress=False)
    errors = {f["video_id"]: f["error"] for f in report.failures}
    assert "from the trim segment [0.6, 0.2) s, which ends before it starts" in errors["inverted"]
    assert "from the trim segment [3, 5) s of a 1 s video" in errors["beyond"]


# ---------------------------------------------------------------------------------------------
# item 14: videos without a split are counted under a readable name


def test_info_counts_videos_without_a_split(reference):
    status, out = flowprep("info", reference)
    assert status == 0 and "splits:  (no split): 3" in out
    status, out = flowprep("info", reference, "--json")
    assert json.loads(out)["videos_per_split"] == {"(no split)": 3}
