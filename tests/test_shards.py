"""The writer, the reader and the output folder's rules, through ``extract`` in this process (no Ray)."""

from __future__ import annotations

import hashlib
import json
import threading

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowprep import ShardReader
from flowprep.codec import quantize_flow
from flowprep.decode import VideoDecoder
from flowprep.extract import OutputMismatch, extract, local_video_chunks, read_plan
from flowprep.flow import get_backend
from flowprep.pipeline import ExtractConfig
from flowprep.shards.layout import complete_shards, index_part, leftovers
from flowprep.shards.plan import ShardPlan
from flowprep.shards.writer import commit_shard, write_shard
from flowprep.sources import find_videos
from flowprep.storage import storage

from conftest import index_frame, textured_image, write_video

SMALL = dict(short_side=48, max_frames=12, chunk_frames=5)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """Three short videos in class folders: two moving textures and one counting video."""
    root = tmp_path_factory.mktemp("small")
    image = textured_image(96, 160)
    write_video(root / "pan" / "pan_right.mp4", [np.roll(image, 2 * i, axis=1) for i in range(14)], fps=25)
    write_video(root / "pan" / "pan_down.mkv", [np.roll(image, i, axis=0) for i in range(9)], fps=30)
    write_video(root / "count" / "counter.mp4", [index_frame(i) for i in range(11)], fps=25)
    return root


def run(src, out, **options):
    fmt = options.pop("format", "arrow")
    return extract(src, out, ExtractConfig(**{**SMALL, "format": fmt, **options}), workers=0, progress=False)


@pytest.mark.parametrize("fmt", ["arrow", "hdf5"])
def test_reads_back_exactly_what_was_written(small_folder, tmp_path, fmt):
    out = tmp_path / "out"
    report = run(small_folder, out, format=fmt, rgb_codec="png:1")
    assert report.written == 3 and report.failed == 0
    reader = ShardReader(out)
    backend = get_backend("opencv")
    for video_id in reader.video_ids:
        meta = reader.meta(video_id)
        with VideoDecoder(meta["source"]) as video:
            frames = np.stack(list(video.frames(25, SMALL["short_side"], max_frames=SMALL["max_frames"])))
        rgb = reader.rgb(video_id)
        assert rgb.dtype == np.uint8 and rgb.shape == frames.shape == (meta["num_frames"], meta["height"], meta["width"], 3)
        np.testing.assert_array_equal(rgb, frames)  # png is lossless
        gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
        flow_raw = reader.flow(video_id, raw=True)
        assert flow_raw.dtype == np.uint8 and flow_raw.shape == (meta["num_frames"] - 1, meta["height"], meta["width"], 2)
        # Chunking must not change a pair's flow: the whole video solved at once gives the same bytes.
        np.testing.assert_array_equal(flow_raw, quantize_flow(backend.compute(gray), 20.0))
        flow = reader.flow(video_id)
        assert flow.dtype == np.float32
        np.testing.assert_allclose(flow, flow_raw * (40 / 255) - 20, atol=1e-5)


@pytest.mark.parametrize("fmt", ["arrow", "hdf5"])
def test_frame_ranges_cross_chunk_boundaries(small_folder, tmp_path, fmt):
    out = tmp_path / "out"
    run(small_folder, out, format=fmt)
    reader = ShardReader(out)
    video_id = "pan_right"
    rgb, flow = reader.rgb(video_id), reader.flow(video_id)
    assert len(rgb) == 12 and len(flow) == 11
    for start, stop in [(0, 1), (3, 11), (4, 5), (5, 10), (11, 12), (7, 7)]:
        np.testing.assert_array_equal(reader.rgb(video_id, start, stop), rgb[start:stop])
        if stop <= 11:
            np.testing.assert_array_equal(reader.flow(video_id, start, stop), flow[start:stop])
    with pytest.raises(IndexError):
        reader.flow(video_id, 0, 12)  # 12 frames have 11 flows
    with pytest.raises(KeyError, match="nope"):
        reader.meta("nope")


