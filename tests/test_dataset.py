"""ClipDataset, ClipSampler, verify, show and export on real shard folders."""

from __future__ import annotations

import shutil
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flowprep import ClipDataset, ClipSampler, ShardReader
from flowprep.dataset import KINETICS_NORMALIZATION, clip_indices
from flowprep.export import export_rawframes
from flowprep.extract import extract
from flowprep.pipeline import ExtractConfig
from flowprep.shards.layout import complete_shards
from flowprep.shards.verify import verify
from flowprep.visualize import flow_to_color, show

from conftest import textured_image, write_video

CROP, T = 40, 6


@pytest.fixture(scope="module", params=["arrow", "hdf5"])
def shards(request, tmp_path_factory):
    """An output folder: three videos panning right (2 px a frame at 96 rows, 4/3 px stored) and a short one."""
    root = tmp_path_factory.mktemp("src")
    image = textured_image(96, 160)
    for split, name, n in (("train", "pan_a", 20), ("train", "pan_b", 16), ("val", "pan_c", 14), ("train", "short", 5)):
        write_video(root / split / "pan" / f"{name}.mp4", [np.roll(image, 2 * i, axis=1) for i in range(n)])
    out = tmp_path_factory.mktemp("out") / request.param
    config = ExtractConfig(short_side=64, chunk_frames=4, format=request.param, shard_size=30_000)
    assert extract(root, out, config, workers=0, progress=False).written == 4
    return out


def dataset(shards, **options) -> ClipDataset:
    return ClipDataset(shards, **{"modalities": ("rgb", "flow"), "clip_len": T, "crop": CROP, **options})


def test_items_have_the_documented_shapes_types_and_ranges(shards):
    ds = dataset(shards)
    assert len(ds) == 4
    item = ds[0]
    assert set(item) == {"rgb", "flow", "label", "video_id", "start", "crop", "flip"}
    assert item["rgb"].dtype == item["flow"].dtype == torch.float32
    assert item["rgb"].shape == (3, T, CROP, CROP) and item["flow"].shape == (2, T, CROP, CROP)
    assert -1 <= item["rgb"].min() and item["rgb"].max() <= 1 and -1 <= item["flow"].min() and item["flow"].max() <= 1
    assert item["label"] == 0 and isinstance(item["flip"], bool)
    assert "flow" not in dataset(shards, modalities=("rgb",))[0] and "rgb" not in dataset(shards, modalities=("flow",))[0]
    assert len(dataset(shards, split="val")) == 1
    assert ds.labels == [0, 0, 0, 0] and dataset(shards, train=False, num_clips=2).labels == [0] * 8


def test_rgb_values_follow_the_normalization(shards):
    i3d, kinetics = dataset(shards, train=False), dataset(shards, train=False, normalization=KINETICS_NORMALIZATION)
    a, b = i3d[0]["rgb"], kinetics[0]["rgb"]
    pixels = (a + 1) / 2  # back to [0, 1]
    mean, std = (torch.tensor(v).view(3, 1, 1, 1) for v in KINETICS_NORMALIZATION)
    torch.testing.assert_close(b, (pixels - mean) / std, atol=1e-4, rtol=1e-4)


def test_unnormalized_items_are_the_stored_uint8(shards):
    floats, raw = dataset(shards, flip=True), dataset(shards, flip=True, normalize=False)
    flips = set()
    for k in range(12):
        a, b = floats[(k % 4, k)], raw[(k % 4, k)]
        assert b["rgb"].dtype == b["flow"].dtype == torch.uint8 and a["flip"] == b["flip"]
        flips.add(b["flip"])
        torch.testing.assert_close(b["rgb"].float() / 127.5 - 1, a["rgb"], atol=1e-6, rtol=0)
        # flipped x comes as 255 - q, whose q / 127.5 - 1 is exactly the negated flow
        torch.testing.assert_close(b["flow"].float() / 127.5 - 1, a["flow"], atol=1e-6, rtol=0)
    assert flips == {True, False}


