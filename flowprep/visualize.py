"""Flow in the Middlebury colour coding (Baker et al., 2011), beside its RGB frame.

Hue is the direction of motion, saturation its magnitude relative to a stated scale: white is
no motion, full colour is motion of ``scale`` pixels or more. An output extracted with
``--flow none`` is shown as RGB alone.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from flowprep.shards.reader import ShardReader, spread_indices

# The wheel's hue segments: (length, channel held at 255, channel that ramps, ramps up?), channels
# R=0 G=1 B=2: red->yellow, yellow->green, green->cyan, cyan->blue, blue->magenta, magenta->red.
_SEGMENTS = ((15, 0, 1, True), (6, 1, 0, False), (4, 1, 2, True), (11, 2, 1, False), (13, 2, 0, True), (6, 0, 2, False))


def color_wheel() -> np.ndarray:
    """``[55, 3] float`` RGB colours (0-255) around the Middlebury wheel."""
    ramps = []
    for n, held, ramped, up in _SEGMENTS:
        ramp = np.zeros((n, 3))
        ramp[:, held] = 255
        steps = np.floor(255 * np.arange(n) / n)
        ramp[:, ramped] = steps if up else 255 - steps
        ramps.append(ramp)
    return np.concatenate(ramps)


_WHEEL = color_wheel()


def flow_to_color(flow: np.ndarray, scale: float) -> np.ndarray:
    """``[H, W, 2]`` flow in pixels to ``[H, W, 3] uint8`` RGB; magnitude ``scale`` is full colour."""
    u, v = flow[..., 0] / scale, flow[..., 1] / scale
    radius = np.sqrt(u * u + v * v)
    position = (np.arctan2(-v, -u) / np.pi + 1) / 2 * (len(_WHEEL) - 1)
    k0 = np.floor(position).astype(int)
    k1 = (k0 + 1) % len(_WHEEL)
    f = (position - k0)[..., None]
    color = ((1 - f) * _WHEEL[k0] + f * _WHEEL[k1]) / 255
    inside = (radius <= 1)[..., None]
    color = np.where(inside, 1 - radius[..., None] * (1 - color), color * 0.75)
    return np.floor(255 * color).astype(np.uint8)


def _legend(size: int) -> np.ndarray:
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    disk = flow_to_color(np.stack([x, y], -1).astype(np.float32), 1.0)
    disk[x * x + y * y > 1] = 255
    return disk


def flow_panel(flow: np.ndarray, scale: float) -> np.ndarray:
    """``[H, W, 2]`` flow in pixels to ``[H, W, 3] uint8``: :func:`flow_to_color` with the wheel's
    legend in the top right corner."""
    color = flow_to_color(flow, scale)
    legend = _legend(max(16, flow.shape[0] // 5))
    color[: legend.shape[0], -legend.shape[1] :] = legend
    return color


def side_by_side(panels: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """``[H, sum(W), 3] uint8``: ``[H, W, 3] uint8`` panels left to right, each with its label
    written along its bottom edge (white on black outline: legible on any colour)."""
    image = np.ascontiguousarray(np.concatenate(panels, axis=1))
    font, size = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, image.shape[0] / 600)
    lefts = np.cumsum([0] + [panel.shape[1] for panel in panels[:-1]])
    for text, left in zip(labels, lefts):
        for thickness, colour in ((3, (0, 0, 0)), (1, (255, 255, 255))):
            cv2.putText(image, text, (int(left) + 4, image.shape[0] - 6), font, size, colour, thickness, cv2.LINE_AA)
    return image


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``[H, W, 3] uint8`` RGB ``image`` to ``path`` as a PNG; an ``OSError`` if it cannot."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return Path(path)


def render(rgb: np.ndarray, flow: np.ndarray | None, index: int, scale: float | None) -> np.ndarray:
    """``[H, 2W, 3] uint8``: the RGB frame, then its flow in colour, marked with the frame index and
    scale; ``[H, W, 3]``, the RGB frame alone, when ``flow`` is ``None``."""
    if flow is None:
        return side_by_side([rgb], [f"frame {index}"])
    return side_by_side([rgb, flow_panel(flow, scale)], [f"frame {index}", f"flow {index}->{index + 1}, full colour = {scale:.1f} px"])


def flow_scale(reader: ShardReader, video_id: str, samples: int = 32) -> float:
    """A colour scale for a video: the 99th percentile flow magnitude over a sample of its flows (>= 1 px)."""
    n = reader.meta(video_id)["num_frames"] - 1
    flows = reader.flow_at(video_id, spread_indices(n, samples))
    return max(1.0, float(np.percentile(np.linalg.norm(flows, axis=-1), 99)))


def show(out: str | Path, video_id: str, dest: str | Path, frame: int | None = None, scale: float | None = None) -> Path:
    """Write ``dest``: a PNG of one frame (default: the middle one) or an MP4 of every flow (of
    every frame, without flow). The video's stored bytes are checked against the index checksum
    first (``verify=True``)."""
    reader = ShardReader(out, verify=True)
    dest = Path(dest)
    meta = reader.meta(video_id)
    n = meta["num_frames"] - 1 if reader.has_flow else meta["num_frames"]  # frames shown: those with a flow, or all
    if reader.has_flow:
        scale = scale or flow_scale(reader, video_id)

    def images(start: int, stop: int) -> list[np.ndarray]:
        """Frames ``[start, stop)`` rendered."""
        rgb = reader.rgb(video_id, start, stop)
        flow = reader.flow(video_id, start, stop) if reader.has_flow else [None] * len(rgb)
        return [render(r, f, i, scale) for i, (r, f) in enumerate(zip(rgb, flow), start)]

    if dest.suffix.lower() == ".png":
        i = n // 2 if frame is None else frame
        return write_png(dest, images(i, i + 1)[0])
    if dest.suffix.lower() != ".mp4":
        raise ValueError(f"{dest}: write a .png or an .mp4")
    import av  # only the MP4 needs PyAV: the probe's pictures (flowprep.probe) are drawn without it
    with av.open(str(dest), "w") as container:
        stream = container.add_stream("libx264", rate=reader.dataset["params"]["fps"], options={"crf": "18"})
        width = meta["width"] * (2 if reader.has_flow else 1)
        stream.height, stream.width = meta["height"] + meta["height"] % 2, width + width % 2  # yuv420p: even sides
        stream.pix_fmt = "yuv420p"
        for start in range(0, n, 32):  # a chunk at a time: memory stays bounded for long videos
            for image in images(start, min(start + 32, n)):
                image = np.pad(image, ((0, stream.height - image.shape[0]), (0, stream.width - image.shape[1]), (0, 0)))
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return dest
