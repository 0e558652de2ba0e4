"""``ClipDataset``: fixed-length clips of RGB and/or flow as torch tensors, for training and evaluation.

Reads shards through :class:`~flowprep.shards.ShardReader`: no video decoder, no flow solver.
Files are opened lazily in whichever process reads them, so the dataset works under DataLoader
workers started by fork or spawn, persistent or not.

Sampling. Clip frames are ``start, start + stride, ...`` (``clip_len`` of them). With flow among
the modalities a video of N frames offers N-1 positions (the last frame has no flow), so RGB
frame ``i`` and flow ``i`` always come together. Training draws a random start; evaluation takes
the centre clip, or ``num_clips`` clips spread uniformly, each at the centre crop or at
``num_crops`` crop positions. A video shorter than the clip span is looped: frame indices wrap
around to its beginning.

Randomness (start, crop, flip) comes from ``(seed, epoch, index)`` only, so the same seed gives
the same clips in any worker layout. :class:`ClipSampler` carries the epoch to the workers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from flowprep.clips import clip_indices, clip_span, crop_positions, float_flow, flow_lookup_tables
from flowprep.errors import OptionError
from flowprep.shards.reader import ShardReader

# Mean and std of RGB on the [0, 1] scale.
I3D_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [-1, 1], as I3D and S3D-G (TF) take it
KINETICS_NORMALIZATION = ((0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989))  # torchvision's video models

log = logging.getLogger(__name__)

_configured_pid: int | None = None


class MissingTeacher(FileNotFoundError):
    """``ClipDataset(teacher=NAME)`` on a folder that holds no targets of that name."""


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


class ClipDataset(Dataset):
    """Clips of one or more extract output folders.

    Args:
        shards: an output folder of ``flowprep extract`` or a list of them.
        modalities: ``("rgb",)``, ``("flow",)`` or ``("rgb", "flow")``; flow needs outputs
            extracted with flow (not ``--flow none``).
        clip_len: frames per clip (T).
        frame_stride: step between clip frames.
        crop: side of the square crop in pixels (random when training, centred otherwise).
        train: random start, crop and flip; else deterministic evaluation clips.
        flip: horizontal flips when training (flow x is negated with the image).
        flip_swap: pairs of class names that a horizontal flip turns into each other, for
            classes defined by a left-right direction (``[("left", "right")]``): a mirrored clip
            of one class is labelled the other. Every name must be in each folder's label map,
            and at most once. Other classes keep their label when flipped.
        seed: base of every random draw.
        split: only videos of this split (``None``: all).
        num_clips: evaluation clips per video, spread uniformly (1: the centre clip).
        num_crops: evaluation crops per clip (:func:`~flowprep.clips.crop_positions`): spread
            evenly along the long side, both ends included, centred on the short side (1: the
            centre crop; 3: both ends and the centre). A video's ``num_clips * num_crops`` items
            (:attr:`views_per_video`) are consecutive, clip by clip, crops within a clip.
        normalization: ``(mean, std)`` of RGB on the [0, 1] scale; default: I3D's [-1, 1].
        normalize: ``False`` returns uint8 tensors (RGB 0-255, flow ``q``, flipped flow x as
            ``255 - q``) to be normalized on the GPU: a quarter of the bytes through the
            DataLoader's shared memory. Flow stays float32 in [-1, 1] when a folder stores float16
            flow (every item's flow then has the same type).
        teacher: the name of targets stored by ``flowprep teacher`` in every folder. Training
            draws one of the stored views (start, crop position, flip) uniformly and returns
            the clip of exactly that view; evaluation clips are stored views too (unflipped, the
            crop position nearest the centre, starts spread over the grid's:
            :meth:`~flowprep.teacher.views.ViewGrid.eval_views`), each with its own target. ``clip_len``, ``frame_stride`` and ``crop`` must be the teacher's;
            starts count flow positions (N-1 for N frames) whatever the modalities. Videos
            without targets are left out (with a warning).
        teacher_outputs: the stored outputs to return (``logits``, ``embedding``, layer names).
        verify: check each video's stored bytes against its index checksum the first time it is
            read, in each DataLoader worker (``ShardReader(verify=True)``: one extra read of the
            whole video, about 10 ms for a 10 s clip). Damage that decodes to another frame shape
            is an error either way.

        decode: ``"gpu"`` leaves RGB to be decoded on the training GPU (JPEG shards only): items
            carry ``rgb_jpeg`` (1-D uint8: the T frames' JPEGs, each cut to the MCUs around the
            crop, back to back), ``rgb_jpeg_ends`` (``[T]`` int64: where each ends) and
            ``rgb_window`` (where the crop lies in each) instead of ``rgb``; batch
            them with :func:`flowprep.gpu_decode.collate` and decode with
            :func:`flowprep.gpu_decode.decode_clips`. Flow is decoded here either way.

    Items are dicts: ``rgb`` float32 ``[3, T, crop, crop]``, ``flow`` float32 ``[2, T, crop, crop]``
    in [-1, 1] (``q / 127.5 - 1``, x then y; float16 shards: pixels / bound), ``label`` (int,
    -1 when unlabeled), ``video_id``, ``start`` (first frame index), ``crop`` (``(top, left)``
    pixels), ``flip`` (bool); with a teacher ``teacher_<output>`` float32 ``[dim]`` each
    (``teacher_logits``: ``[C]``).
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
        flip_swap: Sequence[tuple[str, str]] = (),
        seed: int = 0,
        split: str | None = None,
        num_clips: int = 1,
        num_crops: int = 1,
        normalization: tuple[Sequence[float], Sequence[float]] = I3D_NORMALIZATION,
        normalize: bool = True,
        teacher: str | None = None,
        teacher_outputs: Sequence[str] = ("logits",),
        verify: bool = False,
        decode: str = "cpu",
    ):
        if not modalities or set(modalities) - {"rgb", "flow"}:
            raise ValueError(f"modalities must be rgb and/or flow, not {modalities}")
        if clip_len < 1 or frame_stride < 1 or crop < 1 or num_clips < 1 or num_crops < 1:
            raise ValueError("clip_len, frame_stride, crop, num_clips and num_crops must be positive")
        if teacher and not train and num_crops > 1:
            raise ValueError("evaluation clips with a teacher are its stored views at the centre crop: num_crops must be 1")
        # OpenCV's thread pool does not survive a fork (DataLoader workers hang in it): the process
        # that makes the dataset decodes with one OpenCV thread, its workers are the parallelism.
        cv2.setNumThreads(1)
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be cpu or gpu, not {decode!r}")
        folders = [shards] if isinstance(shards, (str, Path)) else list(shards)
        self.readers = [ShardReader(f, verify=verify) for f in folders]
        if decode == "gpu" and "rgb" in modalities:
            for reader in self.readers:
                if not reader.dataset["params"]["rgb_codec"].startswith("jpeg"):
                    raise ValueError(f"decode='gpu' decodes JPEG frames: {reader.out} stores RGB as {reader.dataset['params']['rgb_codec']}")
        self.decode = decode
        if "flow" in modalities:
            for reader in self.readers:
                reader.require_flow()  # an RGB-only output (extract --flow none)
        self.modalities = tuple(modalities)
        self.clip_len, self.frame_stride, self.crop = clip_len, frame_stride, crop
        self.train, self.flip, self.seed = train, flip, seed
        self._flipped_labels = [flipped_labels(reader, flip_swap) for reader in self.readers] if flip_swap else None
        self.num_clips = 1 if train else num_clips
        self.num_crops = 1 if train else num_crops
        # Lookup tables, one per channel, from stored uint8 to the returned value: one pass over
        # the clip. RGB: (v / 255 - mean) / std; flow: q / 127.5 - 1, negated for x when flipped.
        # Unnormalized: v, q, and 255 - q for flipped x.
        levels = np.arange(256)
        if normalize:
            mean, std = (np.asarray(v).reshape(3, 1) for v in normalization)
            self._rgb_lut = ((levels / 255 - mean) / std).astype(np.float32)
        else:
            self._rgb_lut = None
        raw_flow = not normalize and all(r.flow_dtype == np.uint8 for r in self.readers if r.has_flow)
        self._flow_luts = flow_lookup_tables(normalize=not raw_flow)
        self.epoch = 0
        self.targets = [self._open_teacher(f, teacher, teacher_outputs) for f in folders] if teacher else None
        self.teacher_outputs = tuple(teacher_outputs)
        self.videos: list[tuple[int, str]] = []
        missing = 0
        for r, reader in enumerate(self.readers):
            for video_id in reader.video_ids:
                meta = reader.meta(video_id)
                if split is not None and meta["split"] != split:
                    continue
                if self.targets and video_id not in self.targets[r]:
                    missing += 1
                    continue
                if min(meta["height"], meta["width"]) < crop:
                    raise OptionError(f"{reader.out}: {video_id} is {meta['height']}x{meta['width']}, smaller than crop {crop}: "
                                      "extract with a larger --short-side or use a smaller crop", "crop")
                self.videos.append((r, video_id))
        if missing:
            log.warning("%d videos have no targets of teacher %r (see its failures.jsonl) and are left out", missing, teacher)

    def _open_teacher(self, folder, name: str, outputs: Sequence[str]):
        from flowprep.teacher.targets import TeacherTargets

        try:
            targets = TeacherTargets(folder, name)
        except FileNotFoundError as e:
            raise MissingTeacher(str(e)) from None
        except ValueError as e:  # a name that is not a folder name, targets on object storage, another schema
            raise OptionError(str(e), "teacher") from None
        grid = targets.grid
        ours = {"clip_len": self.clip_len, "frame_stride": self.frame_stride, "crop": self.crop}
        stored = {"clip_len": grid.clip_len, "frame_stride": grid.frame_stride, "crop": grid.crop}
        differ = [key for key in ours if ours[key] != stored[key]]
        if differ:
            raise OptionError(f"teacher {name!r} stored {', '.join(f'{k} {v}' for k, v in stored.items())}; "
                              f"this dataset asks {', '.join(f'{k} {v}' for k, v in ours.items())}", differ[0])
        unknown = set(outputs) - set(targets.outputs)
        if unknown:
            raise OptionError(f"teacher {name!r} stored {sorted(targets.outputs)}, not {sorted(unknown)}", "teacher_outputs")
        return targets

    @property
    def views_per_video(self) -> int:
        """Items per video: ``num_clips * num_crops`` when evaluating, 1 when training."""
        return self.num_clips * self.num_crops

    def __len__(self) -> int:
        return len(self.videos) * self.views_per_video

    def set_epoch(self, epoch: int) -> None:
        """The epoch for items asked by plain index (a :class:`ClipSampler` passes its own)."""
        self.epoch = epoch

    def meta(self, index: int) -> dict:
        r, video_id = self.videos[index // self.views_per_video]
        return self.readers[r].meta(video_id)

    @property
    def labels(self) -> list[int]:
        """The label of each item's video, in item order: each item's label but for flipped
        training clips of ``flip_swap`` classes, which carry the other class of their pair."""
        return [self.meta(i)["label_index"] for i in range(len(self))]

    def _positions(self, meta: dict) -> int:
        return meta["num_frames"] - 1 if "flow" in self.modalities or self.targets else meta["num_frames"]

    def _start(self, length: int, clip: int, rng: np.random.Generator) -> int:
        room = max(length - clip_span(self.clip_len, self.frame_stride), 0)
        if self.train:
            return int(rng.integers(0, room + 1))
        if self.num_clips == 1:
            return room // 2
        return round(clip * room / (self.num_clips - 1))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        if not 0 <= index < len(self):  # an item's draws come from its index: no negative indices
            raise IndexError(f"item {index} is out of range: this ClipDataset has {len(self)} items")
        _configure_worker_threads()
        r, video_id = self.videos[index // self.views_per_video]
        clip, position = divmod(index % self.views_per_video, self.num_crops)
        reader = self.readers[r]
        meta = reader.meta(video_id)
        rng = np.random.default_rng([self.seed, epoch, index])
        length = self._positions(meta)
        h, w = meta["height"], meta["width"]
        targets = self.targets[r] if self.targets else None
        if self.train and targets:
            views = [v for v in targets.views(video_id) if self.flip or not v.flip]
            start, y, x, flip = views[int(rng.integers(0, len(views)))]
        elif targets:
            start, y, x, flip = targets.eval_views(video_id, self.num_clips)[clip]
        elif self.train:
            start = self._start(length, 0, rng)
            y, x = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
            flip = self.flip and bool(rng.integers(0, 2))
        else:
            start = self._start(length, clip, rng)
            (y, x), flip = crop_positions(h, w, self.crop, self.num_crops)[position], False
        frames = clip_indices(length, self.clip_len, self.frame_stride, start).tolist()
        window = (slice(y, y + self.crop), slice(x, x + self.crop))
        label = meta["label_index"]
        if flip and self._flipped_labels and label >= 0:
            label = self._flipped_labels[r][label]
        item = {"label": label, "video_id": video_id, "start": start, "crop": (y, x), "flip": flip}
        if targets:
            stored = targets.get(video_id, start, y, x, flip)
            item.update({f"teacher_{name}": torch.from_numpy(stored[name]) for name in self.teacher_outputs})
        if "rgb" in self.modalities and self.decode == "gpu":
            jpegs = reader.rgb_jpegs(video_id, frames, window)
            # One tensor for the clip's JPEGs: a DataLoader worker sends each tensor through its own
            # shared memory segment, and 64 small ones cost more than cutting them.
            item["rgb_jpeg"] = torch.frombuffer(bytearray(b"".join(jpeg for jpeg, _ in jpegs)), dtype=torch.uint8)
            item["rgb_jpeg_ends"] = torch.tensor(np.cumsum([len(jpeg) for jpeg, _ in jpegs]))
            item["rgb_window"] = [inside for _, inside in jpegs]
        elif "rgb" in self.modalities:
            rgb = reader.rgb_at(video_id, frames, window, planar=True)  # [3, T, crop, crop] uint8
            item["rgb"] = self._values(rgb, flip, self._rgb_lut)
        if "flow" in self.modalities:
            stored = reader.flow_at(video_id, frames, raw=True, window=window, planar=True)  # [2, T, crop, crop]
            if stored.dtype == np.uint8:
                item["flow"] = self._values(stored, flip, self._flow_luts[flip])
            else:  # float16 shards: pixels / bound
                item["flow"] = float_flow(torch.from_numpy(np.ascontiguousarray(stored[..., ::-1] if flip else stored)),
                                          reader.flow_bound, flip)
        return item

    @staticmethod
    def _values(planar: np.ndarray, flip: bool, lut: np.ndarray | None) -> torch.Tensor:
        """Planar ``[C, T, H, W] uint8`` frames (overwritten) to the item's tensor: mirrored
        left-right when ``flip``, then through per-channel lookup tables (``None``: as they are).
        OpenCV's flip and LUT, in place and per plane: numpy's fancy indexing is 10x slower."""
        rows = planar.reshape(-1, planar.shape[-1])
        if flip:
            cv2.flip(rows, 1, dst=rows)
        if lut is None:
            return torch.from_numpy(planar)
        out = np.empty(planar.shape, lut.dtype)
        for c in range(planar.shape[0]):
            cv2.LUT(planar[c].reshape(-1, planar.shape[-1]), lut[c], dst=out[c].reshape(-1, planar.shape[-1]))
        return torch.from_numpy(out)


def flipped_labels(reader: ShardReader, pairs: Sequence[tuple[str, str]]) -> list[int]:
    """The label of a mirrored clip, by label index, for the class-name ``pairs`` that a flip
    swaps (:class:`ClipDataset`'s ``flip_swap``); an unknown or repeated name is an
    :class:`OptionError` on ``flip_swap``."""
    if any(len(pair) != 2 for pair in pairs):
        raise OptionError(f"flip_swap takes pairs of class names, not {list(pairs)}", "flip_swap")
    label_map = reader.label_map
    names = [name for pair in pairs for name in pair]
    unknown = [name for name in names if name not in label_map]
    if unknown:
        raise OptionError(f"{', '.join(map(repr, unknown))} not a class of {reader.out} (its classes: {', '.join(label_map)})",
                          "flip_swap")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise OptionError(f"{', '.join(map(repr, repeated))} in more than one pair", "flip_swap")
    labels = list(range(len(label_map)))
    for a, b in pairs:
        labels[label_map[a]], labels[label_map[b]] = label_map[b], label_map[a]
    return labels


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