def test_flip_mirrors_rgb_and_negates_flow_x(shards):
    plain, flipping = dataset(shards, flip=False), dataset(shards, flip=True)
    flipped = [k for k in range(12) if flipping[(k % 4, k)]["flip"]]
    kept = [k for k in range(12) if not flipping[(k % 4, k)]["flip"]]
    assert flipped and kept
    for k in flipped:
        a, b = plain[(k % 4, k)], flipping[(k % 4, k)]
        assert a["start"] == b["start"] and not a["flip"]
        torch.testing.assert_close(b["rgb"], a["rgb"].flip(-1))
        torch.testing.assert_close(b["flow"][0], -a["flow"][0].flip(-1))
        torch.testing.assert_close(b["flow"][1], a["flow"][1].flip(-1))
        # The scene pans right: flow x is positive, and negative in the mirrored clip.
        centre = (slice(None), slice(8, -8), slice(8, -8))
        assert a["flow"][0][centre].mean() > 0.02 and b["flow"][0][centre].mean() < -0.02


def test_items_out_of_range_are_index_errors(shards):
    ds = dataset(shards, train=False, num_clips=2)
    for key, index in ((-1, -1), (8, 8), ((8, 0), 8)):  # (index, epoch) as ClipSampler passes it
        with pytest.raises(IndexError, match=rf"item {index} is out of range: this ClipDataset has 8 items"):
            ds[key]
    assert [item["start"] for item in ds] == [ds[i]["start"] for i in range(8)]  # iteration ends at the last item


def test_crops_cut_rgb_and_flow_at_the_same_place(shards):
    ds = dataset(shards, flip=False)
    reader = ShardReader(shards)
    for k in range(6):
        item = ds[(k % 4, k)]
        meta = reader.meta(item["video_id"])
        frames = clip_indices(meta["num_frames"] - 1, T, 1, item["start"])
        rgb = reader.rgb_at(item["video_id"], frames).astype(np.float32) / 127.5 - 1
        flow = reader.flow_at(item["video_id"], frames, raw=True).astype(np.float32) / 127.5 - 1
        found = [(y, x) for y in range(rgb.shape[1] - CROP + 1) for x in range(rgb.shape[2] - CROP + 1)
                 if np.allclose(rgb[0, y : y + CROP, x : x + CROP, 0], item["rgb"][0, 0].numpy(), atol=1e-5)]
        assert found
        y, x = found[0]
        np.testing.assert_allclose(item["flow"].numpy(), flow[:, y : y + CROP, x : x + CROP].transpose(3, 0, 1, 2), atol=1e-6)