def test_index_rows_and_checksums(small_folder, tmp_path):
    out = tmp_path / "out"
    run(small_folder, out)
    index = pq.read_table(out / "index.parquet").to_pylist()
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["label_map"] == {"count": 0, "pan": 1}
    assert [r["video_id"] for r in index] == ["counter", "pan_down", "pan_right"]  # source order
    by_id = {r["video_id"]: r for r in index}
    assert by_id["pan_down"]["num_frames"] == 9 * 25 // 30 + 1  # 9 frames at 30 fps span 0.3 s: 8 instants at 25 fps
    assert by_id["counter"]["label_index"] == 0 and by_id["pan_right"]["label"] == "pan"
    assert by_id["pan_down"]["source_codec"] == "h264" and by_id["pan_down"]["source_fps"] == pytest.approx(30)
    reader = ShardReader(out)
    for row in index:
        n = row["num_frames"]
        rgb, flow = reader.blobs(row["video_id"], "rgb", range(n)), reader.blobs(row["video_id"], "flow", range(n - 1))
        sha = hashlib.sha256()
        for i in range(n):
            sha.update(rgb[i])
            if i < n - 1:
                sha.update(flow[i])
        assert sha.hexdigest() == row["checksum"]
        assert row["bytes"] == sum(map(len, rgb + flow))


@pytest.mark.parametrize("fmt", ["arrow", "hdf5"])
def test_same_input_same_bytes_and_shards_roll_over(small_folder, tmp_path, fmt):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run(small_folder, out, format=fmt, shard_size=20_000)
    shards = complete_shards(a)
    assert len(shards) >= 2 and shards == complete_shards(b)
    for shard in shards:
        assert (a / shard).read_bytes() == (b / shard).read_bytes(), shard
    assert (a / "index.parquet").read_bytes() == (b / "index.parquet").read_bytes()
    reader = ShardReader(a)
    assert len({reader.meta(v)["shard"] for v in reader.video_ids}) == len(shards)  # no video split across shards


def test_float16_flow_is_unquantized(small_folder, tmp_path):
    q, f = tmp_path / "q", tmp_path / "f"
    run(small_folder, q, flow_codec="zstd:3")
    run(small_folder, f, flow_dtype="float16")
    flow_q, flow_f = ShardReader(q).flow("pan_right"), ShardReader(f).flow("pan_right")
    assert ShardReader(f).flow("pan_right", raw=True).dtype == np.float16
    assert np.abs(flow_q - flow_f).max() <= 20 / 255 + 0.02  # within half a quantization step (+ float16 rounding)
    assert not np.array_equal(flow_q, flow_f)


def test_other_parameters_are_refused_and_overwrite_starts_over(small_folder, tmp_path):
    out = tmp_path / "out"
    run(small_folder, out)
    with pytest.raises(OutputMismatch, match="short_side: 48 -> 64"):
        run(small_folder, out, short_side=64)
    report = run(small_folder, out)  # same parameters: a resume with nothing to do
    assert report.skipped == 3 and report.written == 0
    report = extract(small_folder, out, ExtractConfig(**{**SMALL, "short_side": 64}), workers=0, overwrite=True, progress=False)
    assert report.written == 3 and ShardReader(out).meta("pan_right")["height"] == 64


def test_leftovers_of_a_killed_run_are_removed_and_redone(small_folder, tmp_path):
    out = tmp_path / "out"
    run(small_folder, out, shard_size=1)  # one video per shard
    shards = complete_shards(out)
    assert len(shards) == 3
    last = out / shards[-1]
    # What a kill while the last shard was written leaves: its bytes under the partial name, no index part.
    last.rename(last.with_name(last.name + ".partial"))
    (out / shards[-1].replace(".arrow", ".parquet")).unlink()
    (out / "shards" / "shard-00009.parquet").write_bytes(b"orphan")
    report = run(small_folder, out, shard_size=1)
    assert report.skipped == 2 and report.written == 1
    assert not list(out.glob("**/*.partial")) and not (out / "shards" / "shard-00009.parquet").exists()
    assert complete_shards(out) == shards
    assert ShardReader(out).video_ids == ["counter", "pan_down", "pan_right"]


