"""Shared fixtures: videos generated with PyAV and the real sample clips."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from flowprep.samples import sample_clip

INDEX_BITS = 8
BIT_WIDTH = 16


def index_frame(i: int, height: int = 64, width: int = INDEX_BITS * BIT_WIDTH) -> np.ndarray:
    """A ``[H, W, 3] uint8`` frame whose vertical stripes spell ``i`` in binary (stripe 0 = bit 0)."""
    frame = np.zeros((height, width, 3), np.uint8)
    for bit in range(INDEX_BITS):
        if i >> bit & 1:
            frame[:, bit * BIT_WIDTH : (bit + 1) * BIT_WIDTH] = 255
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index spelled by a (decoded, resized) :func:`index_frame`."""
    gray = frame.mean(axis=(0, 2))
    stripe = frame.shape[1] / INDEX_BITS
    return sum(1 << b for b in range(INDEX_BITS) if gray[int((b + 0.5) * stripe)] > 128)


def write_video(path: Path, frames, fps: int | Fraction = 25, codec: str = "libx264", rotation: int = 0,
                timestamps=None, pix_fmt: str = "yuv420p") -> Path:
    """Encode ``[H, W, 3] uint8`` frames with PyAV; ``timestamps`` (seconds) make a variable-rate video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = list(frames)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if timestamps is not None:
            stream.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if timestamps is not None:
                frame.pts = round(timestamps[i] * 1000)
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A real photo-like texture: a crop of bikes.mp4's first frame, tiled if needed."""
    with av.open(str(sample_clip("bikes.mp4"))) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    reps = (-(-height // frame.shape[0]), -(-width // frame.shape[1]), 1)
    return np.tile(frame, reps)[:height, :width].copy()


@pytest.fixture(scope="session")
def bikes() -> Path:
    return sample_clip("bikes.mp4")


@pytest.fixture(scope="session")
def kinetics_folder(tmp_path_factory) -> Path:
    """A small class-folder Kinetics layout: real clips and generated videos of several codecs."""
    root = tmp_path_factory.mktemp("kinetics")
    for target, name in (("train/riding_bike/bikes.mp4", "bikes.mp4"), ("train/talking/carphone.mp4", "carphone_pristine.mp4")):
        (root / target).parent.mkdir(parents=True)
        shutil.copy(sample_clip(name), root / target)
    write_video(root / "val" / "counting" / "index_vp9.webm", [index_frame(i) for i in range(12)], fps=30, codec="libvpx-vp9")
    write_video(root / "val" / "counting" / "index_mpeg4.avi", [index_frame(i) for i in range(12)], fps=15, codec="mpeg4")
    return root


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """An output folder for the teacher and training tests: five panning videos at 112 rows (the
    smallest crop the networks take), two classes, train and val, one video per shard."""
    from flowprep.extract import extract
    from flowprep.pipeline import ExtractConfig

    root = tmp_path_factory.mktemp("small-src")
    image = textured_image(112, 150)
    videos = (("train", "left", "pan_a", 2, 24), ("train", "left", "pan_b", 1, 20), ("train", "right", "pan_c", -2, 22),
              ("train", "right", "short", -1, 6), ("val", "right", "pan_d", -1, 18))
    for split, label, name, speed, frames in videos:
        write_video(root / split / label / f"{name}.mp4", [np.roll(image, speed * i, axis=1) for i in range(frames)])
    out = tmp_path_factory.mktemp("small") / "shards"
    config = ExtractConfig(short_side=112, chunk_frames=8, shard_size=1)
    assert extract(root, out, config, workers=0, progress=False).written == len(videos)
    return out


def kill_cli_when(args, line_start: str) -> int:
    """Run ``flowprep ARGS`` in its own process group and SIGKILL the whole group (driver and any
    local Ray) as soon as its log has a line containing ``line_start``; returns the exit status."""
    proc = subprocess.Popen([sys.executable, "-m", "flowprep.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        if line_start in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    return proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """A real Ray cluster of ``ray start`` nodes on loopback addresses of this machine, one CPU
    each. Each node is one ``ray start --block`` process group, stopped by its own group id
    (never ``ray stop``, which would stop every Ray on the machine)."""

    def __init__(self, tmp: Path, dashboard: bool = False):
        self.port = _free_port()
        self.address = f"127.0.0.2:{self.port}"
        self.dashboard = f"http://127.0.0.2:{_free_port()}" if dashboard else None
        self.tmp = tmp
        self.nodes: list[subprocess.Popen] = []
        # Ray >= 2.60 keeps a token in ~/.ray/auth_token and `ray start` turns token auth on:
        # joining nodes and clients then need RAY_AUTH_MODE=token.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token"}
        ray = Path(sys.executable).with_name("ray")
        subprocess.run([str(ray), "get-auth-token", "--generate"], check=True, capture_output=True, env=self.env)
        self.start_node(head=True)

    def start_node(self, head: bool = False) -> subprocess.Popen:
        """Start a node and return once ``ray start`` says it runs (its output then goes to a log file)."""
        ray = Path(sys.executable).with_name("ray")  # the venv's, whatever PATH says
        dashboard = ["--dashboard-host", "127.0.0.2", "--dashboard-port", self.dashboard.rsplit(":", 1)[1]] if self.dashboard \
            else ["--include-dashboard", "false"]
        where = ["--head", "--node-ip-address", "127.0.0.2", "--port", str(self.port), *dashboard] if head \
            else ["--address", self.address, "--node-ip-address", f"127.0.0.{2 + len(self.nodes)}"]
        node = subprocess.Popen([str(ray), "start", *where, "--num-cpus", "1", "--block"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, env=self.env)
        self.nodes.append(node)
        log = open(self.tmp / f"node{len(self.nodes) - 1}.log", "w")
        for line in node.stdout:
            log.write(line)
            if "Ray runtime started" in line:
                break
        else:
            raise RuntimeError(f"ray start failed: see {log.name}")
        threading.Thread(target=lambda: log.writelines(node.stdout), daemon=True).start()
        return node

    def kill_node(self, node: subprocess.Popen) -> None:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        """Stop every node, and forget this cluster as the machine's current one (a plain
        ``ray.init()`` would otherwise try to join it)."""
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip() == self.address:
            current.unlink()
        for node in reversed(self.nodes):
            if node.poll() is None:
                self.kill_node(node)  # `ray start --block` takes half a minute over SIGTERM; nothing here needs a clean stop


@pytest.fixture
def ray_cluster(tmp_path):
    """A two-node Ray cluster (head and one worker node, one CPU each) for one test."""
    cluster = RayCluster(tmp_path)
    try:
        cluster.start_node()
        yield cluster
    finally:
        cluster.stop()
