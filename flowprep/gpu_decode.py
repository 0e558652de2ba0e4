"""RGB clips decoded on the training GPU, so that DataLoader workers only slice bytes.

``ClipDataset(..., decode="gpu")`` items carry, instead of ``rgb``, each frame's stored JPEG
(``jpeg-rst`` frames cut to the MCUs around the crop, so a 224 crop of a 256x340 frame is a
256x256 JPEG or smaller) and where the crop lies in it. :func:`collate` batches such items and
:func:`decode_clips` decodes a batch on the GPU with nvJPEG (``torchvision.io.decode_jpeg`` with
a CUDA device, batched), then crops, flips and normalizes there::

    loader = DataLoader(ClipDataset(out, decode="gpu"), batch_size=8, num_workers=2, collate_fn=collate)
    for batch in loader:
        rgb = decode_clips(batch, "cuda")   # [B, 3, T, crop, crop] float32 on the GPU

nvJPEG and libjpeg-turbo both implement the JPEG standard's IDCT but not bit for bit: pixels
differ from ``decode="cpu"`` by a level or two at most.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import default_collate

from flowprep.dataset import I3D_NORMALIZATION

JPEG_KEYS = ("rgb_jpeg", "rgb_jpeg_ends", "rgb_window")


def collate(items: list[dict]) -> dict:
    """A DataLoader ``collate_fn`` for ``decode="gpu"`` items: ``rgb_jpeg`` (of different
    lengths), ``rgb_jpeg_ends`` and ``rgb_window`` stay lists, one entry an item; the rest as by
    default."""
    batch = default_collate([{k: v for k, v in item.items() if k not in JPEG_KEYS} for item in items])
    batch.update({key: [item[key] for item in items] for key in JPEG_KEYS})
    return batch


def _nvjpeg() -> Callable:
    try:
        from torchvision.io import decode_jpeg
    except Exception as e:  # ImportError, or a torchvision built for another torch (its ops fail to load)
        raise RuntimeError(f"decode='gpu' decodes with torchvision.io.decode_jpeg (nvJPEG), which does not load here "
                           f"({type(e).__name__}: {e}); install the torchvision built for this torch and CUDA, "
                           "or use decode='cpu'") from None
    return decode_jpeg


def decode_clips(batch: dict, device: str | torch.device, normalization: tuple[Sequence[float], Sequence[float]] = I3D_NORMALIZATION,
                 normalize: bool = True) -> torch.Tensor:
    """The RGB clips of a :func:`collate` batch of ``decode="gpu"`` items, decoded on ``device``
    in one batched call: ``[B, 3, T, crop, crop]`` float32 normalized with ``normalization``
    (``(mean, std)`` on the [0, 1] scale, as ClipDataset takes it), or uint8 without ``normalize``."""
    decode = _nvjpeg()
    images = decode(frame_jpegs(batch), device=device)
    return assemble_clips(images, batch, normalization if normalize else None)


def frame_jpegs(batch: dict) -> list[torch.Tensor]:
    """Every frame's JPEG in a :func:`collate` batch, clip after clip: 1-D uint8 views."""
    jpegs = []
    for data, ends in zip(batch["rgb_jpeg"], batch["rgb_jpeg_ends"]):
        starts = [0, *ends[:-1].tolist()]
        jpegs += [data[start:end] for start, end in zip(starts, ends.tolist())]
    return jpegs


def assemble_clips(images: Sequence[torch.Tensor], batch: dict,
                   normalization: tuple[Sequence[float], Sequence[float]] | None) -> torch.Tensor:
    """Decoded frames (``[3, h, w] uint8`` each, the batch's clips one after the other) to clips
    ``[B, 3, T, crop, crop]``: each frame cut to its window, clips flipped where ``batch["flip"]``,
    then ``(x / 255 - mean) / std`` per channel, or uint8 as they are with ``normalization=None``."""
    frames = iter(images)
    clips = []
    for windows in batch["rgb_window"]:
        clip = torch.stack([next(frames)[:, rows, cols] for rows, cols in windows], dim=1)  # [3, T, crop, crop]
        clips.append(clip)
    rgb = torch.stack(clips)
    flip = torch.as_tensor(batch["flip"], device=rgb.device)
    rgb = torch.where(flip.view(-1, 1, 1, 1, 1), rgb.flip(-1), rgb)
    if normalization is None:
        return rgb
    mean, std = (torch.tensor(v, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1, 1) for v in normalization)
    return (rgb.float() / 255 - mean) / std