def test_two_attempts_at_a_shard_write_their_own_files_and_the_superseded_one_is_removed_later(small_folder, tmp_path):
    """A decoder thought lost that still runs (the superseded attempt) goes on writing while its
    replacement writes and commits the same shard: it must touch neither the published shard nor
    the other attempt's file, and the next run removes what it left."""
    out = tmp_path / "out"
    run(small_folder, out, shard_size=1)  # one video per shard
    shard = complete_shards(out)[-1]
    whole = (out / shard).read_bytes()
    (out / shard).unlink()  # not yet written
    (out / index_part(shard)).unlink()
    dataset = json.loads((out / "dataset.json").read_text())
    config = ExtractConfig(**dataset["params"])
    metadata = {k.decode(): v.decode() for k, v in pa.ipc.open_file(pa.py_buffer(whole)).schema.metadata.items()}
    by_id = {spec.video_id: spec for spec in find_videos(small_folder)[0]}
    plan = ShardPlan(2, tuple(by_id[row["video_id"]] for row in read_plan(storage(out)).to_pylist() if row["shard"] == 2))

    def attempt(videos):
        return write_shard(out, plan, config, dataset["label_map"], metadata, videos)

    first_chunk_written, replaced = threading.Event(), threading.Event()

    def held_back():  # the superseded attempt: paused after its first chunk until the replacement committed
        for spec, chunks in local_video_chunks(plan.videos, config):
            def paused(chunks=chunks):
                for i, chunk in enumerate(chunks):
                    yield chunk
                    if i == 0:
                        first_chunk_written.set()
                        assert replaced.wait(120)
            yield spec, paused()

    superseded = {}
    thread = threading.Thread(target=lambda: superseded.update(result=attempt(held_back())))
    thread.start()
    assert first_chunk_written.wait(120)
    replacement = attempt(local_video_chunks(plan.videos, config))
    commit_shard(storage(out), replacement)
    replaced.set()
    thread.join()
    first = superseded["result"]
    assert first.staged != replacement.staged and first.staged.startswith(f"{shard}.")
    assert (out / shard).read_bytes() == whole  # the published shard is the replacement's, untouched
    assert (out / first.staged).read_bytes() == whole  # the superseded attempt wrote all of its own file
    assert leftovers(out) == [first.staged]

    report = run(small_folder, out, shard_size=1)
    assert report.skipped == 3 and report.written == 0
    assert not list(out.glob("**/*.partial")) and (out / shard).read_bytes() == whole
    assert ShardReader(out).video_ids == ["counter", "pan_down", "pan_right"]


def test_missing_shard_is_a_clear_error(small_folder, tmp_path):
    out = tmp_path / "out"
    run(small_folder, out)
    (out / complete_shards(out)[0]).unlink()
    with pytest.raises(FileNotFoundError, match="shard-00000.arrow"):
        ShardReader(out).rgb("counter")


def test_reader_keeps_a_bounded_number_of_shards_open(small_folder, tmp_path):
    out = tmp_path / "out"
    run(small_folder, out, shard_size=1)  # one video per shard
    reader, unbounded = ShardReader(out), ShardReader(out)
    reader.max_open_shards = 1
    for _ in range(2):
        for video_id in reader.video_ids:
            np.testing.assert_array_equal(reader.rgb(video_id), unbounded.rgb(video_id))
            assert len(reader._files) == 1
    assert len(unbounded._files) == 3


def test_bad_codecs_are_refused_up_front():
    for options in ({"flow_codec": "lz4"}, {"rgb_codec": "jpeg:500"}, {"flow_codec": "zstd:0"}, {"flow_dtype": "float16", "flow_codec": "png"}):
        with pytest.raises(ValueError):
            ExtractConfig(**options)
