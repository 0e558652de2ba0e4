"""The view grid: which clips of a video get a stored teacher target.

A *view* is ``(start, top, left, flip)``: the clip of ``clip_len`` flow positions
``start, start + frame_stride, ...`` (wrapped at the video's end, as :class:`ClipDataset` does),
the ``crop x crop`` square at ``(top, left)``, mirrored or not. :class:`ViewGrid` lists a video's
views in one fixed order; ``flowprep teacher`` writes targets in that order and
:class:`~flowprep.teacher.targets.TeacherTargets` finds a view's row from it by arithmetic, so the
writer and the reader can never disagree on which row is which view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from flowprep.clips import clip_span, crop_positions


VIEWS_RULE = ("starts every window_stride flow positions while the clip fits (start 0 only, wrapped, for a video "
              "shorter than the clip span); crops positions spread evenly along the long side, both ends included "
              "(1: centre), centred on the short side; unflipped then flipped; rows ordered by start, crop, flip")


class View(NamedTuple):
    start: int  # first flow position of the clip
    top: int  # crop's first row, pixels
    left: int  # crop's first column, pixels
    flip: bool  # mirrored: image columns reversed and flow x negated


@dataclass(frozen=True)
class ViewGrid:
    """The views of a video of ``positions`` flow positions (``num_frames - 1``) and ``height x width`` pixels.

    * starts: ``0, window_stride, 2 * window_stride, ...`` while the clip fits; a video shorter
      than the clip span has the single start 0 (its clip wraps around);
    * crops: ``crops`` positions spread evenly along the long side, both ends included (1: the
      centre), centred on the short side; positions that coincide (a square video) count once;
    * flips: unflipped, then flipped when ``flip``.

    Order: start, then crop position, then flip (row ``(s * n_crops + c) * n_flips + f``).
    """

    clip_len: int = 64
    frame_stride: int = 1
    crop: int = 224
    window_stride: int = 16
    crops: int = 3
    flip: bool = True

    def __post_init__(self):
        if min(self.clip_len, self.frame_stride, self.crop, self.window_stride, self.crops) < 1:
            raise ValueError("clip_len, frame_stride, crop, window_stride and crops must be positive")

    @property
    def span(self) -> int:
        """Flow positions one clip covers, first to last inclusive."""
        return clip_span(self.clip_len, self.frame_stride)

    def starts(self, positions: int) -> range:
        return range(0, max(positions - self.span, 0) + 1, self.window_stride)

    def corners(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(top, left)`` of each crop position (:func:`~flowprep.clips.crop_positions`, each once)."""
        return list(dict.fromkeys(crop_positions(height, width, self.crop, self.crops)))

    def flips(self) -> tuple[bool, ...]:
        return (False, True) if self.flip else (False,)

    def views(self, positions: int, height: int, width: int) -> list[View]:
        """Every view of a video, in row order."""
        corners = self.corners(height, width)
        return [View(s, top, left, f) for s in self.starts(positions) for top, left in corners for f in self.flips()]

    def count(self, positions: int, height: int, width: int) -> int:
        """``len(self.views(...))`` without listing them."""
        return len(self.starts(positions)) * len(self.corners(height, width)) * len(self.flips())

    def row(self, view: View, positions: int, height: int, width: int) -> int:
        """The position of ``view`` in :meth:`views`; ``KeyError`` for a view not on the grid."""
        start, top, left, flip = view
        starts, corners = self.starts(positions), self.corners(height, width)
        if start not in starts or (top, left) not in corners or flip not in self.flips():
            raise KeyError(f"{tuple(view)} is not on the grid: starts {starts.start}..{starts.stop - 1} every "
                           f"{starts.step}, crops at {corners}, flips {self.flips()}")
        return (starts.index(start) * len(corners) + corners.index((top, left))) * len(self.flips()) + self.flips().index(flip)

    def centre(self, positions: int, height: int, width: int) -> View:
        """The unflipped view nearest to an evaluation clip: the start nearest the centre clip's
        (``(positions - span) // 2``) and the crop position nearest the centre crop."""
        return self.eval_views(positions, height, width, 1)[0]

    def eval_views(self, positions: int, height: int, width: int, clips: int) -> list[View]:
        """The views that ``clips`` evaluation clips of a video take, unflipped, at the crop
        position nearest the centre crop: for one clip the start nearest the centre clip's
        (``(positions - span) // 2``), for more the grid's starts spread evenly from the first to
        the last (a start repeats when the grid has fewer than ``clips``)."""
        starts = self.starts(positions)
        if clips == 1:
            middle = max(positions - self.span, 0) // 2
            chosen = [min(starts, key=lambda s: (abs(s - middle), s))]
        else:
            chosen = [starts[round(k * (len(starts) - 1) / (clips - 1))] for k in range(clips)]
        centre = ((height - self.crop) // 2, (width - self.crop) // 2)
        top, left = min(self.corners(height, width), key=lambda c: abs(c[0] - centre[0]) + abs(c[1] - centre[1]))
        return [View(start, top, left, False) for start in chosen]

    def to_dict(self) -> dict:
        return {"clip_len": self.clip_len, "frame_stride": self.frame_stride, "crop": self.crop,
                "window_stride": self.window_stride, "crops": self.crops, "flip": self.flip}
