"""The OpenCV TV-L1 backend on known motion, and the decode -> chunk -> flow pipeline stages."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import index_frame, read_index, textured_image, write_video
from flowprep.codec import Codec, dequantize_flow
from flowprep.errors import FlowError
from flowprep.flow import get_backend, parse_flow_params, resolve_backend_name
from flowprep.flow.opencv import TVL1_DEFAULTS, tvl1_params
from flowprep.pipeline import ExtractConfig, decode_chunks, flow_chunk, video_chunks
from flowprep.sources import VideoSpec

H, W = 96, 128
BORDER = 12
# Cheap solver settings for tests that check structure, not accuracy.
FAST = {"nscales": 1, "warps": 1, "inner_iterations": 2, "outer_iterations": 1}


def shifted(gray: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``gray`` with its content moved by (dx, dy) pixels (x right, y down)."""
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(gray, matrix, (gray.shape[1], gray.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A gray real photo, larger than the crop so that shifting brings real content in."""
    gray = cv2.cvtColor(textured_image(272, 640), cv2.COLOR_RGB2GRAY)
    assert gray[20 : 20 + H, 280 : 280 + W].std() > 30  # the crop is textured
    return gray


def crop(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[20 : 20 + H, 280 : 280 + W])


def test_tvl1_known_translation(scene):
    # Frame 1: content moved by an integer (+2, -1) (np.roll: right 2, up 1).
    # Frame 2: frame 1 moved again by a sub-pixel (+1.5, +0.5).
    frame0 = crop(scene)
    rolled = np.roll(scene, shift=(-1, 2), axis=(0, 1))
    frame1 = crop(rolled)
    frame2 = crop(shifted(rolled, 1.5, 0.5))
    backend = get_backend("opencv")
    assert backend.name == "opencv" and backend.device == "cpu"
    flow = backend.compute(np.stack([frame0, frame1, frame2]))
    assert flow.shape == (2, H, W, 2) and flow.dtype == np.float32
    inner = flow[:, BORDER:-BORDER, BORDER:-BORDER]
    mean = inner.mean(axis=(1, 2))
    # Flow t carries frame t to t + 1; channel 0 is x (right), channel 1 is y (down).
    assert mean[0] == pytest.approx([2.0, -1.0], abs=0.25)
    assert mean[1] == pytest.approx([1.5, 0.5], abs=0.25)
    # Most of the interior agrees, not only the mean.
    assert np.median(np.abs(inner[0] - [2.0, -1.0])) < 0.1


def test_tvl1_static_pair_is_zero(scene):
    frame = crop(scene)
    flow = get_backend("opencv", FAST).compute(np.stack([frame, frame]))
    assert flow.shape == (1, H, W, 2)
    assert np.abs(flow).max() < 0.05


def test_tvl1_too_few_frames_and_bad_input(scene):
    backend = get_backend("opencv", FAST)
    assert backend.compute(crop(scene)[None]).shape == (0, H, W, 2)
    with pytest.raises(FlowError, match="uint8 gray"):
        backend.compute(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(FlowError, match="uint8 gray"):
        backend.compute(np.zeros((2, 8, 8), np.float32))


def test_backend_params():
    backend = get_backend("opencv", {"tau": 0.2, "warps": 3})
    assert backend.params["tau"] == 0.2 and backend.params["warps"] == 3
    assert backend.params["lambda"] == TVL1_DEFAULTS["lambda"]
    assert list(backend.params) == list(TVL1_DEFAULTS)  # every parameter recorded, in order
    # Values take the type of the default: an int-valued float for warps becomes int.
    assert tvl1_params({"warps": 4.0, "tau": 1}) == {**TVL1_DEFAULTS, "warps": 4, "tau": 1.0}
    assert type(tvl1_params({"tau": 1})["tau"]) is float


def test_unknown_params_and_backends():
    with pytest.raises(ValueError, match="unknown TV-L1 parameters.*alpha"):
        get_backend("opencv", {"alpha": 1.0})
    with pytest.raises(ValueError, match="unknown flow backend"):
        get_backend("raft")
    assert resolve_backend_name("auto") == "opencv"
    assert resolve_backend_name("opencv") == "opencv"


def test_parse_flow_params():
    params = parse_flow_params("tau=0.25,warps=5,x=a")
    assert params == {"tau": 0.25, "warps": 5, "x": "a"}
    assert type(params["tau"]) is float and type(params["warps"]) is int and type(params["x"]) is str
    assert parse_flow_params(" lambda = 0.1 ,") == {"lambda": 0.1}
    assert parse_flow_params(None) == {} and parse_flow_params("") == {}
    with pytest.raises(ValueError, match="not key=value"):
        parse_flow_params("tau")


# ---------------------------------------------------------------------------------------------
# pipeline stages


@pytest.fixture(scope="module")
def video20(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("v20") / "v20.mp4", [index_frame(i) for i in range(20)], fps=25)


def test_decode_chunks(video20):
    config = ExtractConfig(short_side=64, chunk_frames=8, rgb_codec="png:1")
    chunks = list(decode_chunks(VideoSpec("v20", str(video20)), config))
    assert [c.start for c in chunks] == [0, 8, 16]
    assert [len(c.rgb) for c in chunks] == [8, 8, 4]
    # Each chunk but the last decodes one frame more for its last flow pair.
    assert [len(c.gray) for c in chunks] == [9, 9, 4]
    assert [c.last for c in chunks] == [False, False, True]
    assert all((c.video_id, c.height, c.width, c.flow) == ("v20", 64, 128, None) for c in chunks)
    assert chunks[0].source.codec == "h264" and chunks[0].source.fps == 25
    codec = Codec.parse("png:1")
    shown = [read_index(codec.decode(b, (64, 128, 3))) for c in chunks for b in c.rgb]
    assert shown == list(range(20))
    # The overlap frame is the next chunk's first.
    assert np.array_equal(chunks[0].gray[-1], chunks[1].gray[0])
    assert np.array_equal(chunks[1].gray[-1], chunks[2].gray[0])
    assert chunks[0].gray.dtype == np.uint8 and chunks[0].gray.shape[1:] == (64, 128)


def test_flow_chunks(video20):
    config = ExtractConfig(short_side=64, chunk_frames=8, flow_params=FAST)
    backend = get_backend("opencv", config.flow_params)
    chunks = list(video_chunks(VideoSpec("v20", str(video20)), config, backend))
    assert [c.start for c in chunks] == [0, 8, 16]
    assert [len(c.rgb) for c in chunks] == [8, 8, 4]
    assert [len(c.flow) for c in chunks] == [8, 8, 3]  # N - 1 = 19 flows in all
    assert [c.last for c in chunks] == [False, False, True]
    assert all(c.gray is None for c in chunks)
    codec = Codec.parse(config.flow_codec)
    flow = codec.decode(chunks[2].flow[0], (64, 128, 2))
    assert flow.dtype == np.uint8 and flow.shape == (64, 128, 2)
    assert np.isfinite(dequantize_flow(flow, config.flow_bound)).all()


def test_flow_chunk_float16(video20):
    config = ExtractConfig(short_side=64, chunk_frames=8, max_frames=3, flow_dtype="float16", flow_params=FAST)
    (chunk,) = decode_chunks(VideoSpec("v20", str(video20)), config)
    assert chunk.last and len(chunk.rgb) == 3
    done = flow_chunk(chunk, get_backend("opencv", FAST), config)
    assert len(done.flow) == 2 and done.gray is None
    flow = Codec.parse("zstd:3").decode(done.flow[1], (64, 128, 2), np.float16)
    assert flow.dtype == np.float16 and np.isfinite(flow).all()


def test_extract_config_validation():
    with pytest.raises(ValueError, match="float16 flow needs"):
        ExtractConfig(flow_dtype="float16", flow_codec="png:1")
    with pytest.raises(ValueError, match="flow dtype"):
        ExtractConfig(flow_dtype="int8")
    with pytest.raises(ValueError, match="positive"):
        ExtractConfig(chunk_frames=0)
    with pytest.raises(ValueError, match="unknown codec"):
        ExtractConfig(rgb_codec="webp")
