"""VideoDecoder: timestamp resampling, resizing, rotation, trimming, codecs and broken inputs."""

from __future__ import annotations

import re
import shutil
import struct
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import index_frame, read_index, write_video
from flowprep.decode import VideoDecoder, output_size, resize_short_side
from flowprep.errors import DecodeError
from flowprep.pipeline import ExtractConfig, decode_chunks
from flowprep.samples import sample_clip
from flowprep.sources import VideoSpec


def decode(path, **kwargs) -> list[np.ndarray]:
    kwargs.setdefault("fps", 25)
    kwargs.setdefault("short_side", 64)
    with VideoDecoder(str(path)) as video:
        return list(video.frames(**kwargs))


def indices(frames) -> list[int]:
    return [read_index(f) for f in frames]


def index_video(path: Path, n: int, fps, codec: str = "libx264") -> Path:
    return write_video(path, [index_frame(i) for i in range(n)], fps=fps, codec=codec)


@pytest.fixture(scope="module")
def video30(tmp_path_factory) -> Path:
    """60 frames at 30 fps (2 s), frame i spelling i."""
    return index_video(tmp_path_factory.mktemp("v30") / "v30.mp4", 60, 30)


# ---------------------------------------------------------------------------------------------
# frame rate resampling


@pytest.mark.parametrize("src_fps, n_src", [(30, 45), (60, 60), (15, 30), (25, 20)])
def test_constant_rate_resampling(tmp_path, src_fps, n_src):
    path = index_video(tmp_path / f"v{src_fps}.mp4", n_src, src_fps)
    frames = decode(path, fps=25, short_side=64)
    # Output instants k/25 strictly before the end of the last frame (n_src / src_fps).
    expected_count = -(-n_src * 25 // src_fps)
    assert len(frames) == expected_count
    # Output k shows the source frame on screen at k/25: floor(k * src_fps / 25).
    assert indices(frames) == [k * src_fps // 25 for k in range(expected_count)]
    assert all(f.shape == (64, 128, 3) and f.dtype == np.uint8 for f in frames)


def test_output_rate_other_than_25(video30):
    frames = decode(video30, fps=10)
    assert indices(frames) == [k * 3 for k in range(20)]


def test_variable_frame_rate(tmp_path):
    # Irregular timestamps in milliseconds (exact in the stream's time base).
    ms = [0, 30, 50, 200, 210, 500, 520, 900, 1000, 1320]
    path = write_video(tmp_path / "vfr.mp4", [index_frame(i) for i in range(len(ms))], fps=1000,
                       timestamps=[t / 1000 for t in ms])
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        decoded = list(c.decode(stream))
        assert [f.pts * stream.time_base for f in decoded] == [Fraction(t, 1000) for t in ms]
        last_end = decoded[-1].pts * stream.time_base + decoded[-1].duration * stream.time_base
    frames = decode(path, fps=25)
    # Output instants k/25 before the end of the last frame's display interval.
    count = 0
    while Fraction(count, 25) < last_end:
        count += 1
    assert len(frames) == count
    assert count >= 34  # 33/25 = 1.32 s is the last frame's own timestamp
    expected = [max(i for i, t in enumerate(ms) if Fraction(t, 1000) <= Fraction(k, 25)) for k in range(count)]
    assert indices(frames) == expected
    # Spot checks against the rule, by hand: 0.04 s -> frame at 0.03; 0.48 s -> frame at 0.21; 1.32 s -> last.
    assert expected[1] == 1 and expected[12] == 4 and expected[13] == 6 and expected[33] == 9
    # Frames 2 and 3 (0.05 s and 0.2 s) are each repeated; frame 5 (0.5 s) lasts 20 ms between instants: never shown.
    assert 5 not in expected


# ---------------------------------------------------------------------------------------------
# size


@pytest.mark.parametrize(
    "hw, short, expected",
    [((272, 640), 128, (128, 301)), ((640, 272), 128, (301, 128)), ((64, 64), 32, (32, 32)),
     ((48, 32), 64, (96, 64)), ((32, 48), 64, (64, 96)), ((144, 176), 64, (64, 78))],
)
def test_output_size(hw, short, expected):
    assert output_size(*hw, short) == expected
    image = np.zeros((*hw, 3), np.uint8)
    assert resize_short_side(image, short).shape == (*expected, 3)


def test_resize_landscape_keeps_aspect(video30):
    frames = decode(video30, short_side=32, max_frames=12)
    assert {f.shape for f in frames} == {(32, 64, 3)}
    assert indices(frames) == [k * 30 // 25 for k in range(12)]


def test_resize_portrait(tmp_path):
    # A portrait 96x48 source; a white left half.
    image = np.zeros((96, 48, 3), np.uint8)
    image[:, :24] = 255
    path = write_video(tmp_path / "portrait.mp4", [image] * 3, fps=25)
    frames = decode(path, short_side=24)
    assert len(frames) == 3
    assert frames[0].shape == (48, 24, 3)
    assert frames[0][:, :10].mean() > 240 and frames[0][:, 14:].mean() < 15


def test_upscale_small_video(tmp_path):
    image = np.zeros((32, 48, 3), np.uint8)
    image[:, :12] = 255  # left quarter white
    path = write_video(tmp_path / "small.mp4", [image] * 4, fps=25)
    frames = decode(path, short_side=64)
    assert len(frames) == 4
    assert frames[0].shape == (64, 96, 3)  # upscaled x2, aspect kept
    assert frames[0][:, :20].mean() > 240 and frames[0][:, 28:].mean() < 15


# ---------------------------------------------------------------------------------------------
# rotation metadata


def marker_frame() -> np.ndarray:
    frame = np.zeros((64, 128, 3), np.uint8)
    frame[:, :32] = 255  # left quarter white
    frame[:16, 32:64, 0] = 255  # a red block at the top, next to it: makes every turn distinct
    return frame


@pytest.mark.parametrize("rotation, quarter_turns", [(90, 1), (-90, 3), (270, 3), (180, 2)])
def test_rotation(tmp_path, rotation, quarter_turns):
    source = marker_frame()
    path = write_video(tmp_path / f"rot{rotation}.mp4", [source] * 3, fps=25, rotation=rotation)
    frames = decode(path, short_side=64)
    expected = np.rot90(source, quarter_turns)  # the display matrix turns counter-clockwise
    assert len(frames) == 3
    assert frames[0].shape == expected.shape
    if quarter_turns % 2:
        assert frames[0].shape == (128, 64, 3)  # portrait
    assert np.abs(frames[0].astype(int) - expected).mean() < 5
    for wrong in {0, 1, 2, 3} - {quarter_turns}:
        other = np.rot90(source, wrong)
        if other.shape == expected.shape:
            assert np.abs(frames[0].astype(int) - other).mean() > 50


def test_rotation_90_marker_position(tmp_path):
    path = write_video(tmp_path / "rot.mp4", [marker_frame()] * 2, fps=25, rotation=90)
    frame = decode(path, short_side=64)[0]
    # A counter-clockwise quarter turn brings the left edge to the bottom.
    assert frame[-32:].mean() > 240
    assert frame[:90].mean() < 40


# ---------------------------------------------------------------------------------------------
# trim and max_frames


@pytest.mark.parametrize(
    "start, end, expected",
    [
        (0.5, 1.0, [(15 * 25 + k * 30) // 25 for k in range(13)]),  # 0.5 + k/25 < 1.0
        (1.0, None, [30 + k * 30 // 25 for k in range(25)]),
        (None, 0.4, [k * 30 // 25 for k in range(10)]),  # [0, 0.4): 10 instants
        (0.3, None, [9 + k * 30 // 25 for k in range(43)]),  # 0.3 s is frame 9 exactly
        (0.2, 1.5, [6 + k * 30 // 25 for k in range(33)]),
    ],
)
def test_trim(video30, start, end, expected):
    frames = decode(video30, start=start, end=end)
    assert indices(frames) == expected
    if start is not None:
        assert read_index(frames[0]) == round(start * 30)


def test_max_frames(video30):
    assert indices(decode(video30, max_frames=7)) == [0, 1, 2, 3, 4, 6, 7]
    assert indices(decode(video30, start=1.0, max_frames=3)) == [30, 31, 32]
    assert len(decode(video30, max_frames=1000)) == 50


def test_source_info(video30):
    with VideoDecoder(str(video30)) as video:
        assert video.info.codec == "h264"
        assert video.info.fps == 30
        assert video.info.duration == pytest.approx(2.0)
        assert (video.info.width, video.info.height) == (128, 64)


# ---------------------------------------------------------------------------------------------
# codecs and containers


@pytest.mark.parametrize(
    "codec, name, decoder",
    [("libvpx-vp9", "v.webm", "vp9"), ("mpeg4", "v.avi", "mpeg4"), ("libx265", "v.mkv", "hevc"),
     ("libsvtav1", "v.mp4", None)],
)
def test_codecs(tmp_path, codec, name, decoder):
    path = index_video(tmp_path / name, 30, 30, codec=codec)
    with VideoDecoder(str(path)) as video:
        if decoder:
            assert video.info.codec == decoder
        else:
            assert "av1" in video.info.codec or "dav1d" in video.info.codec
        frames = list(video.frames(fps=25, short_side=64))
    assert len(frames) == 25
    assert indices(frames) == [k * 30 // 25 for k in range(25)]


def test_kinetics_folder_fixture_videos(kinetics_folder):
    vp9 = decode(kinetics_folder / "val" / "counting" / "index_vp9.webm")
    assert indices(vp9) == [k * 30 // 25 for k in range(10)]
    mpeg4 = decode(kinetics_folder / "val" / "counting" / "index_mpeg4.avi")
    assert indices(mpeg4) == [k * 15 // 25 for k in range(20)]


# ---------------------------------------------------------------------------------------------
# real clips


def test_bikes(bikes):
    with VideoDecoder(str(bikes)) as video:
        assert video.info.fps == 25 and (video.info.width, video.info.height) == (640, 272)
        count = 0
        for frame in video.frames(fps=25, short_side=128):
            assert frame.shape == (128, 301, 3) and frame.dtype == np.uint8
            count += 1
    assert count == 250


def test_carphone_29_97_to_25():
    path = sample_clip("carphone_pristine.mp4")
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        sar = stream.sample_aspect_ratio
        assert sar == Fraction(128, 117)  # non-square pixels: 176x144 coded, 193x144 displayed
        source = []
        for f in c.decode(stream):
            rgb = cv2.resize(f.to_ndarray(format="rgb24"), (round(176 * sar), 144), interpolation=cv2.INTER_LINEAR)
            source.append(resize_short_side(rgb, 72))
    assert len(source) == 120
    frames = decode(path, fps=25, short_side=72)
    # 120 frames of 1001/30000 s = 4.004 s; instants k/25 < 4.004: k <= 100.
    assert len(frames) == 101
    assert frames[0].shape == (72, 97, 3)  # 193 * 72 / 144 = 96.5, rounded up; square pixels would give 88
    for k in (0, 1, 5, 6, 50, 99, 100):
        src = k * 30000 // (25 * 1001)
        assert np.array_equal(frames[k], source[src]), k
    assert not np.array_equal(frames[6], frames[5])


# ---------------------------------------------------------------------------------------------
# broken inputs


def assert_readable(error: DecodeError):
    message = str(error)
    assert message and "NoneType" not in message and "AttributeError" not in message


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError, match="file not found"):
        VideoDecoder(str(tmp_path / "absent.mp4"))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(DecodeError, match=r"empty file \(0 bytes\)"):
        VideoDecoder(str(path))


def test_text_file(tmp_path):
    path = tmp_path / "readme.mp4"
    path.write_text("this is not a video\n" * 20)
    with pytest.raises(DecodeError, match="FFmpeg cannot open it"):
        VideoDecoder(str(path))


@pytest.mark.parametrize("codec, name", [("aac", "audio.mp4"), ("mp2", "audio.mka")])
def test_audio_only(tmp_path, codec, name):
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=44100)
        fmt = stream.codec_context.format.name
        for i in range(8):
            samples = np.zeros((1, 1152), np.float32 if fmt.startswith("flt") else np.int16)
            frame = av.AudioFrame.from_ndarray(samples, format=fmt, layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1152
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as c:
        assert len(c.streams.audio) == 1 and not c.streams.video
    with pytest.raises(DecodeError, match="no video stream"):
        VideoDecoder(str(path))
    with pytest.raises(DecodeError, match="no video stream"):
        list(decode_chunks(VideoSpec("audio", str(path)), ExtractConfig(short_side=64, chunk_frames=8)))


def test_truncated_bikes(tmp_path, bikes):
    data = bikes.read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])  # the moov atom is at the end: nothing indexes the frames
    with pytest.raises(DecodeError, match="FFmpeg cannot open it") as info:
        VideoDecoder(str(path))
    assert_readable(info.value)


def top_level_boxes(data: bytes) -> dict[str, tuple[int, int]]:
    boxes, offset = {}, 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        boxes[kind.decode()] = (offset, offset + size)
        if size < 8:
            break
        offset += size
    return boxes


@pytest.fixture(scope="module")
def video40(tmp_path_factory) -> Path:
    """40 frames at 25 fps, libx264, mp4 with its moov atom after the mdat."""
    return index_video(tmp_path_factory.mktemp("v40") / "v40.mp4", 40, 25)


def test_generated_mp4_intact(video40):
    assert indices(decode(video40)) == list(range(40))


@pytest.mark.parametrize("keep", [0.5, 0.6, 0.7, 0.8])
def test_truncated_generated_mp4(tmp_path, video40, keep):
    data = video40.read_bytes()
    boxes = top_level_boxes(data)
    assert boxes["mdat"][1] == boxes["moov"][0]  # moov last: a cut loses (part of) the index
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * keep)])
    config = ExtractConfig(short_side=64, chunk_frames=8)
    with pytest.raises(DecodeError) as info:
        list(decode_chunks(VideoSpec("cut", str(path)), config))
    assert_readable(info.value)


def test_truncated_30_percent_off(tmp_path, video40):
    # Cutting the last 30% leaves a partial moov: FFmpeg opens the file and lists a video stream
    # without a codec. This used to escape as AttributeError from VideoDecoder.__init__.
    data = video40.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(DecodeError) as info:
        with VideoDecoder(str(path)) as video:
            list(video.frames())
    assert_readable(info.value)


def test_one_frame_video(tmp_path):
    path = index_video(tmp_path / "one.mp4", 1, 25)
    assert indices(decode(path)) == [0]
    with pytest.raises(DecodeError, match=r"1 frame\(s\) decoded: flow needs at least 2"):
        list(decode_chunks(VideoSpec("one", str(path)), ExtractConfig(short_side=64, chunk_frames=8)))


def test_corrupted_payload(tmp_path, video40):
    """Random bytes over the middle of the h264 payload.

    Observed: FFmpeg's h264 decoder rejects the damaged packet (avcodec_send_packet: Invalid
    data), so the frames before it come out intact and then DecodeError is raised.
    """
    data = bytearray(video40.read_bytes())
    mdat_start, mdat_end = top_level_boxes(bytes(data))["mdat"]
    middle = len(data) // 2
    assert mdat_start + 8 < middle - 200 and middle + 200 < mdat_end  # inside the frame data
    data[middle - 200 : middle + 200] = np.random.default_rng(0).integers(0, 256, 400, np.uint8).tobytes()
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(data))
    good: list[int] = []
    with pytest.raises(DecodeError) as info:
        with VideoDecoder(str(path)) as video:
            for frame in video.frames(fps=25, short_side=64):
                good.append(read_index(frame))
    match = re.fullmatch(r"decoder error after (\d+) frames: .*Invalid data.*", str(info.value))
    assert match, str(info.value)
    assert int(match.group(1)) == len(good)
    assert 0 < len(good) < 40
    assert good == list(range(len(good)))  # what came out before the damage is right
    # The pipeline reports it as a failed video, not a crash.
    with pytest.raises(DecodeError, match="decoder error after"):
        list(decode_chunks(VideoSpec("corrupt", str(path)), ExtractConfig(short_side=64, chunk_frames=8)))


def test_image_file_named_mp4(tmp_path):
    # FFmpeg probes the content, not the name: a PNG named .mp4 is a one-frame png stream, which
    # decodes but is rejected by the pipeline (flow needs two frames).
    src = tmp_path / "frame.png"
    assert cv2.imwrite(str(src), index_frame(5))
    path = tmp_path / "image.mp4"
    shutil.copy(src, path)
    with VideoDecoder(str(path)) as video:
        assert video.info.codec == "png"
        assert indices(video.frames(short_side=64)) == [5]
    with pytest.raises(DecodeError, match=r"1 frame\(s\) decoded"):
        list(decode_chunks(VideoSpec("image", str(path)), ExtractConfig(short_side=64, chunk_frames=8)))


# ---------------------------------------------------------------------------------------------
# memory


def test_decode_chunks_streams_in_bounded_memory(tmp_path):
    """A long video is never held whole: peak memory is a few chunks, not the video."""
    import tracemalloc

    n, h, w = 240, 240, 320
    path = write_video(tmp_path / "long.mp4", (np.full((h, w, 3), i % 251, np.uint8) for i in range(n)))
    config = ExtractConfig(short_side=h, chunk_frames=8, rgb_codec="raw")
    whole_video = n * h * w * 4  # RGB + gray frames
    tracemalloc.start()
    frames = sum(len(chunk.rgb) for chunk in decode_chunks(VideoSpec("long", str(path)), config))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert frames == n
    assert peak < whole_video / 10, f"peak {peak} bytes for a {whole_video}-byte video"
