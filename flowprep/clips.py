"""A clip's conventions, one definition each, for the dataset, the teacher precompute and training.

* Frames: a clip of ``clip_len`` frames ``start, start + stride, ...`` spans
  :func:`clip_span` positions and wraps at the video's end (:func:`clip_indices`).
* Crops: ``count`` positions of a ``crop x crop`` square spread evenly along the long side, both
  ends included (1: the centre), centred on the short side (:func:`crop_positions`).
* Flow values: stored uint8 flow ``q`` is ``q / 127.5 - 1`` in [-1, 1] (x then y); stored float16
  flow (pixels) is divided by the bound and clipped to [-1, 1]. A flipped (mirrored) clip has x
  negated: for uint8, ``255 - q``. RGB uint8 ``v`` is ``v / 127.5 - 1`` the same way (I3D's
  [-1, 1]).
"""

from __future__ import annotations

import numpy as np
import torch


def clip_span(clip_len: int, stride: int) -> int:
    """Frame positions one clip covers, first to last inclusive."""
    return (clip_len - 1) * stride + 1


def clip_indices(length: int, clip_len: int, stride: int, start: int) -> np.ndarray:
    """Frame indices of a clip: ``start + stride * j`` for ``j < clip_len``, wrapped at ``length``."""
    return (start + stride * np.arange(clip_len)) % length


def crop_positions(height: int, width: int, crop: int, count: int) -> list[tuple[int, int]]:
    """``(top, left)`` pixels of ``count`` ``crop x crop`` squares in a ``height x width`` frame:
    spread evenly along the long side, both ends included (1: the centre), centred on the short
    side (rounded down). Positions may coincide (a square frame); ``ValueError`` when the frame is
    smaller than the crop."""
    if min(height, width) < crop:
        raise ValueError(f"a {height}x{width} video is smaller than crop {crop}")
    long_room = max(height, width) - crop
    short_room = (min(height, width) - crop) // 2
    along = [long_room // 2] if count == 1 else [i * long_room // (count - 1) for i in range(count)]
    return [(a, short_room) if height > width else (short_room, a) for a in along]


def flow_lookup_tables(normalize: bool = True) -> dict[bool, np.ndarray]:
    """Stored uint8 flow ``q`` to a clip's value, ``[2, 256]`` (x, y) for unflipped (``False``) and
    flipped (``True``) clips: float32 ``q / 127.5 - 1`` with x negated when flipped, or, unnormalized,
    uint8 ``q`` with ``255 - q`` for flipped x."""
    levels = np.arange(256)
    if not normalize:
        return {False: np.stack([levels, levels]).astype(np.uint8), True: np.stack([255 - levels, levels]).astype(np.uint8)}
    flow = (levels / 127.5 - 1).astype(np.float32)
    return {False: np.stack([flow, flow]), True: np.stack([-flow, flow])}


def unit_range(values: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``v`` or flow ``q`` (flipped x already ``255 - q``), any shape, to float32
    ``v / 127.5 - 1`` on their device. In float32 arithmetic: within one float32 step (6e-8) of
    :func:`flow_lookup_tables`."""
    return values.float().div_(127.5).sub_(1)


def float_flow(flow: torch.Tensor, bound: float, flip: bool) -> torch.Tensor:
    """Stored float16 flow ``[2, ...]`` (pixels, x then y; already mirrored when ``flip``) to
    float32 in [-1, 1]: divided by ``bound``, clipped, x negated when ``flip``."""
    values = (flow.float() / bound).clamp_(-1, 1)
    if flip:
        values[0].neg_()
    return values
