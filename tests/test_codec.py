"""Flow quantization and the per-frame codecs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import textured_image
from flowprep.codec import Codec, dequantize_flow, quantize_flow

CODECS = ["raw", "zstd:3", "png:1", "jpeg:95"]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return textured_image(72, 96)


# ---------------------------------------------------------------------------------------------
# quantization


@pytest.mark.parametrize("bound", [20.0, 1.5])
def test_quantize_round_trip(bound):
    rng = np.random.default_rng(1)
    flow = rng.uniform(-bound, bound, size=(32, 48, 2)).astype(np.float32)
    flow[0, 0] = (-bound, bound)  # the ends of the range
    q = quantize_flow(flow, bound)
    assert q.dtype == np.uint8 and q.shape == flow.shape
    back = dequantize_flow(q, bound)
    assert back.dtype == np.float32
    # Half a quantization step (2 * bound / 255), plus float32 rounding.
    assert np.abs(back - flow).max() <= bound / 255 + 1e-5
    assert q[0, 0].tolist() == [0, 255]
    assert back[0, 0].tolist() == pytest.approx([-bound, bound], abs=1e-5)


def test_quantize_clips_beyond_bound():
    bound = 20.0
    flow = np.array([[[-100.0, 100.0], [-20.5, 20.5], [-1e9, np.float32(1e9)]]], np.float32)
    q = quantize_flow(flow, bound)
    assert q.tolist() == [[[0, 255], [0, 255], [0, 255]]]
    assert dequantize_flow(q, bound).tolist() == [[[-20.0, 20.0]] * 3]


def test_quantize_zero_and_steps():
    bound = 20.0
    step = 2 * bound / 255
    # 0 px is 127.5 steps up: round half to even stores 128.
    assert quantize_flow(np.float32(0.0), bound) == 128
    assert quantize_flow(np.zeros((4, 4, 2), np.float32), 5.0).tolist() == [[[128, 128]] * 4] * 4
    # Level j is -bound + j * step; anything within 0.3 step of it is stored as j.
    levels = np.arange(256)
    exact = (levels * step - bound).astype(np.float32)
    assert quantize_flow(exact, bound).tolist() == levels.tolist()
    assert quantize_flow(exact + np.float32(0.3 * step), bound)[:255].tolist() == levels[:255].tolist()
    assert quantize_flow(exact - np.float32(0.3 * step), bound)[1:].tolist() == levels[1:].tolist()
    assert dequantize_flow(levels.astype(np.uint8), bound) == pytest.approx(exact, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# codecs


@pytest.mark.parametrize("spec", CODECS)
def test_rgb_round_trip(spec, photo):
    codec = Codec.parse(spec)
    blob = codec.encode(photo)
    assert isinstance(blob, bytes)
    back = codec.decode(blob, photo.shape)
    assert back.shape == photo.shape and back.dtype == np.uint8
    if codec.lossless:
        assert np.array_equal(back, photo)
    else:
        error = np.abs(back.astype(int) - photo).mean()
        assert 0 < error < 3  # lossy, but close at quality 95
        # Channel order kept (RGB in, RGB out): the per-channel means match.
        assert np.allclose(back.reshape(-1, 3).mean(0), photo.reshape(-1, 3).mean(0), atol=1.5)


def test_jpeg_keeps_channel_order():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    codec = Codec.parse("jpeg:95")
    back = codec.decode(codec.encode(red), red.shape)
    assert back[..., 0].min() > 240 and back[..., 2].max() < 15


@pytest.mark.parametrize("spec", CODECS)
def test_flow_round_trip(spec):
    rng = np.random.default_rng(2)
    # Smooth-ish quantized flow: a ramp plus noise, like real flow.
    y, x = np.mgrid[0:40, 0:56]
    flow = np.stack([x * 2 + rng.integers(0, 30, (40, 56)), 200 - y * 3], axis=-1).astype(np.uint8)
    codec = Codec.parse(spec)
    back = codec.decode(codec.encode(flow), flow.shape)
    assert back.shape == (40, 56, 2) and back.dtype == np.uint8
    if codec.lossless:
        assert np.array_equal(back, flow)
    else:
        assert np.abs(back.astype(int) - flow).mean() < 4
        # x and y planes not swapped.
        assert np.abs(back[..., 1].astype(int) - flow[..., 1]).mean() < 4


def test_png_flow_planes_stacked():
    flow = np.zeros((8, 10, 2), np.uint8)
    flow[..., 0] = 10
    flow[..., 1] = 200
    image = cv2.imdecode(np.frombuffer(Codec.parse("png").encode(flow), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (16, 10)  # x plane over y plane, one gray image
    assert (image[:8] == 10).all() and (image[8:] == 200).all()


@pytest.mark.parametrize("spec", ["zstd:3", "raw"])
def test_float16_through_byte_codecs(spec):
    rng = np.random.default_rng(3)
    flow = rng.normal(0, 5, size=(12, 20, 2)).astype(np.float16)
    codec = Codec.parse(spec)
    blob = codec.encode(flow)
    if spec == "raw":
        assert len(blob) == flow.nbytes
    back = codec.decode(blob, flow.shape, np.float16)
    assert back.dtype == np.float16
    assert np.array_equal(back, flow)


def test_zstd_compresses():
    flat = np.full((64, 64, 2), 128, np.uint8)
    assert len(Codec.parse("zstd:3").encode(flat)) < flat.nbytes // 20


@pytest.mark.parametrize("spec", ["png:1", "jpeg:95"])
def test_image_codecs_reject_float(spec):
    with pytest.raises(ValueError, match="uint8 only"):
        Codec.parse(spec).encode(np.zeros((4, 4, 2), np.float16))


def test_parse():
    assert Codec.parse("jpeg:90") == Codec("jpeg", 90)
    assert Codec.parse("jpeg") == Codec("jpeg", 95)
    assert Codec.parse("png") == Codec("png", 1)
    assert Codec.parse("zstd") == Codec("zstd", 3)
    assert Codec.parse("raw") == Codec("raw", 0)
    assert str(Codec.parse("zstd:7")) == "zstd:7" and str(Codec.parse("raw")) == "raw"
    assert Codec.parse("png:0").lossless and not Codec.parse("jpeg:100").lossless


@pytest.mark.parametrize("spec", ["webp", "JPEG:90", "lz4:1", ""])
def test_parse_unknown(spec):
    with pytest.raises(ValueError, match="unknown codec"):
        Codec.parse(spec)


def test_corrupt_jpeg(photo):
    codec = Codec.parse("jpeg:95")
    blob = codec.encode(photo)
    for bad in (b"\x00" * 100, blob[: len(blob) // 2], blob[:2] + bytes(100) + blob[102:], b""):
        with pytest.raises(ValueError, match="corrupt jpeg frame"):
            codec.decode(bad, photo.shape)


def test_corrupt_zstd_and_raw():
    flow = np.random.default_rng(4).integers(0, 256, (16, 16, 2), dtype=np.uint8)
    zstd = Codec.parse("zstd:3")
    blob = zstd.encode(flow)
    with pytest.raises(ValueError, match="corrupt zstd frame"):  # pyarrow's OSError, as every codec's
        zstd.decode(blob[: len(blob) // 2], flow.shape)
    with pytest.raises(ValueError, match="corrupt raw frame"):
        Codec.parse("raw").decode(flow.tobytes()[:-1], flow.shape)


def test_corrupt_png():
    with pytest.raises(ValueError, match="corrupt png"):
        Codec.parse("png").decode(b"garbage bytes, not an image", (8, 8, 3))
