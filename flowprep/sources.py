"""Find the videos of a Kinetics-style download.

Two layouts are understood:

* class folders: ``<src>/<split>/<label>/<id>.<ext>`` or ``<src>/<label>/<id>.<ext>``;
* a flat folder with the official annotation CSV (``label,youtube_id,time_start,time_end,split``;
  test CSVs have no ``label``), files named ``<youtube_id>_<start:06d>_<end:06d>.<ext>``, or
  ``<youtube_id>.<ext>`` for full-length sources that ``trim`` cuts to ``[time_start, time_end]``.

The video id is always the file stem. Everything here is plain data: no video is opened.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts"})


@dataclass(frozen=True)
class VideoSpec:
    """One video to extract.

    ``start`` and ``end`` are seconds into the source; ``None`` means its beginning / end.
    ``label`` is ``None`` for unlabeled (test) videos.
    """

    video_id: str
    path: str
    label: str | None = None
    split: str | None = None
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class SourceProblem:
    """A video named by the source that cannot be used (missing file, duplicate id).

    Its ``label`` still counts for the label map, so a partial download maps classes as a full one.
    """

    video_id: str
    source: str
    error: str
    label: str | None = None


def _video_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())


def find_class_folder_videos(src: str | Path) -> tuple[list[VideoSpec], list[SourceProblem]]:
    """Videos of a class-folder layout, sorted by path.

    A file directly under ``src`` has no label; ``<label>/<id>`` has a label; ``<split>/<label>/<id>``
    has both. A second file with an id already seen is a :class:`SourceProblem`.
    """
    root = Path(src)
    specs: list[VideoSpec] = []
    problems: list[SourceProblem] = []
    seen: dict[str, str] = {}
    for path in _video_files(root):
        parts = path.relative_to(root).parts
        if len(parts) > 3:
            problems.append(SourceProblem(path.stem, str(path), f"unexpected folder depth {len(parts) - 1} (want 0-2)"))
            continue
        video_id = path.stem
        if video_id in seen:
            problems.append(SourceProblem(video_id, str(path), f"duplicate video id, already found at {seen[video_id]}"))
            continue
        seen[video_id] = str(path)
        label = parts[-2] if len(parts) >= 2 else None
        split = parts[0] if len(parts) == 3 else None
        specs.append(VideoSpec(video_id, str(path), label, split))
    return specs, problems


def read_annotations(csv_path: str | Path) -> list[dict[str, str]]:
    """Rows of a Kinetics annotation CSV as dicts (``youtube_id``, ``time_start``, ``time_end`` required)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    required = {"youtube_id", "time_start", "time_end"}
    if rows and not required <= rows[0].keys():
        raise ValueError(f"{csv_path}: annotation CSV needs columns {sorted(required)}, has {sorted(rows[0])}")
    return rows


def find_annotated_videos(
    src: str | Path, annotations: str | Path, trim: bool = False
) -> tuple[list[VideoSpec], list[SourceProblem]]:
    """Videos named by an annotation CSV, found anywhere under ``src``, in CSV order.

    A clip file ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` is used as it is. Without it, a
    full-length ``<youtube_id>.<ext>`` is used, cut to the row's segment when ``trim`` is set.
    A row with neither file is a :class:`SourceProblem`.
    """
    by_stem: dict[str, Path] = {}
    for path in _video_files(Path(src)):
        by_stem.setdefault(path.stem, path)
    specs: list[VideoSpec] = []
    problems: list[SourceProblem] = []
    seen: set[str] = set()
    for row in read_annotations(annotations):
        youtube_id = row["youtube_id"]
        start, end = float(row["time_start"]), float(row["time_end"])
        clip_id = f"{youtube_id}_{int(start):06d}_{int(end):06d}"
        label = row.get("label") or None
        split = row.get("split") or None
        video_id = clip_id if clip_id in by_stem else youtube_id
        if video_id in seen:
            problems.append(SourceProblem(video_id, str(by_stem.get(video_id, clip_id)), "duplicate video id in the annotations", label))
            continue
        seen.add(video_id)
        if clip_id in by_stem:
            specs.append(VideoSpec(clip_id, str(by_stem[clip_id]), label, split))
        elif youtube_id in by_stem:
            segment = (start, end) if trim else (None, None)
            specs.append(VideoSpec(youtube_id, str(by_stem[youtube_id]), label, split, *segment))
        else:
            problems.append(SourceProblem(clip_id, str(Path(src) / f"{clip_id}.*"), "file not found", label))
    return specs, problems


def find_videos(
    src: str | Path, annotations: str | Path | None = None, trim: bool = False
) -> tuple[list[VideoSpec], list[SourceProblem]]:
    """The videos under ``src``: from ``annotations`` when given, else from the class folders."""
    if not Path(src).is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    if annotations is not None:
        return find_annotated_videos(src, annotations, trim)
    return find_class_folder_videos(src)


def build_label_map(labels: Iterable[str | None], labels_file: str | Path | None = None) -> dict[str, int]:
    """Class name to index: the sorted distinct ``labels`` (``None`` skipped), or one name a line of
    ``labels_file``, which must hold every label."""
    found = {label for label in labels if label is not None}
    if labels_file is not None:
        names = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"{labels_file}: a class name appears twice")
        unknown = sorted(found - set(names))
        if unknown:
            raise ValueError(f"{labels_file} lacks classes found in the source: {unknown[:10]}")
    else:
        names = sorted(found)
    return {name: i for i, name in enumerate(names)}
