"""pipelines/evaluate.py and pipelines/compare.py: video-level evaluation over clips x crops,
two-stream fusion of saved predictions, per-class gains."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flowprep import ClipDataset
from flowprep.evaluate import Predictions, read_eval, write_eval
from flowprep.networks import load_state, load_weights
from flowprep.provenance import file_sha256

from test_train import SMALL, argv, tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
import compare  # noqa: E402
import evaluate  # noqa: E402
import train_teacher  # noqa: E402

SUMMARY = {"top1", "top5", "mean_class_accuracy", "videos"}
EVAL = ["--model", "test_train:tiny", "--clip-len", 8, "--crop", 112, "--batch-size", 4, "--num-workers", 0, "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(small_shards, tmp_path_factory) -> dict[str, Path]:
    """A flow network trained for 2 steps (a training job's checkpoint.pt) and an untrained RGB one."""
    root = tmp_path_factory.mktemp("eval")
    train_teacher.main(argv("--shards", small_shards, "--out", root / "flow", "--model", "test_train:tiny", "--epochs", 1, *SMALL))
    torch.manual_seed(1)
    torch.save({"model": tiny(3, 2).state_dict()}, root / "rgb.pt")
    return {"flow": root / "flow" / "checkpoint.pt", "rgb": root / "rgb.pt"}


def run_eval(shards, checkpoint, out, *extra) -> dict:
    return evaluate.main(argv("--shards", shards, "--checkpoint", checkpoint, "--out", out, *EVAL, *extra))


def softmax(x: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(x).double(), dim=1).numpy()


def test_evaluation_stores_the_mean_logits_and_consistent_metrics(checkpoints, small_shards, tmp_path, capsys):
    out = tmp_path / "flow"
    capsys.readouterr()
    metrics = run_eval(small_shards, checkpoints["flow"], out, "--split", "train", "--clips", 2, "--crops", 3)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == {k: metrics[k] for k in SUMMARY} and last["videos"] == 4
    assert json.loads((out / "metrics.json").read_text()) == metrics

    table = pq.read_table(out / "predictions.parquet")
    assert table.column_names == ["video_id", "label_index", "logits"]
    assert table.schema.field("logits").type == pa.list_(pa.float32())
    logits = np.array(table.column("logits").to_pylist(), np.float32)
    labels = np.array(table.column("label_index").to_pylist())
    assert logits.shape == (4, 2) and sorted(labels) == [0, 0, 1, 1]
    assert metrics["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert metrics["top5"] == 1.0  # two classes: every label is in the top 5
    per_class = metrics["per_class"]
    assert list(per_class) == metrics["labels"] == ["left", "right"]
    assert sum(c["videos"] for c in per_class.values()) == metrics["videos"]
    for index, name in enumerate(metrics["labels"]):
        assert per_class[name]["accuracy"] == pytest.approx(np.mean(logits[labels == index].argmax(1) == index))
    assert metrics["mean_class_accuracy"] == pytest.approx(np.mean([c["accuracy"] for c in per_class.values()]))
    source = metrics["source"]
    assert source["modality"] == "flow" and source["views_per_video"] == 6  # 2 input channels: flow
    assert source["checkpoint_sha256"] == file_sha256(checkpoints["flow"]) and metrics["args"]["crops"] == 3
    assert metrics["versions"]["torch"] == torch.__version__

    # Each stored row is the mean of the network's logits over its video's 2 clips x 3 crops.
    network = tiny(2, 2)
    load_weights(network, load_state(checkpoints["flow"]))
    dataset = ClipDataset(small_shards, ("flow",), clip_len=8, crop=112, train=False, split="train", num_clips=2, num_crops=3)
    with torch.no_grad():
        clips = network.eval()(torch.stack([dataset[i]["flow"] for i in range(len(dataset))]))
    assert table.column("video_id").to_pylist() == [dataset[6 * v]["video_id"] for v in range(4)]
    np.testing.assert_allclose(logits, clips.view(4, 6, 2).mean(1).numpy(), atol=1e-5)
    assert not np.allclose(clips.view(4, 6, 2)[:, 0], clips.view(4, 6, 2).mean(1), atol=1e-5)  # the views differ


def test_fusion_weights_softmaxes_and_refuses_other_videos(checkpoints, small_shards, tmp_path, capsys):
    rgb, flow = tmp_path / "rgb", tmp_path / "flow"
    run_eval(small_shards, checkpoints["rgb"], rgb, "--split", "train")
    run_eval(small_shards, checkpoints["flow"], flow, "--split", "train")
    (a, _), (b, _) = read_eval(rgb), read_eval(flow)
    # rows in another order are matched by video id
    reordered = tmp_path / "flow-reordered"
    write_eval(reordered, Predictions(b.video_ids[::-1], b.labels[::-1], b.logits[::-1]), ["left", "right"], {})

    capsys.readouterr()
    metrics = evaluate.main(argv("--fuse", rgb, reordered, "--weights", "1,3", "--out", tmp_path / "fused"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {k: metrics[k] for k in SUMMARY}
    fused, saved = read_eval(tmp_path / "fused")
    expected = (softmax(a.logits) + 3 * softmax(b.logits)) / 4
    assert fused.video_ids == a.video_ids and np.array_equal(fused.labels, a.labels)
    np.testing.assert_allclose(softmax(fused.logits), expected, atol=1e-6)
    assert not np.allclose(expected, (softmax(a.logits) + softmax(b.logits)) / 2, atol=1e-6)  # the weights matter
    assert saved["top1"] == pytest.approx(np.mean(expected.argmax(1) == a.labels))
    parts = saved["source"]["fused"]
    assert [s["weight"] for s in parts] == [1.0, 3.0] and parts[0]["source"]["modality"] == "rgb"
    assert parts[1]["predictions_sha256"] == file_sha256(reordered / "predictions.parquet")

    run_eval(small_shards, checkpoints["rgb"], tmp_path / "val", "--split", "val")  # one other video
    for bad, message in ((["--fuse", rgb, tmp_path / "val"], "predicts other videos"),
                         (["--fuse", rgb, flow, "--weights", "1,2,3"], "3 weights for 2"),
                         (["--fuse", rgb, flow, "--weights", "1,-1"], "positive weights"),
                         (["--fuse", rgb], "two or more")):
        with pytest.raises(SystemExit) as refused:
            evaluate.main(argv(*bad, "--out", tmp_path / "refused"))
        err = capsys.readouterr().err
        assert refused.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()


def synthetic_eval(folder: Path, predicted: list[int], video_ids=None) -> Path:
    """An evaluation of 8 videos, 2 per class a-d, that predicts ``predicted`` (one-hot logits)."""
    labels = np.repeat(np.arange(4), 2)
    video_ids = video_ids or [f"v{i}" for i in range(8)]
    write_eval(folder, Predictions(video_ids, labels, np.eye(4, dtype=np.float32)[predicted]), ["a", "b", "c", "d"], {})
    return folder


def test_compare_writes_per_class_gains_sorted_and_a_figure(tmp_path, capsys):
    #                    a     b     c     d
    a = synthetic_eval(tmp_path / "a", [0, 0, 1, 1, 0, 0, 3, 0])  # 1.0, 1.0, 0.0, 0.5
    b = synthetic_eval(tmp_path / "b", [0, 1, 1, 1, 2, 2, 3, 3])  # 0.5, 1.0, 1.0, 1.0
    out = tmp_path / "cmp"
    capsys.readouterr()
    compare.main(argv(a, b, "--out", out, "--top", 1))
    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["label", "videos", "accuracy_a", "accuracy_b", "delta"]
    assert [(r[0], int(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows[1:]] == [
        ("c", 2, 0.0, 1.0, 1.0), ("d", 2, 0.5, 1.0, 0.5), ("b", 2, 1.0, 1.0, 0.0), ("a", 2, 1.0, 0.5, -0.5)]
    assert (out / "per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "largest gains:" in text and "+100.0  c" in text and "  d " not in text  # --top 1
    assert "largest losses:" in text and "-50.0  a" in text

    other = synthetic_eval(tmp_path / "other", [0] * 8, [f"w{i}" for i in range(8)])
    with pytest.raises(SystemExit) as refused:
        compare.main(argv(a, other, "--out", tmp_path / "refused"))
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "other videos" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
