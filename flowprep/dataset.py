"""``ClipDataset``: fixed-length clips of RGB and/or flow as torch tensors, for training and evaluation.

Reads shards through :class:`~flowprep.shards.ShardReader`: no video decoder, no flow solver.
Files are opened lazily in whichever process reads them, so the dataset works under DataLoader
workers started by fork or spawn, persistent or not.

Sampling. Clip frames are ``start, start + stride, ...`` (``clip_len`` of them). With flow among
the modalities a video of N frames offers N-1 positions (the last frame has no flow), so RGB
frame ``i`` and flow ``i`` always come together. Training draws a random start; evaluation takes
the centre clip, or ``num_clips`` clips spread uniformly. A video shorter than the clip span is
looped: frame indices wrap around to its beginning.

Randomness (start, crop, flip) comes from ``(seed, epoch, index)`` only, so the same seed gives
the same clips in any worker layout. :class:`ClipSampler` carries the epoch to the workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from flowprep.shards.reader import ShardReader

# Mean and std of RGB on the [0, 1] scale.
I3D_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [-1, 1], as I3D and S3D-G (TF) take it
KINETICS_NORMALIZATION = ((0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989))  # torchvision's video models

_configured_pid: int | None = None


def _configure_worker_threads() -> None:
    """One OpenCV and one torch thread in each DataLoader worker: the workers are the parallelism."""
    global _configured_pid
    if _configured_pid != os.getpid():
        _configured_pid = os.getpid()
        if torch.utils.data.get_worker_info() is not None:
            # A forked worker inherits the creator's single thread; reconfiguring OpenCV's thread
            # pool after a fork hangs, so only a spawned worker (a fresh OpenCV) sets it.
            if cv2.getNumThreads() != 1:
                cv2.setNumThreads(1)
            torch.set_num_threads(1)


def clip_indices(length: int, clip_len: int, stride: int, start: int) -> np.ndarray:
    """Frame indices of a clip: ``start + stride * j`` for ``j < clip_len``, wrapped at ``length``."""
    return (start + stride * np.arange(clip_len)) % length


class ClipDataset(Dataset):
    """Clips of one or more extract output folders.

    Args:
        shards: an output folder of ``flowprep extract`` or a list of them.
        modalities: ``("rgb",)``, ``("flow",)`` or ``("rgb", "flow")``.
        clip_len: frames per clip (T).
        frame_stride: step between clip frames.
        crop: side of the square crop in pixels (random when training, centred otherwise).
        train: random start, crop and flip; else deterministic evaluation clips.
        flip: horizontal flips when training (flow x is negated with the image).
        seed: base of every random draw.
        split: only videos of this split (``None``: all).
        num_clips: evaluation clips per video, spread uniformly (1: the centre clip).
        normalization: ``(mean, std)`` of RGB on the [0, 1] scale; default: I3D's [-1, 1].
        normalize: ``False`` returns uint8 tensors (RGB 0-255, flow ``q``, flipped flow x as
            ``255 - q``) to be normalized on the GPU: a quarter of the bytes through the
            DataLoader's shared memory (uint8 flow shards only).

    Items are dicts: ``rgb`` float32 ``[3, T, crop, crop]``, ``flow`` float32 ``[2, T, crop, crop]``
    in [-1, 1] (``q / 127.5 - 1``, x then y; float16 shards: pixels / bound), ``label`` (int,
    -1 when unlabeled), ``video_id``, ``start`` (first frame index), ``flip`` (bool).
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        modalities: Sequence[str] = ("rgb",),
        clip_len: int = 64,
        frame_stride: int = 1,
        crop: int = 224,
        train: bool = True,
        flip: bool = True,
        seed: int = 0,
        split: str | None = None,
        num_clips: int = 1,
        normalization: tuple[Sequence[float], Sequence[float]] = I3D_NORMALIZATION,
        normalize: bool = True,
    ):
        if not modalities or set(modalities) - {"rgb", "flow"}:
            raise ValueError(f"modalities must be rgb and/or flow, not {modalities}")
        if clip_len < 1 or frame_stride < 1 or crop < 1 or num_clips < 1:
            raise ValueError("clip_len, frame_stride, crop and num_clips must be positive")
        # OpenCV's thread pool does not survive a fork (DataLoader workers hang in it): the process
        # that makes the dataset decodes with one OpenCV thread, its workers are the parallelism.
        cv2.setNumThreads(1)
        folders = [shards] if isinstance(shards, (str, Path)) else list(shards)
        self.readers = [ShardReader(f) for f in folders]
        if not normalize and "flow" in modalities and any(r.flow_dtype != np.uint8 for r in self.readers):
            raise ValueError("normalize=False returns stored uint8 flow: these shards hold float16 flow")
        self.modalities = tuple(modalities)
        self.clip_len, self.frame_stride, self.crop = clip_len, frame_stride, crop
        self.train, self.flip, self.seed = train, flip, seed
        self.num_clips = 1 if train else num_clips
        # Lookup tables, one per channel, from stored uint8 to the returned value: one pass over
        # the clip. RGB: (v / 255 - mean) / std; flow: q / 127.5 - 1, negated for x when flipped.
        # Unnormalized: v, q, and 255 - q for flipped x.
        levels = np.arange(256)
        if normalize:
            mean, std = (np.asarray(v).reshape(3, 1) for v in normalization)
            self._rgb_lut = ((levels / 255 - mean) / std).astype(np.float32)
            flow = (levels / 127.5 - 1).astype(np.float32)
            self._flow_luts = {False: np.stack([flow, flow]), True: np.stack([-flow, flow])}
        else:
            self._rgb_lut = np.tile(levels, (3, 1)).astype(np.uint8)
            self._flow_luts = {False: np.stack([levels, levels]).astype(np.uint8), True: np.stack([255 - levels, levels]).astype(np.uint8)}
        self.epoch = 0
        self.videos: list[tuple[int, str]] = []
        for r, reader in enumerate(self.readers):
            for video_id in reader.video_ids:
                meta = reader.meta(video_id)
                if split is not None and meta["split"] != split:
                    continue
                if min(meta["height"], meta["width"]) < crop:
                    raise ValueError(f"{reader.out}: {video_id} is {meta['height']}x{meta['width']}, smaller than crop {crop}: "
                                     "extract with a larger --short-side or use a smaller crop")
                self.videos.append((r, video_id))

    def __len__(self) -> int:
        return len(self.videos) * self.num_clips

    def set_epoch(self, epoch: int) -> None:
        """The epoch for items asked by plain index (a :class:`ClipSampler` passes its own)."""
        self.epoch = epoch

    def meta(self, index: int) -> dict:
        r, video_id = self.videos[index // self.num_clips]
        return self.readers[r].meta(video_id)

    @property
    def labels(self) -> list[int]:
        """The label of each item, in item order."""
        return [self.meta(i)["label_index"] for i in range(len(self))]

    def _positions(self, meta: dict) -> int:
        return meta["num_frames"] - 1 if "flow" in self.modalities else meta["num_frames"]

    def _start(self, length: int, clip: int, rng: np.random.Generator) -> int:
        span = (self.clip_len - 1) * self.frame_stride + 1
        room = max(length - span, 0)
        if self.train:
            return int(rng.integers(0, room + 1))
        if self.num_clips == 1:
            return room // 2
        return round(clip * room / (self.num_clips - 1))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        _configure_worker_threads()
        r, video_id = self.videos[index // self.num_clips]
        reader = self.readers[r]
        meta = reader.meta(video_id)
        rng = np.random.default_rng([self.seed, epoch, index])
        length = self._positions(meta)
        start = self._start(length, index % self.num_clips, rng)
        frames = clip_indices(length, self.clip_len, self.frame_stride, start).tolist()
        h, w = meta["height"], meta["width"]
        if self.train:
            y, x = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
            flip = self.flip and bool(rng.integers(0, 2))
        else:
            y, x, flip = (h - self.crop) // 2, (w - self.crop) // 2, False
        window = (slice(y, y + self.crop), slice(x, x + self.crop))
        item = {"label": meta["label_index"], "video_id": video_id, "start": start, "flip": flip}
        if "rgb" in self.modalities:
            rgb = reader.rgb_at(video_id, frames, window)  # [T, crop, crop, 3] uint8
            item["rgb"] = self._planar(rgb[:, :, ::-1] if flip else rgb, self._rgb_lut)
        if "flow" in self.modalities:
            stored = reader.flow_at(video_id, frames, raw=True, window=window)  # [T, crop, crop, 2]
            if flip:
                stored = stored[:, :, ::-1]
            if stored.dtype == np.uint8:
                item["flow"] = self._planar(stored, self._flow_luts[flip])
            else:  # float16 shards: pixels / bound
                flow = np.clip(stored.astype(np.float32) / reader.flow_bound, -1, 1) * (np.float32([-1, 1]) if flip else 1)
                item["flow"] = torch.from_numpy(np.ascontiguousarray(flow.transpose(3, 0, 1, 2)))
        return item

    def _planar(self, frames: np.ndarray, lut: np.ndarray) -> torch.Tensor:
        """``[T, H, W, C] uint8`` to a ``[C, T, H, W]`` tensor through per-channel lookup tables."""
        planar = np.ascontiguousarray(frames.transpose(3, 0, 1, 2))
        out = np.empty(planar.shape, lut.dtype)
        for c in range(planar.shape[0]):
            np.take(lut[c], planar[c], out=out[c])
        return torch.from_numpy(out)


class ClipSampler(Sampler):
    """Splits a dataset's items over ``num_replicas`` ranks for distributed training.

    Each epoch's order is a permutation seeded by ``(seed, epoch)`` (or item order without
    ``shuffle``), the same on every rank; rank ``r`` takes every ``num_replicas``-th item from
    position ``r``. Every item goes to exactly one rank. When the count does not divide evenly,
    the first items of the order are repeated to fill the last round (``drop_last``: the
    remainder is dropped instead), so every rank has the same number of items and batches and
    DDP never waits on a rank that ran out. Yields ``(index, epoch)``, which :class:`ClipDataset`
    uses for its random draws, so persistent workers see the epoch too.

    ``num_replicas`` and ``rank`` default to torch.distributed's when it is initialised, else 1 and 0.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else torch.distributed.get_world_size() if distributed else 1
        self.rank = rank if rank is not None else torch.distributed.get_rank() if distributed else 0
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        self.size = len(dataset)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(self.size / self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        total = len(self) * self.num_replicas
        order = order[:total] if self.drop_last else np.resize(order, total)  # np.resize repeats from the start
        return ((int(i), self.epoch) for i in order[self.rank :: self.num_replicas])
