"""RGB frames stored as YUV 4:2:0 in column tiles, so that a crop unpacks and converts alone.

A frame (padded to even height and width by repeating its last row and column) is converted to
I420 by OpenCV (BT.601; 1.5 bytes a pixel) and cut into tiles ``TILE`` pixels wide (``raw``: one
tile, as nothing is unpacked). Each tile holds its columns of Y, then of U, then of V, row by
row, and is packed on its own (``lz4``, ``zstd`` at a level, or ``raw``). A crop unpacks only the
tiles it overlaps, copies its rows and columns of each plane into one small I420 image and
converts that to RGB: the colour conversion costs the crop's pixels, not the frame's.

Blob layout (little-endian)::

    uint16 height, uint16 width, uint16 tile width, uint16 tile count n,
    n x uint32 end offset of each packed tile, tiles

OpenCV's I420-to-RGB conversion uses each chroma sample for its 2x2 block, unfiltered, so a crop
starting on an even pixel comes out exactly as in the converted whole frame; an odd crop is cut
from its even-aligned neighbour.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa

TILE = 64  # luma columns per tile: a 224-wide crop unpacks 4 or 5 tiles
PACKINGS = ("lz4", "zstd", "raw")
_HEADER = np.dtype("<u2")


def _codec(packing: str, level: int) -> pa.Codec | None:
    if packing == "raw":
        return None
    return pa.Codec("zstd", compression_level=level) if packing == "zstd" else pa.Codec("lz4_raw")


def encode_yuv420(rgb: np.ndarray, packing: str, level: int = 0) -> bytes:
    """``[H, W, 3] uint8`` RGB to a tiled YUV 4:2:0 blob, each tile packed with ``packing``."""
    h, w = rgb.shape[:2]
    even = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    he, we = even.shape[:2]
    i420 = cv2.cvtColor(even, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    y = i420[: he * we].reshape(he, we)
    u = i420[he * we : he * we * 5 // 4].reshape(he // 2, we // 2)
    v = i420[he * we * 5 // 4 :].reshape(he // 2, we // 2)
    codec = _codec(packing, level)
    tile_w = we if codec is None else TILE
    tiles = []
    for x in range(0, we, tile_w):
        tile = b"".join(np.ascontiguousarray(plane[:, x // s : (x + tile_w) // s]).tobytes() for plane, s in ((y, 1), (u, 2), (v, 2)))
        tiles.append(tile if codec is None else codec.compress(tile, asbytes=True))
    ends = np.cumsum([len(t) for t in tiles], dtype="<u4")
    return np.array([h, w, tile_w, len(tiles)], _HEADER).tobytes() + ends.tobytes() + b"".join(tiles)


def decode_yuv420(blob: bytes | memoryview, height: int, width: int, packing: str,
                  window: tuple[slice, slice] | None = None) -> np.ndarray:
    """The ``[h, w, 3] uint8`` RGB pixels of a :func:`encode_yuv420` blob of a ``height`` x
    ``width`` frame: the whole frame, or ``window`` (rows, columns) of it, unpacking only the
    tiles the window overlaps. Damaged data is a ``ValueError``."""
    he, we = height + height % 2, width + width % 2
    window = window or (slice(None), slice(None))
    rows, cols = range(height)[window[0]], range(width)[window[1]]
    if rows.step != 1 or cols.step != 1:
        return decode_yuv420(blob, height, width, packing)[window]
    data = np.frombuffer(blob, np.uint8)
    stored_h, stored_w, tile_w, count = (int(v) for v in np.frombuffer(blob, _HEADER, 4)) if len(data) >= 8 else (0,) * 4
    base = 8 + 4 * count
    if (stored_h, stored_w) != (height, width) or tile_w < 2 or tile_w % 2 or count != -(-we // tile_w) or len(data) < base:
        raise ValueError(f"corrupt yuv420 frame: its header does not describe a {height}x{width} frame")
    ends = np.frombuffer(blob, "<u4", count, 8)
    if base + int(ends[-1]) != len(data):
        raise ValueError(f"corrupt yuv420 frame: {len(data)} bytes, its header accounts for {base + int(ends[-1])}")
    if not rows or not cols:
        return np.empty((len(rows), len(cols), 3), np.uint8)
    y0, x0 = rows.start - rows.start % 2, cols.start - cols.start % 2
    y1, x1 = rows.stop + rows.stop % 2, cols.stop + cols.stop % 2
    h, w = y1 - y0, x1 - x0
    i420 = np.empty(h * w * 3 // 2, np.uint8)
    planes = (i420[: h * w].reshape(h, w), i420[h * w : h * w * 5 // 4].reshape(h // 2, w // 2),
              i420[h * w * 5 // 4 :].reshape(h // 2, w // 2))
    codec = _codec(packing, 0)
    for k in range(x0 // tile_w, -(-x1 // tile_w)):
        start, end = base + (int(ends[k - 1]) if k else 0), base + int(ends[k])
        tw = min(tile_w, we - k * tile_w)
        size = he * tw * 3 // 2
        if start > end:
            raise ValueError(f"corrupt yuv420 frame: tile {k} ends before it starts")
        tile = data[start:end]
        if codec is not None:
            try:
                tile = np.frombuffer(codec.decompress(tile, decompressed_size=size), np.uint8)
            except OSError as e:  # pyarrow's word for damaged data or another size
                raise ValueError(f"corrupt yuv420 frame: tile {k}: {e}") from None
        if len(tile) != size:
            raise ValueError(f"corrupt yuv420 frame: tile {k} holds {len(tile)} bytes, {size} expected")
        # The tile's columns [a, b) of the frame that the window needs, in luma pixels.
        a, b = max(x0, k * tile_w), min(x1, k * tile_w + tw)
        offset = 0
        for plane, s in zip(planes, (1, 2, 2)):
            ph, pw = he // s, tw // s
            source = tile[offset : offset + ph * pw].reshape(ph, pw)
            plane[:, (a - x0) // s : (b - x0) // s] = source[y0 // s : y1 // s, (a - k * tile_w) // s : (b - k * tile_w) // s]
            offset += ph * pw
    rgb = cv2.cvtColor(i420.reshape(h * 3 // 2, w), cv2.COLOR_YUV2RGB_I420)
    return rgb[rows.start - y0 : rows.start - y0 + len(rows), cols.start - x0 : cols.start - x0 + len(cols)]