def test_evaluation_clips_are_centred_and_uniform(shards):
    ds = dataset(shards, train=False)
    meta = ds.meta(0)
    room = meta["num_frames"] - 1 - T
    item = ds[0]
    assert (item["start"], item["flip"]) == (room // 2, False)
    assert all(ds[0]["start"] == item["start"] for _ in range(2))
    three = dataset(shards, train=False, num_clips=3)
    assert len(three) == 12
    assert [three[i]["start"] for i in range(3)] == [0, round(room / 2), room]


def test_evaluation_crops_spread_along_the_long_side(small_shards):
    common = dict(modalities=("rgb",), clip_len=8, crop=112, train=False, split="train", normalize=False)
    one = ClipDataset(small_shards, **common)
    many = ClipDataset(small_shards, num_clips=2, num_crops=3, **common)
    assert (len(one), len(many), many.views_per_video) == (4, 24, 6)
    video_id = one[0]["video_id"]
    meta = ShardReader(small_shards).meta(video_id)
    height, width, room = meta["height"], meta["width"], meta["num_frames"] - 8
    assert height == 112 and width > height
    views = [many[i] for i in range(6)]  # the first video's: clip by clip, crops within a clip
    assert {v["video_id"] for v in views} == {video_id} and many[6]["video_id"] != video_id
    ends = [(0, 0), (0, (width - 112) // 2), (0, width - 112)]
    assert [v["crop"] for v in views] == ends * 2 and [v["start"] for v in views] == [0] * 3 + [room] * 3
    # one crop is the centre crop and one clip the centre clip, as before num_crops
    assert (one[0]["crop"], one[0]["start"]) == (ends[1], room // 2)
    frames = ShardReader(small_shards).rgb(video_id, room, room + 8)  # [T, H, W, 3] uint8
    assert torch.equal(views[5]["rgb"], torch.from_numpy(frames[:, :, width - 112 :]).permute(3, 0, 1, 2))
    with pytest.raises(ValueError, match="num_crops must be 1"):
        ClipDataset(small_shards, train=False, num_crops=3, teacher="t")


def test_same_seed_same_clips_and_epochs_differ(shards):
    a, b, c = dataset(shards, seed=7), dataset(shards, seed=7), dataset(shards, seed=8)

    def draws(ds, epoch):
        return [(ds[(i, epoch)]["start"], ds[(i, epoch)]["flip"], ds[(i, epoch)]["rgb"].sum().item()) for i in range(4)]

    assert draws(a, 0) == draws(b, 0)
    assert draws(a, 0) != draws(c, 0)
    assert draws(a, 0) != draws(a, 1)


def test_a_video_shorter_than_the_clip_is_looped(shards):
    ds = dataset(shards, clip_len=12, train=False)
    index = [v for _, v in ds.videos].index("short")
    item = ds[index]
    reader = ShardReader(shards)
    positions = reader.meta("short")["num_frames"] - 1  # 4 flows
    frames = clip_indices(positions, 12, 1, item["start"])
    assert list(frames) == [0, 1, 2, 3] * 3
    meta = reader.meta("short")
    y, x = (meta["height"] - CROP) // 2, (meta["width"] - CROP) // 2
    expected = reader.rgb_at("short", frames)[:, y : y + CROP, x : x + CROP].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(item["rgb"].numpy(), expected.transpose(3, 0, 1, 2), atol=1e-5)


@pytest.mark.parametrize("size,replicas", [(10, 3), (4, 4), (7, 2), (3, 5)])
def test_sampler_splits_disjoint_complete_and_equal(size, replicas):
    data = list(range(size))
    ranks = [list(ClipSampler(data, replicas, r, seed=3)) for r in range(replicas)]
    lengths = {len(r) for r in ranks}
    assert lengths == {-(-size // replicas)}
    assert all(epoch == 0 for r in ranks for _, epoch in r)
    # position p of the epoch's order goes to rank p % replicas; the first `size` positions are every item once
    order = [ranks[p % replicas][p // replicas][0] for p in range(size)]
    assert sorted(order) == data
    assert [list(ClipSampler(data, replicas, r, seed=3)) for r in range(replicas)] == ranks
    dropped = [list(ClipSampler(data, replicas, r, seed=3, drop_last=True)) for r in range(replicas)]
    assert {len(r) for r in dropped} == {size // replicas}
    flat = [i for r in dropped for i, _ in r]
    assert len(flat) == len(set(flat))
    batches = {len(DataLoader(data, batch_size=2, sampler=ClipSampler(data, replicas, r))) for r in range(replicas)}
    assert len(batches) == 1


def test_sampler_order_depends_on_seed_and_epoch():
    sampler = ClipSampler(list(range(50)), 1, 0, seed=0)
    first = [i for i, _ in sampler]
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == list(range(50)) and [i for i, _ in second] != first and second[0][1] == 1
    assert [i for i, _ in ClipSampler(list(range(50)), 1, 0, seed=0)] == first
    assert [i for i, _ in ClipSampler(list(range(50)), 1, 0, shuffle=False)] == list(range(50))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(shards, context):
    ds = dataset(shards)
    expected = [ds[(i, 0)] for i in range(len(ds))]  # opens files in this process before the workers start
    loader = DataLoader(ds, batch_size=2, sampler=ClipSampler(ds, 1, 0, shuffle=False), num_workers=2,
                        multiprocessing_context=context, persistent_workers=True)
    for _ in range(2):  # a second epoch on the same (persistent) workers
        batches = list(loader)
    assert [v for b in batches for v in b["video_id"]] == [e["video_id"] for e in expected]
    torch.testing.assert_close(torch.cat([b["rgb"] for b in batches]), torch.stack([e["rgb"] for e in expected]))
    torch.testing.assert_close(torch.cat([b["flow"] for b in batches]), torch.stack([e["flow"] for e in expected]))


def test_verify_passes_a_whole_output_and_catches_truncation_and_bit_flips(shards, tmp_path):
    assert verify(shards) == []
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    first, second = (broken / s for s in complete_shards(broken)[:2])
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    data = bytearray(second.read_bytes())
    reader = ShardReader(broken)
    video = next(v for v in reader.video_ids if reader.meta(v)["shard"] == complete_shards(broken)[1])
    blob = bytes(reader.blobs(video, "rgb", [1])[0])
    reader.close()  # HDF5 shares a file open in this process: let go of it before changing it
    at = data.find(blob) + len(blob) // 2  # flip a bit inside a stored JPEG frame
    data[at] ^= 0x10
    second.write_bytes(bytes(data))
    problems = verify(broken)
    assert any(first.name in p for p in problems)
    assert any(second.name in p and video in p and "checksum" in p for p in problems)
    result = subprocess.run([sys.executable, "-m", "flowprep.cli", "verify", str(broken)], capture_output=True, text=True)
    assert result.returncode == 1 and first.name in result.stdout
    with pytest.raises(OSError, match=first.name):
        ShardReader(broken).rgb(next(v for v in reader.video_ids if reader.meta(v)["shard"] == complete_shards(broken)[0]))
    good = subprocess.run([sys.executable, "-m", "flowprep.cli", "verify", str(shards)], capture_output=True, text=True)
    assert good.returncode == 0 and "no problem" in good.stdout


def test_export_rawframes_round_trip(shards, tmp_path):
    counts = export_rawframes(shards, tmp_path / "raw")
    reader = ShardReader(shards)
    assert counts == {"train": 3, "val": 1}
    lines = (tmp_path / "raw" / "train_list_rawframes.txt").read_text().splitlines()
    assert lines[0] == f"pan_a {reader.meta('pan_a')['num_frames']} 0"
    flow_lines = (tmp_path / "raw" / "val_list_rawframes_flow.txt").read_text().splitlines()
    assert flow_lines == [f"pan_c {reader.meta('pan_c')['num_frames'] - 1} 0"]
    folder = tmp_path / "raw" / "rawframes" / "pan_a"
    n = reader.meta("pan_a")["num_frames"]
    assert len(list(folder.glob("img_*.jpg"))) == n and len(list(folder.glob("flow_x_*.jpg"))) == n - 1
    rgb, flow = reader.rgb("pan_a"), reader.flow("pan_a", raw=True)
    for i in (0, n // 2, n - 2):
        image = cv2.cvtColor(cv2.imread(str(folder / f"img_{i + 1:05d}.jpg")), cv2.COLOR_BGR2RGB)
        assert np.abs(image.astype(int) - rgb[i]).mean() < 3
        fx = cv2.imread(str(folder / f"flow_x_{i + 1:05d}.jpg"), cv2.IMREAD_GRAYSCALE)
        fy = cv2.imread(str(folder / f"flow_y_{i + 1:05d}.jpg"), cv2.IMREAD_GRAYSCALE)
        assert np.abs(fx.astype(int) - flow[i, ..., 0]).mean() < 2 and np.abs(fy.astype(int) - flow[i, ..., 1]).mean() < 2


def test_color_wheel_directions():
    scale = 4.0
    def color(u, v):
        return flow_to_color(np.array([[[u, v]]], np.float32), scale)[0, 0].astype(int)

    assert list(color(0, 0)) == [255, 255, 255]  # no motion: white
    r, g, b = color(scale, 0)  # right: red
    assert r == 255 and g < 80 and b < 80
    r, g, b = color(-scale, 0)  # left: cyan
    assert r < 80 and g > 150 and b > 150
    assert (color(scale / 4, 0) > color(scale, 0)).all() or color(scale / 4, 0).sum() > color(scale, 0).sum()  # paler when slower


def test_show_writes_png_and_mp4(shards, tmp_path):
    reader = ShardReader(shards)
    meta = reader.meta("pan_a")
    png = show(shards, "pan_a", tmp_path / "a.png", frame=3, scale=2.0)
    image = cv2.imread(str(png))
    assert image.shape == (meta["height"], 2 * meta["width"], 3)
    flow_half = image[8:-16, meta["width"] + 8 : -8]
    assert flow_half.mean() < 250  # coloured, not white: the scene moves
    mp4 = show(shards, "pan_a", tmp_path / "a.mp4")
    with av.open(str(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == meta["num_frames"] - 1
    result = subprocess.run([sys.executable, "-m", "flowprep.cli", "show", str(shards), "pan_a", "--out", str(tmp_path / "b.png")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and (tmp_path / "b.png").is_file()
