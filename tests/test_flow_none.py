"""``extract --flow none``: RGB-only shards, and every reader and command on them."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import cv2
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from flowprep import ClipDataset, ShardReader
from flowprep.cli import main
from flowprep.errors import OptionError
from flowprep.pipeline import ExtractConfig, decode_chunks
from flowprep.shards.layout import complete_shards, index_part
from flowprep.sources import VideoSpec

from conftest import textured_image, write_video

# One video per shard, so that a resume has a complete shard to keep and one to redo.
OPTIONS = ["--short-side", "64", "--max-frames", "12", "--chunk-frames", "4", "--shard-size", "1", "--no-progress"]
ARGS = [*OPTIONS, "--workers", "0"]


def flowprep(*args) -> tuple[int, str]:
    """``flowprep ARGS`` in this process: exit status and what it printed; a traceback fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def frame_columns(shard: Path) -> set[str]:
    """The frame columns a shard file stores: Arrow's schema fields, HDF5's datasets of every video."""
    if shard.suffix == ".arrow":
        return set(pa.ipc.open_file(pa.memory_map(str(shard))).schema.names) - {"video_id", "frame"}
    with h5py.File(shard, "r") as f:
        return {name for group in f["videos"].values() for name in group}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Two panning videos, train and val: 14 frames (12 kept) and 10, stored at 64x103."""
    root = tmp_path_factory.mktemp("src")
    image = textured_image(96, 154)
    write_video(root / "train" / "pan" / "a.mp4", [np.roll(image, 2 * i, axis=1) for i in range(14)])
    write_video(root / "val" / "pan" / "b.mp4", [np.roll(image, -i, axis=0) for i in range(10)])
    return root


@pytest.fixture(scope="module", params=["arrow", "hdf5"])
def outputs(request, src, tmp_path_factory) -> tuple[Path, Path]:
    """``(rgb_only, with_flow)``: ``src`` extracted with --flow none and with --flow opencv, options otherwise equal."""
    root = tmp_path_factory.mktemp(request.param)
    for flow in ("none", "opencv"):
        status, output = flowprep("extract", "--src", src, "--out", root / flow, "--flow", flow, "--format", request.param, *ARGS)
        assert status == 0, output
    return root / "none", root / "opencv"


def test_shards_hold_the_rgb_of_a_run_with_flow_and_no_flow(outputs):
    rgb_only, with_flow = outputs
    assert json.loads((rgb_only / "dataset.json").read_text())["has_flow"] is False
    assert json.loads((with_flow / "dataset.json").read_text())["has_flow"] is True
    assert len(complete_shards(rgb_only)) == 2
    assert all(frame_columns(rgb_only / shard) == {"rgb"} for shard in complete_shards(rgb_only))
    assert all(frame_columns(with_flow / shard) == {"rgb", "flow"} for shard in complete_shards(with_flow))
    reader, reference = ShardReader(rgb_only), ShardReader(with_flow)
    assert (reader.has_flow, reference.has_flow) == (False, True)
    assert reader.video_ids == reference.video_ids == ["a", "b"]
    index = {row["video_id"]: row for row in pq.read_table(rgb_only / "index.parquet").to_pylist()}
    for video_id in reader.video_ids:
        n = reader.meta(video_id)["num_frames"]
        assert n == reference.meta(video_id)["num_frames"]
        rgb = [bytes(b) for b in reader.blobs(video_id, "rgb", range(n))]
        assert rgb == [bytes(b) for b in reference.blobs(video_id, "rgb", range(n))]
        assert index[video_id]["checksum"] == reader.checksum(video_id) == hashlib.sha256(b"".join(rgb)).hexdigest()
        assert index[video_id]["bytes"] == sum(map(len, rgb))
    np.testing.assert_array_equal(ShardReader(rgb_only, verify=True).rgb("a"), reference.rgb("a"))
    for read in (lambda: reader.flow("a"), lambda: reader.flow("a", 0, 99), lambda: reader.flow_at("a", [0], raw=True),
                 lambda: reader.blobs("a", "flow", [0])):
        with pytest.raises(ValueError, match="was extracted with --flow none: it holds no flow"):
            read()


def test_a_rerun_resumes_and_other_flow_options_are_refused(outputs, src, tmp_path):
    rgb_only, _ = outputs
    fmt = ShardReader(rgb_only).format
    out = tmp_path / "out"
    shutil.copytree(rgb_only, out)
    # What a run killed while writing its second shard leaves: the first shard only.
    last = complete_shards(out)[-1]
    (out / index_part(last)).unlink()
    (out / last).unlink()
    status, output = flowprep("extract", "--src", src, "--out", out, "--flow", "none", "--format", fmt, *ARGS)
    assert status == 0 and "1 already done, 1 written" in output
    assert complete_shards(out) == complete_shards(rgb_only)
    for shard in complete_shards(out):
        assert (out / shard).read_bytes() == (rgb_only / shard).read_bytes(), shard
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(rgb_only / "index.parquet"))
    status, output = flowprep("extract", "--src", src, "--out", out, "--flow", "opencv", "--format", fmt, *ARGS)
    assert status == 1 and "flow_backend: 'none' -> 'opencv'" in output


def test_flow_parameters_are_refused_and_no_gray_frames_are_made(src, tmp_path):
    with pytest.raises(OptionError) as error:
        ExtractConfig(flow_backend="none", flow_params={"tau": 0.2})
    assert error.value.option == "flow_params"
    status, output = flowprep("extract", "--src", src, "--out", tmp_path / "out", "--flow", "none", "--flow-params", "tau=0.2", *ARGS)
    assert status == 2 and "--flow-params" in output and not (tmp_path / "out").exists()
    config = ExtractConfig(flow_backend="none", short_side=64, max_frames=12, chunk_frames=4)
    chunks = list(decode_chunks(VideoSpec("a", str(src / "train" / "pan" / "a.mp4")), config))
    assert [len(c.rgb) for c in chunks] == [4, 4, 4]
    assert all(c.gray is None and c.flow == [] for c in chunks)


@pytest.mark.ray
def test_ray_run_writes_the_same_bytes(src, tmp_path):
    args = ["extract", "--src", src, "--flow", "none", *OPTIONS]
    assert flowprep(*args, "--out", tmp_path / "local", "--workers", 0)[0] == 0
    result = subprocess.run([sys.executable, "-m", "flowprep.cli", *map(str, args), "--out", tmp_path / "ray", "--workers", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "no flow (RGB only)" in result.stderr  # it ran on Ray, with decoders only
    assert complete_shards(tmp_path / "ray") == complete_shards(tmp_path / "local")
    for shard in complete_shards(tmp_path / "local"):
        assert (tmp_path / "ray" / shard).read_bytes() == (tmp_path / "local" / shard).read_bytes(), shard
    assert pq.read_table(tmp_path / "ray" / "index.parquet").equals(pq.read_table(tmp_path / "local" / "index.parquet"))


def test_clip_dataset_gives_rgb_and_refuses_flow(outputs):
    rgb_only, with_flow = outputs
    options = dict(modalities=("rgb",), clip_len=4, crop=32, train=False)
    item = ClipDataset(rgb_only, **options)[0]
    assert item["rgb"].shape == (3, 4, 32, 32) and "flow" not in item
    assert item["start"] == (12 - 4) // 2  # the centre clip of all 12 frames: none is left out for want of a flow
    assert torch.equal(item["rgb"], ClipDataset(with_flow, **options)[0]["rgb"])
    for modalities in (("rgb", "flow"), ("flow",)):
        with pytest.raises(ValueError, match="extracted with --flow none"):
            ClipDataset([with_flow, rgb_only], **{**options, "modalities": modalities})


def test_info_verify_show_and_export(outputs, tmp_path):
    rgb_only, _ = outputs
    status, output = flowprep("info", rgb_only)
    assert status == 0 and "flow:    none (RGB only)" in output and "22 frames, 0 flow pairs" in output
    info = json.loads(flowprep("info", rgb_only, "--json")[1])
    assert (info["has_flow"], info["frames"], info["flow_pairs"]) == (False, 22, 0)

    status, output = flowprep("verify", rgb_only)
    assert status == 0 and "2 videos verified, no problem" in output
    damaged = tmp_path / "damaged"
    shutil.copytree(rgb_only, damaged)
    with ShardReader(damaged) as reader:
        shard = damaged / reader.meta("b")["shard"]
        blob = bytes(reader.blobs("b", "rgb", [3])[0])
    data = bytearray(shard.read_bytes())
    data[data.find(blob) + len(blob) // 2] ^= 0xFF  # inside JPEG data: only the checksum tells
    shard.write_bytes(bytes(data))
    status, output = flowprep("verify", damaged)
    assert status == 1 and "b: stored bytes do not match the index checksum" in output

    reader = ShardReader(rgb_only)
    meta = reader.meta("a")
    assert flowprep("show", rgb_only, "a", "--out", tmp_path / "a.png")[0] == 0
    image = cv2.imread(str(tmp_path / "a.png"))[:, :, ::-1]
    assert image.shape == (64, 103, 3) == (meta["height"], meta["width"], 3)  # the frame alone, no flow panel
    np.testing.assert_array_equal(image[:40], reader.rgb("a", 6, 7)[0][:40])  # the middle frame; its label is below
    assert flowprep("show", rgb_only, "a", "--out", tmp_path / "a.mp4")[0] == 0
    with av.open(str(tmp_path / "a.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 12 and frames[0].shape == (64, 104, 3)  # every frame, padded to an even width

    dest = tmp_path / "export"
    status, output = flowprep("export", rgb_only, dest)
    assert status == 0
    assert sorted(p.name for p in dest.iterdir()) == ["rawframes", "train_list_rawframes.txt", "val_list_rawframes.txt"]
    assert sorted(p.name for p in (dest / "rawframes" / "a").iterdir()) == [f"img_{i:05d}.jpg" for i in range(1, 13)]
    assert (dest / "train_list_rawframes.txt").read_text() == "a 12 0\n"


def test_teacher_refuses_an_output_without_flow(outputs, tmp_path):
    rgb_only, _ = outputs
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")  # never read: the output is refused first
    status, output = flowprep("teacher", "--shards", rgb_only, "--name", "t", "--model", "s3dg", "--checkpoint", checkpoint)
    assert status == 2 and "--flow none" in output and "the teacher runs on flow" in output
    assert not (rgb_only / "teachers").exists()
