"""Source discovery: class folders, annotation CSVs and label maps (no video is opened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowprep.sources import (
    SourceProblem,
    VideoSpec,
    build_label_map,
    find_annotated_videos,
    find_class_folder_videos,
    find_videos,
    read_annotations,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really a video")
    return path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# class folders


def test_split_label_layout(tmp_path):
    a = touch(tmp_path / "train" / "abseiling" / "vid_a.mp4")
    b = touch(tmp_path / "train" / "zumba" / "vid_b.webm")
    c = touch(tmp_path / "val" / "abseiling" / "vid_c.mkv")
    touch(tmp_path / "train" / "zumba" / "notes.txt")  # not a video extension: ignored
    specs, problems = find_class_folder_videos(tmp_path)
    assert problems == []
    assert specs == [
        VideoSpec("vid_a", str(a), "abseiling", "train"),
        VideoSpec("vid_b", str(b), "zumba", "train"),
        VideoSpec("vid_c", str(c), "abseiling", "val"),
    ]
    assert all(s.start is None and s.end is None for s in specs)


def test_label_layout_and_unlabeled_files(tmp_path):
    a = touch(tmp_path / "dancing" / "x1.mp4")
    b = touch(tmp_path / "dancing" / "x2.AVI")  # extension matching ignores case
    loose = touch(tmp_path / "loose.mp4")
    specs, problems = find_class_folder_videos(tmp_path)
    assert problems == []
    by_id = {s.video_id: s for s in specs}
    assert set(by_id) == {"x1", "x2", "loose"}
    assert by_id["x1"] == VideoSpec("x1", str(a), "dancing", None)
    assert by_id["x2"] == VideoSpec("x2", str(b), "dancing", None)
    assert by_id["loose"] == VideoSpec("loose", str(loose), None, None)
    # Sorted by path.
    assert [s.path for s in specs] == sorted(s.path for s in specs)


def test_duplicate_ids_are_problems(tmp_path):
    first = touch(tmp_path / "train" / "a" / "same.mp4")
    second = touch(tmp_path / "val" / "b" / "same.mp4")
    touch(tmp_path / "val" / "b" / "other.mp4")
    specs, problems = find_class_folder_videos(tmp_path)
    assert [s.video_id for s in specs] == ["same", "other"]
    assert specs[0].path == str(first)
    assert len(problems) == 1
    problem = problems[0]
    assert isinstance(problem, SourceProblem)
    assert problem.video_id == "same"
    assert problem.source == str(second)
    assert "duplicate" in problem.error and str(first) in problem.error


def test_too_deep_is_a_problem(tmp_path):
    deep = touch(tmp_path / "a" / "b" / "c" / "deep.mp4")
    specs, problems = find_class_folder_videos(tmp_path)
    assert specs == []
    assert [(p.video_id, p.source) for p in problems] == [("deep", str(deep))]
    assert "depth" in problems[0].error


def test_find_videos_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_videos(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# annotation CSV

HEADER = "label,youtube_id,time_start,time_end,split"


def test_annotated_clips(tmp_path):
    clip1 = touch(tmp_path / "clips" / "abc_000010_000020.mp4")
    clip2 = touch(tmp_path / "deeper" / "folder" / "def_000000_000010.webm")  # found anywhere under src
    csv = write_csv(
        tmp_path / "train.csv",
        HEADER,
        ["zumba,def,0,10,train", "abseiling,abc,10,20,train"],
    )
    specs, problems = find_videos(tmp_path, annotations=csv)
    assert problems == []
    # CSV order, not path order.
    assert specs == [
        VideoSpec("def_000000_000010", str(clip2), "zumba", "train"),
        VideoSpec("abc_000010_000020", str(clip1), "abseiling", "train"),
    ]


def test_annotated_missing_file(tmp_path):
    touch(tmp_path / "abc_000010_000020.mp4")
    csv = write_csv(tmp_path / "val.csv", HEADER, ["a,abc,10,20,val", "b,gone,3,13,val"])
    specs, problems = find_annotated_videos(tmp_path, csv)
    assert [s.video_id for s in specs] == ["abc_000010_000020"]
    assert len(problems) == 1
    assert problems[0].video_id == "gone_000003_000013"
    assert problems[0].error == "file not found"
    assert "gone_000003_000013" in problems[0].source
    # The missing row's class still counts, so a partial download maps classes as a full one.
    assert problems[0].label == "b"
    labels = [s.label for s in specs] + [p.label for p in problems]
    assert build_label_map(labels) == {"a": 0, "b": 1}


def test_test_csv_without_label(tmp_path):
    clip = touch(tmp_path / "abc_000001_000011.mp4")
    csv = write_csv(tmp_path / "test.csv", "youtube_id,time_start,time_end,split", ["abc,1,11,test"])
    specs, problems = find_annotated_videos(tmp_path, csv)
    assert problems == []
    assert specs == [VideoSpec("abc_000001_000011", str(clip), None, "test")]
    assert build_label_map(s.label for s in specs) == {}


def test_full_length_source_trim(tmp_path):
    full = touch(tmp_path / "xyz.mp4")
    csv = write_csv(tmp_path / "train.csv", HEADER, ["cooking,xyz,12.5,22.5,train"])
    trimmed, problems = find_annotated_videos(tmp_path, csv, trim=True)
    assert problems == []
    assert trimmed == [VideoSpec("xyz", str(full), "cooking", "train", 12.5, 22.5)]
    untrimmed, problems = find_annotated_videos(tmp_path, csv, trim=False)
    assert problems == []
    assert untrimmed == [VideoSpec("xyz", str(full), "cooking", "train", None, None)]


def test_clip_file_preferred_over_full_length(tmp_path):
    touch(tmp_path / "xyz.mp4")
    clip = touch(tmp_path / "xyz_000012_000022.mp4")
    csv = write_csv(tmp_path / "train.csv", HEADER, ["cooking,xyz,12,22,train"])
    specs, _ = find_annotated_videos(tmp_path, csv, trim=True)
    # The clip is already cut: used as it is, no segment.
    assert specs == [VideoSpec("xyz_000012_000022", str(clip), "cooking", "train")]


def test_annotation_csv_missing_columns(tmp_path):
    csv = write_csv(tmp_path / "bad.csv", "label,youtube_id,split", ["a,abc,train"])
    with pytest.raises(ValueError, match="time_end"):
        read_annotations(csv)


# ---------------------------------------------------------------------------------------------
# label maps


def test_label_map_sorted():
    assert build_label_map(["zumba", "abseiling", None, "cooking", "abseiling"]) == {"abseiling": 0, "cooking": 1, "zumba": 2}


def test_label_map_from_file(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("zumba\n\nabseiling\ncooking\nunused\n")
    # File order, blank lines skipped, classes absent from the source kept.
    assert build_label_map(["abseiling", None, "zumba"], labels) == {"zumba": 0, "abseiling": 1, "cooking": 2, "unused": 3}


def test_label_file_missing_a_class(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("abseiling\ncooking\n")
    with pytest.raises(ValueError, match="zumba"):
        build_label_map(["abseiling", "zumba"], labels)


def test_label_file_with_duplicate(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("abseiling\ncooking\nabseiling\n")
    with pytest.raises(ValueError, match="twice"):
        build_label_map(["abseiling"], labels)
