"""Find the videos of a Kinetics-style download.

Two layouts are understood:

* class folders: ``<src>/<split>/<label>/<id>.<ext>`` or ``<src>/<label>/<id>.<ext>``;
* a flat folder with the official annotation CSV (``label,youtube_id,time_start,time_end,split``;
  test CSVs have no ``label``), files named ``<youtube_id>_<start:06d>_<end:06d>.<ext>``, or
  ``<youtube_id>.<ext>`` for full-length sources that ``trim`` cuts to ``[time_start, time_end]``.

The video id is always the file stem, checked here once for every layout
(:func:`video_id_problem`): an id that cannot name a folder, an HDF5 group or a line of a list
file is a :class:`SourceProblem`, as are dangling symbolic links. Symlinked folders are followed.
Everything here is plain data: no video is opened.
"""

from __future__ import annotations

import csv
import math
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flowprep.errors import OptionError

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


def video_id_problem(video_id: str) -> str | None:
    """Why ``video_id`` cannot name a video, or ``None`` when it can. Ids become folder names
    (export), HDF5 group names and words of list files, so an id must not be empty, ``.`` or
    ``..``, nor hold a path separator, a newline or any other control character."""
    if not video_id:
        return "empty video id"
    if video_id in (".", ".."):
        return f"video id {video_id!r} names a folder, not a video"
    if "/" in video_id or "\\" in video_id:
        return f"video id {video_id!r} holds a path separator"
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in video_id):
        return f"video id {video_id!r} holds a newline or control character"
    return None


def _dangling_link_problem(path: Path) -> str | None:
    """The reason a found video file cannot be read when it is a symbolic link to nothing."""
    if path.is_symlink() and not path.exists():
        return f"dangling symbolic link to {os.readlink(path)}"
    return None


def _video_files(root: Path) -> list[Path]:
    """Files with a video extension under ``root``, dangling symbolic links included, sorted.

    Symlinked folders are followed; a folder reached twice (through two links, or a link back to
    a folder above it) is walked once, under the first name found (shallower names first, then
    in sorted order).
    """
    walked = {_folder_key(root)}
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in sorted(subfolders) if _first_visit(Path(folder, d), walked)]
        found += [Path(folder, n) for n in names if Path(n).suffix.lower() in VIDEO_EXTENSIONS]
    return sorted(p for p in found if p.is_file() or p.is_symlink())


def _folder_key(folder: Path) -> tuple[int, int]:
    info = folder.stat()
    return info.st_dev, info.st_ino


def _first_visit(folder: Path, walked: set[tuple[int, int]]) -> bool:
    """Whether ``folder`` (followed through links) is not yet in ``walked``; adds it."""
    try:
        key = _folder_key(folder)
    except OSError:  # unreadable: os.walk skips it as well
        return False
    if key in walked:
        return False
    walked.add(key)
    return True


def find_class_folder_videos(src: str | Path) -> tuple[list[VideoSpec], list[SourceProblem]]:
    """Videos of a class-folder layout, sorted by path.

    A file directly under ``src`` has no label; ``<label>/<id>`` has a label; ``<split>/<label>/<id>``
    has both (the names of the folders as reached, through symbolic links or not). A dangling
    link, an id :func:`video_id_problem` refuses, or a second file with an id already seen is a
    :class:`SourceProblem`.
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
        label = parts[-2] if len(parts) >= 2 else None
        split = parts[0] if len(parts) == 3 else None
        error = _dangling_link_problem(path) or video_id_problem(video_id)
        if error is None and video_id in seen:
            error = f"duplicate video id, already found at {seen[video_id]}"
        if error is not None:
            problems.append(SourceProblem(video_id, str(path), error, label))
            continue
        seen[video_id] = str(path)
        specs.append(VideoSpec(video_id, str(path), label, split))
    return specs, problems


ANNOTATION_COLUMNS = ("youtube_id", "time_start", "time_end")  # required; label and split are optional


def read_annotations(csv_path: str | Path) -> list[dict]:
    """Rows of a Kinetics annotation CSV as dicts of its columns, ``time_start`` and ``time_end``
    as seconds (float), and ``line``: the row's line in the file.

    The file is read as UTF-8 with or without a byte-order mark (spreadsheets write one). No
    rows, a missing column, a row with too few or too many fields, or a time that is not a
    finite number is an :class:`OptionError` naming the file and the line.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        try:
            rows = _annotation_rows(csv.DictReader(f), csv_path)
        except UnicodeDecodeError as e:
            raise OptionError(f"{csv_path} is not UTF-8 text: {e.reason} at byte {e.start}", "annotations") from None
    if not rows:
        raise OptionError(f"{csv_path} has a header but no rows: want one row per video", "annotations")
    return rows


