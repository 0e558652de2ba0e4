"""Flow quantization and the per-frame codecs that turn arrays into stored bytes.

A codec is named ``name[:level]``:

* ``jpeg:Q`` lossy JPEG at quality Q (libjpeg-turbo), 4:2:0;
* ``jpeg-rst:Q`` the same with a restart marker every few MCUs: a crop decodes only the MCUs
  around it (:mod:`flowprep.jpeg`), RGB only;
* ``yuv420:lz4``, ``yuv420:zstd:L``, ``yuv420:raw`` YUV 4:2:0 in column tiles, each packed on its
  own: a crop unpacks and converts only its tiles (:mod:`flowprep.yuv420`), RGB only;
* ``png:L`` lossless PNG at compression level L (0-9);
* ``zstd:L`` the raw array bytes compressed with Zstandard at level L;
* ``raw`` the raw array bytes.

Two-channel arrays (flow ``[H, W, 2]``) are stored by PNG and JPEG as their two planes stacked
into one ``[2H, W]`` gray image, as denseflow keeps x and y in separate gray images.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
import simplejpeg

from flowprep.jpeg import decode_jpeg, encode_jpeg
from flowprep.yuv420 import PACKINGS, decode_yuv420, encode_yuv420

DEFAULT_LEVELS = {"jpeg": 95, "jpeg-rst": 95, "png": 1, "zstd": 3, "raw": 0, "yuv420": 0}
LEVEL_RANGES = {"jpeg": (1, 100), "jpeg-rst": (1, 100), "png": (0, 9), "zstd": (1, 22), "raw": (0, 0), "yuv420": (0, 0)}
RGB_ONLY = ("jpeg-rst", "yuv420")  # codecs of [H, W, 3] uint8 frames only


@dataclass(frozen=True)
class Codec:
    """A parsed codec name: ``Codec.parse("jpeg:90") == Codec("jpeg", 90)``,
    ``Codec.parse("yuv420:zstd:3") == Codec("yuv420", 3, "zstd")``."""

    name: str
    level: int
    packing: str = ""  # yuv420's packing of each tile: lz4, zstd or raw

    @classmethod
    def parse(cls, spec: str) -> Codec:
        name, _, level = spec.partition(":")
        if name not in DEFAULT_LEVELS:
            raise ValueError(f"unknown codec {spec!r}; choose from {sorted(DEFAULT_LEVELS)}")
        if name == "yuv420":
            packing, _, level = level.partition(":")
            if packing not in PACKINGS:
                raise ValueError(f"codec {spec!r}: yuv420 is yuv420:lz4, yuv420:zstd:L or yuv420:raw")
            if packing != "zstd":
                if level:
                    raise ValueError(f"codec {spec!r}: yuv420:{packing} takes no level")
                return cls(name, 0, packing)
            return cls(name, Codec.parse(f"zstd:{level}" if level else "zstd").level, packing)
        low, high = LEVEL_RANGES[name]
        if level and not level.strip().isdigit():
            raise ValueError(f"codec {spec!r}: the level of {name} is a whole number, {low} to {high}")
        value = int(level) if level else DEFAULT_LEVELS[name]
        if not low <= value <= high:
            raise ValueError(f"codec {spec!r}: the level of {name} is {low} to {high}")
        return cls(name, value)

    def __str__(self) -> str:
        if self.name == "yuv420":
            return f"yuv420:zstd:{self.level}" if self.packing == "zstd" else f"yuv420:{self.packing}"
        return self.name if self.name == "raw" else f"{self.name}:{self.level}"

    @property
    def lossless(self) -> bool:
        return self.name in ("png", "zstd", "raw")

    def encode(self, array: np.ndarray) -> bytes:
        """Bytes for one ``[H, W, C]`` frame (uint8 for JPEG/PNG/YUV; any dtype for zstd/raw)."""
        array = np.ascontiguousarray(array)
        if self.name == "raw":
            return array.tobytes()
        if self.name == "zstd":
            return pa.Codec("zstd", compression_level=self.level).compress(array.tobytes(), asbytes=True)
        if array.dtype != np.uint8:
            raise ValueError(f"{self} stores uint8 only, got {array.dtype}")
        if self.name in RGB_ONLY and (array.ndim != 3 or array.shape[-1] != 3):
            raise ValueError(f"{self} stores RGB frames [H, W, 3] only, not {array.shape}")
        if self.name == "yuv420":
            return encode_yuv420(array, self.packing, self.level)
        if self.name.startswith("jpeg") and array.shape[-1] == 3:
            return encode_jpeg(array, self.level, restarts=self.name == "jpeg-rst")
        image = _to_image(array)
        if self.name == "jpeg":
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.level])
        else:
            ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, self.level])
        if not ok:
            raise ValueError(f"OpenCV could not encode a {array.shape} frame as {self}")
        return buf.tobytes()

    def decode(self, blob: bytes | memoryview, shape: tuple[int, ...], dtype=np.uint8,
               window: tuple[slice, slice] | None = None) -> np.ndarray:
        """The ``shape`` / ``dtype`` array stored in ``blob`` (the inverse of :meth:`encode`), or
        its ``window`` (rows, columns): ``jpeg-rst`` and ``yuv420`` decode only the window's
        neighbourhood, the other codecs decode the whole frame and return a view of the window.

        A blob that does not decode to exactly ``shape`` (damaged, or not this frame's) is a
        ``ValueError``, whatever the codec: a wrong frame is never returned for a right one."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        whole = (slice(None), slice(None))
        if self.name in ("raw", "zstd"):
            if self.name == "zstd":
                try:
                    blob = pa.Codec("zstd").decompress(blob, decompressed_size=size, asbytes=True)
                except OSError as e:  # pyarrow's word for damaged data or another size
                    raise ValueError(f"corrupt zstd frame: {e}") from None
            if len(blob) != size:
                raise ValueError(f"corrupt {self.name} frame: {len(blob)} bytes, {size} expected for {shape} {dtype}")
            return np.frombuffer(blob, dtype=dtype).reshape(shape)[window or whole]
        if self.name == "yuv420":
            return decode_yuv420(blob, shape[0], shape[1], self.packing, window)
        if self.name.startswith("jpeg") and shape[-1] == 3:
            return self._decode_rgb_jpeg(blob, shape, window)
        try:
            image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error:  # an empty blob fails OpenCV's assertion instead of returning None
            image = None
        if image is None:
            raise ValueError(f"corrupt {self.name} frame")
        expected = _image_shape(shape)
        if image.shape != expected or image.dtype != dtype:
            raise ValueError(f"corrupt {self.name} frame: decodes to {image.shape} {image.dtype}, stored as {expected} {dtype}")
        return _from_image(image, shape)[window or whole]

    def _decode_rgb_jpeg(self, blob, shape: tuple[int, ...], window: tuple[slice, slice] | None) -> np.ndarray:
        blob = memoryview(blob).cast("B")  # simplejpeg takes unsigned bytes; a shard's buffers are signed
        try:
            header = simplejpeg.decode_jpeg_header(blob)
            if header[:2] != tuple(shape[:2]) or header[2] != "YCbCr":
                raise ValueError(f"decodes to {header[0]}x{header[1]} {header[2]}, stored as {shape[0]}x{shape[1]} RGB")
            return decode_jpeg(blob, window)
        except ValueError as e:  # simplejpeg's word for damaged data
            raise ValueError(f"corrupt {self.name} frame: {e}") from None


def _to_image(array: np.ndarray) -> np.ndarray:
    if array.shape[-1] == 3:
        return cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if array.shape[-1] == 2:
        return np.concatenate([array[..., 0], array[..., 1]], axis=0)
    return array


def _image_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape OpenCV decodes the image of an array of ``shape`` to (:func:`_to_image`): the two
    planes of flow stacked, a single plane as 2-D."""
    if shape[-1] == 2:
        return (2 * shape[0], shape[1])
    return tuple(shape) if shape[-1] > 1 else tuple(shape[:-1])


def _from_image(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if shape[-1] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if shape[-1] == 2:
        h = shape[0]
        return np.stack([image[:h], image[h:]], axis=-1)
    return image.reshape(shape)


def quantize_flow(flow: np.ndarray, bound: float) -> np.ndarray:
    """``[..., 2] float`` pixels to uint8: clip to ``±bound``, ``q = round((f + bound) * 255 / (2 * bound))``.

    The denseflow / I3D convention; 0 px maps to 127.5, stored as 128 (round half to even).
    """
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return np.rint(scaled).astype(np.uint8)


def dequantize_flow(q: np.ndarray, bound: float) -> np.ndarray:
    """uint8 to float32 pixels: ``q * 2 * bound / 255 - bound`` (error at most ``bound / 255``)."""
    return q.astype(np.float32) * np.float32(2.0 * bound / 255.0) - np.float32(bound)
