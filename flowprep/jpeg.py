"""JPEG frames that decode a crop without decoding the whole frame.

A JPEG with a restart marker every few MCUs (the ``jpeg-rst`` codec) is still a plain baseline
JPEG that any decoder reads. The markers also make each run of MCUs between two of them
independent (DC prediction starts again after each), so the MCU rows and columns that cover a
crop can be cut out of the entropy-coded data and put back together as a smaller, valid JPEG:
only that region is Huffman-decoded, inverse-transformed and colour-converted.

The region is the crop grown by 2 pixels on each side (within the frame) and then to whole MCUs
and restart runs: libjpeg's chroma upsampling reads the neighbouring chroma sample, so the crop's
pixels come out exactly as they do in a decode of the whole frame.

Decoding is libjpeg-turbo through simplejpeg, which returns RGB directly (OpenCV's imdecode
returns BGR and costs a channel swap on top).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg

RUN_PIXELS = 64  # target width of the MCU run between restart markers
_MARGIN = 2  # pixels of context chroma upsampling needs around a crop
_RESTART = np.array([0xFF, 0xD0], np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int, restarts: bool = False) -> bytes:
    """``[H, W, 3] uint8`` RGB to baseline JPEG (4:2:0), with ``restarts`` a restart marker every
    :func:`restart_interval` MCUs so that :func:`decode_jpeg` can decode crops alone."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if restarts:
        params += [cv2.IMWRITE_JPEG_RST_INTERVAL, restart_interval(rgb.shape[1])]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} frame as JPEG")
    return buf.tobytes()


def restart_interval(width: int, mcu_width: int = 16) -> int:
    """MCUs between restart markers: the largest divisor of the MCUs in a row up to
    ``RUN_PIXELS`` wide, so that every row starts a new run and a run never spans two rows."""
    mcus = -(-width // mcu_width)
    return max(k for k in range(1, RUN_PIXELS // mcu_width + 1) if mcus % k == 0)


@dataclass(frozen=True)
class _Layout:
    """Where things are in one baseline JPEG: the frame header's offset, the MCU grid, the
    restart interval and the entropy-coded data's span."""

    sof: int  # offset of the SOF0 segment's marker
    height: int
    width: int
    mcu_h: int
    mcu_w: int
    interval: int  # MCUs per restart run (0: no restart markers)
    scan: int  # first byte of entropy-coded data
    end: int  # offset of the EOI marker


def _layout(data: bytes | memoryview) -> _Layout | None:
    """The layout of a single-scan baseline JPEG, or ``None`` for anything else (progressive,
    several scans, no restart markers: those decode whole)."""
    pos, sof, interval = 2, None, 0
    n = len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xC0:
            sof = pos
        elif 0xC1 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # progressive, lossless, arithmetic: not cut here
        elif marker == 0xDD:
            interval = (data[pos + 4] << 8) | data[pos + 5]
        elif marker == 0xDA:
            if sof is None or not interval or data[n - 2] != 0xFF or data[n - 1] != 0xD9:
                return None
            components = data[sof + 9]
            h_max = max(data[sof + 11 + 3 * c] >> 4 for c in range(components))
            v_max = max(data[sof + 11 + 3 * c] & 15 for c in range(components))
            height = (data[sof + 5] << 8) | data[sof + 6]
            width = (data[sof + 7] << 8) | data[sof + 8]
            return _Layout(sof, height, width, 8 * v_max, 8 * h_max, interval, pos + 2 + length, n - 2)
        pos += 2 + length
    return None


def _restart_markers(entropy: np.ndarray) -> np.ndarray:
    """Offsets of the restart markers (``FF D0``-``FF D7``) in entropy-coded data; a data byte
    0xFF is always followed by a stuffed 0x00, so these pairs are markers."""
    ff = np.flatnonzero(entropy[:-1] == 0xFF)
    return ff[(entropy[ff + 1] & 0xF8) == 0xD0]


def crop_jpeg(data: bytes | memoryview, window: tuple[slice, slice]) -> tuple[bytes | memoryview, tuple[slice, slice]]:
    """The smallest JPEG that holds ``window`` (rows, columns) of a JPEG frame, and where the
    window lies in it: for a ``jpeg-rst`` frame the MCUs around the window, cut out as a JPEG of
    their own; for any other JPEG the frame itself and ``window``. Damaged data is a ``ValueError``."""
    data = memoryview(data).cast("B")  # bytes or a shard's buffer, indexed as unsigned bytes
    layout = _layout(data)
    if layout is None:
        return data, window
    rows, cols = range(layout.height)[window[0]], range(layout.width)[window[1]]
    run_w = layout.interval * layout.mcu_w
    runs_per_row = -(-layout.width // layout.mcu_w) // layout.interval
    if not rows or not cols or rows.step != 1 or cols.step != 1 or runs_per_row * run_w < layout.width:
        return data, window  # nothing to cut, or runs that cross rows (not written by flowprep)
    r0 = max(rows.start - _MARGIN, 0) // layout.mcu_h
    r1 = -(-min(rows.stop + _MARGIN, layout.height) // layout.mcu_h)
    c0 = max(cols.start - _MARGIN, 0) // run_w
    c1 = -(-min(cols.stop + _MARGIN, layout.width) // run_w)

    entropy = np.frombuffer(data, np.uint8, layout.end - layout.scan, layout.scan)
    markers = _restart_markers(entropy)
    expected = runs_per_row * -(-layout.height // layout.mcu_h) - 1
    if len(markers) != expected:
        raise ValueError(f"{len(markers)} restart markers where the header asks for {expected}")
    starts = np.concatenate([[0], markers + 2])
    ends = np.concatenate([markers, [len(entropy)]])
    pieces = []
    for r in range(r0, r1):
        pieces += [entropy[starts[r * runs_per_row + c0] : ends[r * runs_per_row + c1 - 1]], _RESTART]
    body = np.concatenate(pieces[:-1])
    # Runs are numbered 0-7 in turn; the cut-out runs are numbered again from 0.
    kept = _restart_markers(body)
    body[kept + 1] = 0xD0 + np.arange(len(kept)) % 8
    header = bytearray(data[: layout.scan])
    height = min(r1 * layout.mcu_h, layout.height) - r0 * layout.mcu_h
    width = min(c1 * run_w, layout.width) - c0 * run_w
    header[layout.sof + 5 : layout.sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    top, left = rows.start - r0 * layout.mcu_h, cols.start - c0 * run_w
    return bytes(header) + body.tobytes() + b"\xff\xd9", (slice(top, top + len(rows)), slice(left, left + len(cols)))


def decode_jpeg(data: bytes | memoryview, window: tuple[slice, slice] | None = None) -> np.ndarray:
    """A JPEG's RGB pixels ``[h, w, 3] uint8``: the whole frame, or ``window`` (rows, columns) of
    it, decoding only the MCUs around the window of a ``jpeg-rst`` frame (:func:`crop_jpeg`).
    Damaged data is a ``ValueError``."""
    data = memoryview(data).cast("B")
    if window is None:
        return simplejpeg.decode_jpeg(data, "RGB")
    jpeg, inside = crop_jpeg(data, window)
    return simplejpeg.decode_jpeg(jpeg, "RGB")[inside]