def _annotation_rows(reader: csv.DictReader, csv_path: str | Path) -> list[dict]:
    columns = reader.fieldnames
    if not columns:
        raise OptionError(f"{csv_path} is empty: want a header {','.join(('label', *ANNOTATION_COLUMNS, 'split'))} "
                          "and one row per video", "annotations")
    missing = [c for c in ANNOTATION_COLUMNS if c not in columns]
    if missing:
        raise OptionError(f"{csv_path}, line 1: the header lacks columns {missing} (it has {columns})", "annotations")
    rows = []
    for row in reader:
        where = f"{csv_path}, line {reader.line_num}"
        if None in row:  # DictReader's key for fields beyond the header
            raise OptionError(f"{where}: {len(columns) + len(row[None])} fields, the header has {len(columns)}", "annotations")
        short = [c for c in columns if row[c] is None]
        if short:
            raise OptionError(f"{where}: no value for {short}", "annotations")
        for column in ("time_start", "time_end"):
            row[column] = _seconds(row[column], f"{where}: {column}")
        rows.append({**row, "line": reader.line_num})
    return rows


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise OptionError(f"{what} {text!r} is not a number of seconds", "annotations")
    return value


def find_annotated_videos(
    src: str | Path, annotations: str | Path, trim: bool = False
) -> tuple[list[VideoSpec], list[SourceProblem]]:
    """Videos named by an annotation CSV, found anywhere under ``src``, in CSV order.

    A clip file ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` is used as it is. Without it, a
    full-length ``<youtube_id>.<ext>`` is used, cut to the row's segment when ``trim`` is set.
    A row with neither file, a dangling link, or a ``youtube_id`` that :func:`video_id_problem`
    refuses is a :class:`SourceProblem`.
    """
    by_stem: dict[str, Path] = {}
    for path in _video_files(Path(src)):
        by_stem.setdefault(path.stem, path)
    specs: list[VideoSpec] = []
    problems: list[SourceProblem] = []
    seen: set[str] = set()
    for row in read_annotations(annotations):
        youtube_id, start, end = row["youtube_id"], row["time_start"], row["time_end"]
        label = row.get("label") or None
        split = row.get("split") or None
        error = video_id_problem(youtube_id)
        if error is not None:
            problems.append(SourceProblem(youtube_id, f"{annotations}, line {row['line']}", error, label))
            continue
        clip_id = f"{youtube_id}_{int(start):06d}_{int(end):06d}"
        video_id = clip_id if clip_id in by_stem else youtube_id
        if video_id in seen:
            problems.append(SourceProblem(video_id, str(by_stem.get(video_id, clip_id)), "duplicate video id in the annotations", label))
            continue
        seen.add(video_id)
        error = _dangling_link_problem(by_stem[video_id]) if video_id in by_stem else None
        if error is not None:
            problems.append(SourceProblem(video_id, str(by_stem[video_id]), error, label))
        elif clip_id in by_stem:
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
    """The videos under ``src``: from ``annotations`` when given, else from the class folders.

    A class-folder ``src`` without any video file is an :class:`OptionError` (so is an
    annotation CSV without rows, see :func:`read_annotations`).
    """
    if not Path(src).is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    if annotations is not None:
        return find_annotated_videos(src, annotations, trim)
    specs, problems = find_class_folder_videos(src)
    if not specs and not problems:
        raise OptionError(f"no video under {src}: looked for {', '.join(sorted(VIDEO_EXTENSIONS))} files in it, "
                          "in <label>/ and in <split>/<label>/ folders", "src")
    return specs, problems


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
