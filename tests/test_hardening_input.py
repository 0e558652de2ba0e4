"""Careless or hostile input to ``extract`` (issue 11, items 2-5, 8, 9, 11, 13, 15): bad option
values, symlinked and dangling sources, odd CSVs, ids that cannot name a folder, corrupt frames
and files with several video streams. Every input is built here."""

from __future__ import annotations

import json
import logging
import math
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from flowprep import ShardReader
from flowprep.cli import main
from flowprep.decode import VideoDecoder
from flowprep.errors import OptionError
from flowprep.extract import extract
from flowprep.flow import get_backend
from flowprep.pipeline import ExtractConfig
from flowprep.shards.layout import read_failures, write_json
from flowprep.sources import find_videos, video_id_problem

from conftest import index_frame, read_index, textured_image, write_video

FAST = ["--short-side", "64", "--max-frames", "4", "--workers", "0", "--no-progress"]


def flowprep(*args) -> tuple[int, str]:
    """``flowprep ARGS`` in this process: exit status and everything it printed."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def panning_video(path: Path, frames: int = 6, codec: str = "libx264") -> Path:
    """A textured picture moving 2 px a frame to the left, 64x96 pixels."""
    image = textured_image(64, 96)
    return write_video(path, [np.roll(image, -2 * i, axis=1) for i in range(frames)], codec=codec)


@pytest.fixture(scope="module")
def one_video(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("one")
    panning_video(src / "things" / "good.mp4")
    return src


# ---------------------------------------------------------------------------------------------
# items 2 and 11: every numeric option and TV-L1 parameter checked before anything is written


@pytest.mark.parametrize("args, named", [
    (["--flow-bound", "nan"], ["--flow-bound"]),
    (["--flow-bound", "inf"], ["--flow-bound"]),
    (["--shard-size", "0"], ["--shard-size"]),
    (["--allow-failures", "inf"], ["--allow-failures"]),
    (["--flow", "nonsense"], ["--flow"]),
    (["--flow-params", "warps=0"], ["--flow-params", "warps"]),
    (["--flow-params", "nscales=0"], ["--flow-params", "nscales"]),
    (["--flow-params", "tau=-1"], ["--flow-params", "tau"]),
    (["--flow-params", "tau=abc"], ["--flow-params", "tau"]),
    (["--flow-params", "theta=nan"], ["--flow-params", "theta"]),
    (["--flow-params", "scale_step=1.5"], ["--flow-params", "scale_step"]),
    (["--flow-params", "median_filtering=4"], ["--flow-params", "median_filtering"]),
    (["--flow-params", "warps=2.5"], ["--flow-params", "warps"]),
    (["--flow-params", "warps=1e20"], ["--flow-params", "warps"]),
    (["--rgb-codec", "jpeg:nan"], ["--rgb-codec", "whole number"]),
    (["--flow-params", "tau"], ["--flow-params", "key=value"]),
    (["--flow", "opencv", "--flow-params", "iterations=5"], ["--flow-params", "iterations"]),
    (["--flow", "torch", "--flow-params", "variant=gpu"], ["--flow-params", "variant"]),
    (["--flow", "torch", "--flow-params", "variant=cuda,iterations=0"], ["--flow-params", "iterations"]),
])
def test_bad_options_exit_2_naming_them_before_writing(one_video, tmp_path, args, named):
    out = tmp_path / "out"
    status, output = flowprep("extract", "--src", one_video, "--out", out, *FAST, *args)
    assert status == 2, output
    assert all(name in output for name in named), output
    assert "Traceback" not in output
    assert not out.exists()


@pytest.mark.parametrize("backend", ["opencv", "torch"])
@pytest.mark.parametrize("params, name", [({"warps": 0}, "warps"), ({"lambda": 0}, "lambda"), ({"epsilon": -1}, "epsilon"),
                                          ({"inner_iterations": 0}, "inner_iterations"), ({"gamma": math.inf}, "gamma"),
                                          ({"scale_step": 0}, "scale_step")])
def test_both_backends_share_one_parameter_check(backend, params, name):
    with pytest.raises(OptionError, match=f"parameter {name}=") as info:
        get_backend(backend, params)
    assert info.value.option == "flow_params"
    # epsilon 0 (run every iteration) and median_filtering 0 (off) are what OpenCV takes.
    assert get_backend(backend, {"epsilon": 0, "median_filtering": 0}).params["epsilon"] == 0


def test_config_refuses_non_finite_and_non_positive_values():
    for options, name in (({"flow_bound": math.nan}, "flow_bound"), ({"flow_bound": -math.inf}, "flow_bound"),
                          ({"fps": 0}, "fps"), ({"short_side": 2.5}, "short_side"), ({"max_frames": 1}, "max_frames"),
                          ({"shard_size": 0}, "shard_size"), ({"flow_params": {"warps": 0}}, "flow_params"),
                          ({"flow_backend": "raft"}, "flow_backend")):
        with pytest.raises(OptionError) as info:
            ExtractConfig(**options)
        assert info.value.option == name


def test_dataset_json_never_holds_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path, "dataset.json", {"params": {"flow_bound": math.nan}})
    assert not (tmp_path / "dataset.json").exists()


# ---------------------------------------------------------------------------------------------
# item 3: symlinked class folders, link loops, dangling links


def test_symlinked_class_folders_are_followed_once_and_dangling_links_fail(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "jumping"
    panning_video(elsewhere / "jump.mp4", frames=4)
    src = tmp_path / "src"
    panning_video(src / "train" / "running" / "run.mp4", frames=4)
    (src / "train" / "jumping").symlink_to(elsewhere, target_is_directory=True)
    (src / "train" / "jumping_again").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice
    (src / "train" / "running" / "loop").symlink_to(src / "train", target_is_directory=True)  # a loop
    (src / "train" / "running" / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    out = tmp_path / "out"
    report = extract(src, out, ExtractConfig(short_side=64, chunk_frames=4), workers=0, progress=False)
    assert report.written == 2 and report.failed == 1
    reader = ShardReader(out)
    assert sorted(reader.video_ids) == ["jump", "run"]
    assert reader.meta("jump")["label"] == "jumping" and reader.label_map == {"jumping": 0, "running": 1}
    [failure] = read_failures(out)
    assert (failure["video_id"], failure["stage"]) == ("gone", "source")
    assert "dangling" in failure["error"] and str(tmp_path / "deleted.mp4") in failure["error"]
    assert failure["source"] == str(src / "train" / "running" / "gone.mp4")


# ---------------------------------------------------------------------------------------------
# item 4: annotation CSVs as spreadsheets save them, and CSVs that do not fit


HEADER = "label,youtube_id,time_start,time_end,split"


def test_csv_with_a_byte_order_mark_keeps_its_labels(tmp_path):
    (tmp_path / "abc_000001_000011.mp4").write_bytes(b"x")
    csv = tmp_path / "train.csv"
    csv.write_text(f"{HEADER}\r\nwaving,abc,1,11,train\r\n", encoding="utf-8-sig")  # as Excel saves it
    specs, problems = find_videos(tmp_path, csv)
    assert problems == [] and [(s.video_id, s.label, s.split) for s in specs] == [("abc_000001_000011", "waving", "train")]


@pytest.mark.parametrize("text, expected", [
    ("label,youtube_id,split\nwaving,abc,train\n", r"line 1: the header lacks columns \['time_start', 'time_end'\]"),
    (f"{HEADER}\nwaving,abc,1,11,train\nwaving,def,1\n", r"line 3: no value for \['time_end', 'split'\]"),
    (f"{HEADER}\nwaving,abc,1,11,train\nwaving,def,x,11,train\n", r"line 3: time_start 'x' is not a number"),
    (f"{HEADER}\nwaving, and more,abc,1,11,train\n", r"line 2: 6 fields, the header has 5"),
    (f"{HEADER}\nw\xe4hlen,abc,1,11,train\n".encode("latin-1"), "is not UTF-8 text"),  # saved as Latin-1
])
def test_csv_that_does_not_fit_names_file_and_line(tmp_path, text, expected):
    csv = tmp_path / "train.csv"
    csv.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(OptionError, match=f"{csv}[, ]+{expected}"):
        find_videos(tmp_path, csv)


def test_csv_error_is_bad_usage(one_video, tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("label,youtube_id,split\nwaving,good,train\n")
    status, output = flowprep("extract", "--src", one_video, "--annotations", csv, "--out", tmp_path / "out", *FAST)
    assert status == 2 and "--annotations" in output and "line 1" in output and "time_start" in output, output


# ---------------------------------------------------------------------------------------------
# item 13: nothing to extract is bad usage, saying what was looked for


def test_empty_source_and_empty_csv_exit_2(tmp_path):
    src = tmp_path / "src"
    (src / "train" / "waving").mkdir(parents=True)
    (src / "train" / "waving" / "notes.txt").write_text("no video here")
    out = tmp_path / "out"
    status, output = flowprep("extract", "--src", src, "--out", out, *FAST)
    assert status == 2 and "--src" in output and "no video under" in output and ".mp4" in output, output
    for text in ("", f"{HEADER}\n"):
        csv = tmp_path / "empty.csv"
        csv.write_text(text)
        status, output = flowprep("extract", "--src", src, "--annotations", csv, "--out", out, *FAST)
        assert status == 2 and "--annotations" in output and "empty.csv" in output and "row" in output, output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# items 8 and 9: one id check at the source, for every layout


def test_video_id_problems():
    for bad in ("", ".", "..", "a/b", "a\\b", "a\nb", "a\rb", "a\tb", "a\x00b", "a\x7fb", "a\u2028b"):
        assert video_id_problem(bad), repr(bad)
    for good in ("abc_000001_000011", "-x_Y", "...x", "with space", "é"):
        assert video_id_problem(good) is None, good


def test_csv_rows_get_the_same_id_check(tmp_path):
    (tmp_path / "abc.mp4").write_bytes(b"x")
    csv = tmp_path / "train.csv"
    csv.write_text(f"{HEADER}\nwaving,abc,1,11,train\nwaving,a/b,1,11,train\nwaving,,1,11,train\nwaving,..,1,11,train\n")
    specs, problems = find_videos(tmp_path, csv, trim=True)
    assert [s.video_id for s in specs] == ["abc"]
    assert [(p.video_id, p.source) for p in problems] == [("a/b", f"{csv}, line 3"), ("", f"{csv}, line 4"),
                                                          ("..", f"{csv}, line 5")]
    assert ["separator" in problems[0].error, "empty" in problems[1].error, "folder" in problems[2].error] == [True] * 3
    assert all(p.label == "waving" for p in problems)


@pytest.mark.parametrize("fmt", ["arrow", "hdf5"])
def test_dot_names_fail_alone_in_both_formats(tmp_path, fmt):
    folder = tmp_path / "src" / "things"
    good = panning_video(folder / "good.mp4", frames=4)
    for name in ("..mp4", "...mp4"):  # ids "." and ".."
        shutil.copy(good, folder / name)
    out = tmp_path / "out"
    status, output = flowprep("extract", "--src", tmp_path / "src", "--out", out, "--format", fmt, *FAST)
    assert status == 3, output  # two failed videos, none allowed
    assert ShardReader(out).video_ids == ["good"]
    failures = {f["video_id"]: f for f in read_failures(out)}
    assert failures.keys() == {".", ".."} and {f["stage"] for f in failures.values()} == {"source"}
    assert "names a folder" in failures["."]["error"] and failures[".."]["source"] == str(folder / "...mp4")


def test_export_refuses_ids_its_list_files_cannot_hold(tmp_path):
    panning_video(tmp_path / "src" / "things" / "with space.mp4", frames=4)
    out, dest = tmp_path / "out", tmp_path / "dest"
    assert extract(tmp_path / "src", out, ExtractConfig(short_side=64), workers=0, progress=False).written == 1
    status, output = flowprep("export", out, dest)
    assert status == 1 and "with space" in output and "whitespace" in output, output
    assert not dest.exists()


# ---------------------------------------------------------------------------------------------
# item 5: frames FFmpeg flags as corrupt


def damaged_mpeg4(path: Path, frames: int = 12, packet: int = 6) -> Path:
    """An mpeg4 .avi with 8 bytes flipped a third into packet ``packet`` (a P-frame).

    Found by trying: FFmpeg's mpeg4 decoder conceals the damage and flags that frame
    ``is_corrupt``; h264 in .mp4 mostly rejects such a packet outright (a decoder error), and in
    MPEG-TS the damage went unflagged.
    """
    panning_video(path, frames, codec="mpeg4")
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
        position, size, key = packets[packet].pos, packets[packet].size, packets[packet].is_keyframe
    assert not key
    data = bytearray(path.read_bytes())
    for i in range(position + size // 3, position + size // 3 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_corrupt_frames_are_counted_warned_about_or_failed(tmp_path, caplog):
    src = tmp_path / "src"
    damaged_mpeg4(src / "things" / "damaged.avi")
    with VideoDecoder(str(src / "things" / "damaged.avi")) as video:
        assert len(list(video.frames(short_side=64))) == 12
        assert video.corrupt_frames >= 1
    config = ExtractConfig(short_side=64, chunk_frames=4)
    with caplog.at_level(logging.WARNING, logger="flowprep.extract"):
        report = extract(src, tmp_path / "out", config, workers=0, progress=False)
    assert report.written == 1
    assert ShardReader(tmp_path / "out").meta("damaged")["corrupt_frames"] == video.corrupt_frames
    assert any("damaged" in r.message and "corrupt" in r.message for r in caplog.records)
    out = tmp_path / "strict"
    status, output = flowprep("extract", "--src", src, "--out", out, "--fail-corrupt", "--short-side", 64, "--workers", 0)
    assert status == 3, output
    [failure] = read_failures(out)
    assert (failure["video_id"], failure["stage"]) == ("damaged", "decode") and "corrupt" in failure["error"]
    assert json.loads((out / "dataset.json").read_text())["params"]["fail_corrupt"] is True


def test_clean_video_has_no_corrupt_frames(tmp_path):
    path = panning_video(tmp_path / "clean.avi", frames=12, codec="mpeg4")
    with VideoDecoder(str(path)) as video:
        list(video.frames(short_side=64))
    assert video.corrupt_frames == 0


# ---------------------------------------------------------------------------------------------
# item 15: the video stream ffmpeg would choose, recorded


def three_stream_video(path: Path, frames: int = 8) -> Path:
    """Stream 0: a small static picture (flagged default, as muxers flag the first); stream 1: the
    video, 64x128 index frames; stream 2: cover art, larger than both (``attached_pic``)."""
    with av.open(str(path), "w") as container:
        small = container.add_stream("libx264", rate=25)
        video = container.add_stream("libx264", rate=25)
        cover = container.add_stream("mjpeg", rate=1)
        (small.width, small.height), (video.width, video.height), (cover.width, cover.height) = (32, 32), (128, 64), (256, 256)
        small.pix_fmt, video.pix_fmt, cover.pix_fmt = "yuv420p", "yuv420p", "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((256, 256, 3), 200, np.uint8), format="rgb24").reformat(format="yuvj420p")
        for packet in [*cover.encode(picture), *cover.encode()]:
            container.mux(packet)
        for i in range(frames):
            for stream, image in ((small, np.full((32, 32, 3), 100, np.uint8)), (video, index_frame(i))):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, 25)
                for packet in stream.encode(frame):
                    container.mux(packet)
        for stream in (small, video):
            for packet in stream.encode():
                container.mux(packet)
    return path


def test_largest_video_stream_that_is_no_cover_art_is_used_and_recorded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    three_stream_video(src / "streams.mp4")
    with av.open(str(src / "streams.mp4")) as container:
        assert [s.disposition & av.stream.Disposition.attached_pic for s in container.streams.video] == [0, 0, 1024]
    out = tmp_path / "out"
    assert extract(src, out, ExtractConfig(short_side=64, chunk_frames=4), workers=0, progress=False).written == 1
    reader = ShardReader(out)
    meta = reader.meta("streams")
    assert (meta["source_stream"], meta["corrupt_frames"], meta["height"], meta["width"]) == (1, 0, 64, 128)
    assert [read_index(f) for f in reader.rgb("streams")] == list(range(8))
