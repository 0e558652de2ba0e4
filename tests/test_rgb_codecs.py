"""The RGB codecs that decode a crop alone (jpeg-rst, yuv420) and the GPU decode path's inputs."""

from __future__ import annotations

import importlib.util
import json

import cv2
import numpy as np
import pytest
import simplejpeg
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from conftest import textured_image, write_video
from flowprep import ClipDataset, ShardReader
from flowprep.cli import main
from flowprep.codec import Codec
from flowprep.dataset import I3D_NORMALIZATION
from flowprep.extract import extract
from flowprep.gpu_decode import assemble_clips, collate, decode_clips, frame_jpegs
from flowprep.jpeg import crop_jpeg
from flowprep.pipeline import ExtractConfig, OptionError

CROP_CODECS = ["jpeg-rst:95", "yuv420:lz4", "yuv420:zstd:3", "yuv420:raw"]


def random_windows(h: int, w: int, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        yield slice(y0, int(rng.integers(y0 + 1, h + 1))), slice(x0, int(rng.integers(x0 + 1, w + 1)))


@pytest.mark.parametrize("spec", CROP_CODECS)
@pytest.mark.parametrize("shape", [(256, 340), (65, 97)])  # Kinetics' usual frame; odd sides, a partial MCU
def test_a_window_decodes_exactly_as_the_whole_frame_cut(spec, shape):
    codec = Codec.parse(spec)
    image = textured_image(*shape)
    blob = codec.encode(image)
    whole = codec.decode(blob, image.shape)
    assert whole.shape == image.shape and whole.dtype == np.uint8
    assert 0 < np.abs(whole.astype(int) - image).mean() < 1.5  # lossy (4:2:0), but close
    for window in [*random_windows(*shape, 30), (slice(0, shape[0]), slice(0, shape[1])), (slice(1, 2), slice(shape[1] - 1, shape[1]))]:
        assert np.array_equal(codec.decode(blob, image.shape, window=window), whole[window]), window


def test_jpeg_rst_is_a_plain_jpeg_with_the_same_pixels():
    image = textured_image(256, 340)
    plain, rst = (Codec.parse(spec).encode(image) for spec in ("jpeg:95", "jpeg-rst:95"))
    assert rst.count(b"\xff\xdd") == 1 and plain.count(b"\xff\xdd") == 0  # a restart interval, in the header
    assert len(plain) < len(rst) < 1.1 * len(plain)
    # Restart markers change how the data is cut, not what it decodes to, in any decoder.
    assert np.array_equal(cv2.imdecode(np.frombuffer(rst, np.uint8), 1), cv2.imdecode(np.frombuffer(plain, np.uint8), 1))


def test_crop_jpeg_cuts_a_smaller_valid_jpeg():
    image = textured_image(256, 340)
    blob = Codec.parse("jpeg-rst:95").encode(image)
    jpeg, inside = crop_jpeg(blob, (slice(20, 244), slice(50, 274)))
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    assert height <= 256 and width < 340 and len(jpeg) < len(blob)
    assert inside[0].stop - inside[0].start == 224 and inside[1].stop - inside[1].start == 224
    # A JPEG without restart markers cannot be cut: the frame itself comes back.
    plain = Codec.parse("jpeg:95").encode(image)
    assert bytes(crop_jpeg(plain, (slice(20, 244), slice(50, 274)))[0]) == plain


def test_damaged_crop_frames_are_errors():
    image = textured_image(64, 96)
    rst = Codec.parse("jpeg-rst:95").encode(image)
    marker = rst.index(b"\xff\xd1")
    with pytest.raises(ValueError, match="corrupt jpeg-rst frame: .*restart markers"):
        Codec.parse("jpeg-rst:95").decode(rst[:marker] + rst[marker + 2 :], image.shape, window=(slice(0, 32), slice(0, 32)))
    for spec in ("yuv420:lz4", "yuv420:raw"):
        codec = Codec.parse(spec)
        blob = codec.encode(image)
        for bad in (blob[: len(blob) - 1], blob[:3], b""):
            with pytest.raises(ValueError, match="corrupt yuv420 frame"):
                codec.decode(bad, image.shape)
        for other in ((64, 94, 3), (62, 96, 3)):  # never a frame of another shape
            with pytest.raises(ValueError, match="corrupt yuv420 frame"):
                codec.decode(blob, other)


def test_parse_crop_codecs():
    assert Codec.parse("yuv420:lz4") == Codec("yuv420", 0, "lz4")
    assert Codec.parse("yuv420:zstd") == Codec("yuv420", 3, "zstd")
    assert str(Codec.parse("yuv420:zstd:9")) == "yuv420:zstd:9" and str(Codec.parse("jpeg-rst")) == "jpeg-rst:95"
    assert not Codec.parse("yuv420:raw").lossless
    for bad in ("yuv420", "yuv420:gzip", "yuv420:lz4:3", "yuv420:zstd:40", "jpeg-rst:0"):
        with pytest.raises(ValueError, match="codec"):
            Codec.parse(bad)
    with pytest.raises(ValueError, match="RGB frames"):
        Codec.parse("yuv420:lz4").encode(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(OptionError, match="RGB frames only"):
        ExtractConfig(flow_codec="jpeg-rst:95")


# ---------------------------------------------------------------------------------------------
# through extract, the reader and the commands


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec-src")
    image = textured_image(96, 130)
    write_video(root / "train" / "pan" / "a.mp4", [np.roll(image, 3 * i, axis=1) for i in range(10)])
    return root


def run(source, out, **options):
    config = ExtractConfig(short_side=96, chunk_frames=4, flow_params={"nscales": 1, "warps": 1}, **options)
    assert extract(source, out, config, workers=0, progress=False).written == 1
    return out


@pytest.mark.parametrize("spec,fmt", [("jpeg-rst:95", "arrow"), ("yuv420:lz4", "hdf5"), ("yuv420:zstd:3", "arrow")])
def test_extract_read_and_commands(source, tmp_path, spec, fmt):
    out = run(source, tmp_path / "out", rgb_codec=spec, format=fmt)
    assert json.loads((out / "dataset.json").read_text())["params"]["rgb_codec"] == spec
    reader = ShardReader(out)
    rgb = reader.rgb("a")  # [T, H, W, 3]
    window = (slice(5, 85), slice(17, 97))
    assert np.array_equal(reader.rgb_at("a", [3, 1, 3], window), rgb[[3, 1, 3]][:, 5:85, 17:97])
    assert np.array_equal(reader.rgb_at("a", [2, 4], window, planar=True), rgb[[2, 4]][:, 5:85, 17:97].transpose(3, 0, 1, 2))
    item = ClipDataset(out, ("rgb", "flow"), clip_len=4, crop=80, normalize=False)[0]
    (y, x), flip, start = item["crop"], item["flip"], item["start"]
    expected = rgb[start : start + 4, y : y + 80, x : x + 80]
    assert torch.equal(item["rgb"], torch.from_numpy((expected[:, :, ::-1] if flip else expected).transpose(3, 0, 1, 2).copy()))
    for command in (["verify", out], ["info", out], ["show", out, "a", "--out", tmp_path / "a.png"],
                    ["export", out, tmp_path / "rawframes"]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 0, (command, result.output, result.exception)
    assert len(list((tmp_path / "rawframes" / "rawframes" / "a").glob("img_*.jpg"))) == len(rgb)


@pytest.fixture(scope="module")
def rst_out(source, tmp_path_factory):
    return run(source, tmp_path_factory.mktemp("rst") / "out", rgb_codec="jpeg-rst:95")


@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_decode_inputs_give_the_cpu_clip(rst_out, normalize):
    """decode='gpu' items, decoded here by libjpeg-turbo and assembled as on the GPU, are exactly
    the decode='cpu' items: same crop, flip and normalization."""
    cpu = ClipDataset(rst_out, clip_len=6, crop=80, normalize=normalize)
    gpu = ClipDataset(rst_out, clip_len=6, crop=80, normalize=normalize, decode="gpu")
    items = [gpu[(0, epoch)] for epoch in range(4)]
    assert {item["flip"] for item in items} == {False, True}  # both ways are exercised
    batch = next(iter(DataLoader(items, batch_size=4, collate_fn=collate)))
    jpegs = frame_jpegs(batch)
    assert len(jpegs) == 4 * 6 and all(len(jpeg) < 96 * 96 for jpeg in jpegs)  # cut to the crop's MCUs
    images = [torch.from_numpy(simplejpeg.decode_jpeg(j.numpy(), "RGB")).permute(2, 0, 1) for j in jpegs]
    rgb = assemble_clips(images, batch, I3D_NORMALIZATION if normalize else None)
    expected = torch.stack([cpu[(0, epoch)]["rgb"] for epoch in range(4)])
    assert rgb.shape == (4, 3, 6, 80, 80)
    if normalize:
        torch.testing.assert_close(rgb, expected, rtol=0, atol=1e-6)
    else:
        assert torch.equal(rgb, expected)


def test_gpu_decode_needs_jpeg_and_says_when_nvjpeg_is_missing(rst_out, source, tmp_path):
    yuv = run(source, tmp_path / "yuv", rgb_codec="yuv420:raw")
    with pytest.raises(ValueError, match="decode='gpu' decodes JPEG frames"):
        ClipDataset(yuv, clip_len=4, crop=80, decode="gpu")
    batch = collate([ClipDataset(rst_out, clip_len=4, crop=80, decode="gpu")[0]])
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match="decode='gpu' decodes with torchvision.io.decode_jpeg"):
            decode_clips(batch, "cpu")
    else:  # torchvision's own decoder, on the CPU here: within a level or two of libjpeg-turbo's
        cpu = ClipDataset(rst_out, clip_len=4, crop=80, normalize=False)[0]["rgb"]
        assert (decode_clips(batch, "cpu", normalize=False)[0].int() - cpu.int()).abs().max() <= 2


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("torchvision")), reason="needs CUDA and torchvision (nvJPEG)")
def test_nvjpeg_matches_the_cpu_clip(rst_out):
    cpu = ClipDataset(rst_out, clip_len=6, crop=80, normalize=False)
    gpu = ClipDataset(rst_out, clip_len=6, crop=80, normalize=False, decode="gpu")
    batch = collate([gpu[(0, epoch)] for epoch in range(4)])
    rgb = decode_clips(batch, "cuda", normalize=False).cpu()
    expected = torch.stack([cpu[(0, epoch)]["rgb"] for epoch in range(4)])
    assert (rgb.int() - expected.int()).abs().max() <= 2
