"""Video-level evaluation, late fusion and per-class comparison: what ``pipelines/evaluate.py``
and ``pipelines/compare.py`` share, as plain functions.

An evaluation folder (EVAL_DIR) holds two files:

* ``predictions.parquet``: one row per video: ``video_id`` (string), ``label_index`` (int64) and
  ``logits`` (list of float32, one per class): the mean of the network's clip logits over the
  video's evaluation views (clips x crops), or, for a fused folder, the log of the fused class
  probabilities (:func:`fuse`);
* ``metrics.json``: ``top1``, ``top5``, ``mean_class_accuracy``, ``videos``, ``per_class``
  (class name -> ``{accuracy, videos}``) from :func:`accuracy_metrics`, ``labels`` (the class
  names by index) and what made the folder (the command's ``args``, its ``source`` and the
  library ``versions``).

Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from flowprep.clips import unit_range
from flowprep.dataset import ClipDataset
from flowprep.networks import sequence_logits
from flowprep.train import autocast, num_classes

PREDICTIONS = "predictions.parquet"
METRICS = "metrics.json"
SUMMARY = ("top1", "top5", "mean_class_accuracy", "videos")


@dataclass
class Predictions:
    """Per-video scores: ``video_ids`` ``[V]``, ``labels`` int64 ``[V]`` (class indices) and
    ``logits`` float32 ``[V, C]``."""

    video_ids: list[str]
    labels: np.ndarray
    logits: np.ndarray

    def __post_init__(self):
        if self.logits.ndim != 2 or len(self.logits) != len(self.video_ids) or len(self.labels) != len(self.video_ids):
            raise ValueError(f"predictions of {len(self.video_ids)} videos need labels [V] and logits [V, C], "
                             f"not {list(self.labels.shape)} and {list(self.logits.shape)}")
        if len(set(self.video_ids)) != len(self.video_ids):
            raise ValueError("the predictions name a video more than once")


def label_names(dataset: ClipDataset) -> list[str]:
    """The class names of ``dataset`` by index; every folder must share one label map (:func:`num_classes`)."""
    num_classes(dataset)
    label_map = dataset.readers[0].label_map
    return sorted(label_map, key=label_map.get)


def video_logits(network: nn.Module, dataset: ClipDataset, modality: str, batch_size: int, device: torch.device,
                 num_workers: int = 0, progress: bool | None = None) -> Predictions:
    """Each video's logits: the mean over its ``dataset.views_per_video`` evaluation items (clips
    x crops) of ``sequence_logits(network(clip))``, accumulated in float64, stored as float32.

    ``dataset`` is an evaluation :class:`ClipDataset` (``train=False``) with ``modality``; its
    uint8 clips (``normalize=False``) are scaled to [-1, 1] on ``device`` as in training, float
    ones are taken as they are. ``network`` runs in eval mode, under float16 autocast on CUDA.
    ``progress``: a bar on stderr (``None``: when stderr is a terminal)."""
    k = dataset.views_per_video
    loader = DataLoader(dataset, batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    network.eval()
    sums, seen = None, 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="evaluate", unit="batch", disable=None if progress is None else not progress):
            clips = batch[modality].to(device, non_blocking=True)
            if clips.dtype == torch.uint8:
                clips = unit_range(clips)
            with autocast(device):
                logits = sequence_logits(network(clips)).double()
            if sums is None:
                sums = torch.zeros(len(dataset.videos), logits.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, torch.arange(seen, seen + len(logits), device=device) // k, logits)
            seen += len(logits)
    if sums is None:
        raise ValueError("no videos to evaluate")
    labels = np.array([dataset.readers[r].meta(v)["label_index"] for r, v in dataset.videos], np.int64)
    return Predictions([v for _, v in dataset.videos], labels, (sums / k).float().cpu().numpy())


def accuracy_metrics(predictions: Predictions, names: Sequence[str]) -> dict:
    """Video-level accuracies of ``predictions`` (labels index ``names``):

    * ``top1``: the fraction of videos whose highest logit is their label's;
    * ``top5``: the fraction whose label is among the 5 highest (every class with 5 or fewer);
    * ``per_class``: class name -> ``{"accuracy": top-1 over its videos, "videos": count}``, for
      the classes that have videos, in index order;
    * ``mean_class_accuracy``: the mean of those per-class accuracies;
    * ``videos``: the number of videos.

    ``ValueError`` for an unlabelled video (label -1) or logits whose width is not ``len(names)``."""
    logits, labels = predictions.logits, predictions.labels
    if logits.shape[1] != len(names):
        raise ValueError(f"the logits have {logits.shape[1]} classes, the label map {len(names)}")
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} videos have no label: evaluation needs labelled videos (another --split)")
    ranked = np.argsort(-logits, axis=1, kind="stable")
    correct = ranked[:, 0] == labels
    per_class = {names[c]: {"accuracy": float(correct[labels == c].mean()), "videos": int((labels == c).sum())}
                 for c in np.unique(labels)}
    return {"top1": float(correct.mean()), "top5": float((ranked[:, :5] == labels[:, None]).any(1).mean()),
            "mean_class_accuracy": float(np.mean([v["accuracy"] for v in per_class.values()])),
            "videos": len(labels), "per_class": per_class}


def _atomic_write(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def write_eval(folder: str | Path, predictions: Predictions, names: Sequence[str], record: dict) -> dict:
    """Write ``folder/predictions.parquet`` and ``folder/metrics.json`` (each atomically, replacing
    earlier ones): :func:`accuracy_metrics`, ``labels`` and ``record`` (what made the folder).
    Returns the metrics."""
    folder = Path(folder)
    metrics = {**accuracy_metrics(predictions, names), "labels": list(names), **record}
    folder.mkdir(parents=True, exist_ok=True)
    v, c = predictions.logits.shape
    logits = pa.ListArray.from_arrays(pa.array(np.arange(0, v * c + 1, c, dtype=np.int32)),
                                      pa.array(predictions.logits.reshape(-1), pa.float32()))
    table = pa.table({"video_id": pa.array(predictions.video_ids, pa.string()),
                      "label_index": pa.array(predictions.labels, pa.int64()), "logits": logits})
    _atomic_write(folder / PREDICTIONS, lambda p: pq.write_table(table, p))
    _atomic_write(folder / METRICS, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    return metrics


def read_eval(folder: str | Path) -> tuple[Predictions, dict]:
    """The predictions and metrics of an evaluation folder; ``ValueError`` naming what is missing."""
    folder = Path(folder)
    missing = [name for name in (PREDICTIONS, METRICS) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not an evaluation folder: no {' or '.join(missing)}")
    table = pq.read_table(folder / PREDICTIONS)
    logits = table.column("logits").combine_chunks()
    widths = set(logits.value_lengths().to_pylist())
    if len(widths) > 1:
        raise ValueError(f"{folder / PREDICTIONS}: rows have different numbers of logits {sorted(widths)}")
    values = logits.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    predictions = Predictions(table.column("video_id").to_pylist(), table.column("label_index").to_numpy().astype(np.int64),
                              values.reshape(len(table), widths.pop() if widths else 0))
    return predictions, json.loads((folder / METRICS).read_text())


def align(reference: Predictions, other: Predictions, names: tuple[str, str] = ("the first", "the second")) -> Predictions:
    """``other`` reordered to ``reference``'s videos; ``ValueError`` (one line) when the two cover
    different videos, label a video differently or have different numbers of classes. ``names``
    name the two sets in the message."""
    ours, theirs = set(reference.video_ids), set(other.video_ids)
    if ours != theirs:
        extra, lacking = sorted(theirs - ours), sorted(ours - theirs)
        parts = [f"{len(extra)} videos that {names[0]} lacks (e.g. {extra[0]})" if extra else "",
                 f"lacks {len(lacking)} of its videos (e.g. {lacking[0]})" if lacking else ""]
        raise ValueError(f"{names[1]} predicts other videos than {names[0]}: it has {' and '.join(p for p in parts if p)}")
    row = {video_id: i for i, video_id in enumerate(other.video_ids)}
    order = np.array([row[v] for v in reference.video_ids], np.int64)
    labels, logits = other.labels[order], other.logits[order]
    if not np.array_equal(labels, reference.labels):
        wrong = reference.video_ids[int(np.flatnonzero(labels != reference.labels)[0])]
        raise ValueError(f"{names[1]} labels videos differently from {names[0]} (e.g. {wrong})")
    if logits.shape[1] != reference.logits.shape[1]:
        raise ValueError(f"{names[1]} has {logits.shape[1]} classes, {names[0]} {reference.logits.shape[1]}")
    return Predictions(list(reference.video_ids), labels, logits)


def fuse(sets: Sequence[Predictions], weights: Sequence[float], names: Sequence[str] | None = None) -> Predictions:
    """Late fusion, the two-stream I3D convention: per video, the weighted mean of each set's
    class probabilities (softmax of its logits), weights normalised to sum to 1.

    The result's ``logits`` are the log of the fused probabilities (float32, computed in float64
    with logsumexp), so that softmax gives them back, the argmax is the fused prediction, and a
    fused set can be fused again. Videos are in the first set's order; the sets must cover the
    same videos with the same labels and classes (:func:`align`; ``names`` label them in errors).
    ``ValueError`` for fewer than two sets or weights that are not positive, one per set."""
    names = list(names) if names is not None else [f"set {i + 1}" for i in range(len(sets))]
    if len(sets) < 2:
        raise ValueError("fusion takes two or more prediction sets")
    if len(weights) != len(sets) or not all(w > 0 and np.isfinite(w) for w in weights):
        raise ValueError(f"fusion of {len(sets)} sets takes {len(sets)} positive weights, not {list(weights)}")
    aligned = [sets[0], *(align(sets[0], s, (names[0], name)) for s, name in zip(sets[1:], names[1:]))]
    log_p = torch.stack([torch.log_softmax(torch.from_numpy(s.logits).double(), dim=1) for s in aligned])
    w = torch.tensor(weights, dtype=torch.float64)
    fused = torch.logsumexp(log_p + (w / w.sum()).log()[:, None, None], dim=0)
    return Predictions(list(sets[0].video_ids), sets[0].labels.copy(), fused.float().numpy())


def per_class_gains(a: tuple[Predictions, dict], b: tuple[Predictions, dict]) -> list[dict]:
    """Per-class accuracy of evaluation ``b`` against ``a`` (each as :func:`read_eval` returns it):
    one row per class with videos, ``label``, ``videos``, ``accuracy_a``, ``accuracy_b`` and
    ``delta = accuracy_b - accuracy_a`` (fractions; rounded to 12 decimals, so that equal changes
    tie), sorted by delta, largest gain first (ties by label). ``ValueError`` when the two
    evaluate other videos or label maps."""
    (pred_a, metrics_a), (pred_b, metrics_b) = a, b
    if metrics_a["labels"] != metrics_b["labels"]:
        raise ValueError("the two evaluations have different label maps")
    align(pred_a, pred_b, ("EVAL_A", "EVAL_B"))
    rows = [{"label": label, "videos": stats["videos"], "accuracy_a": stats["accuracy"],
             "accuracy_b": metrics_b["per_class"][label]["accuracy"],
             "delta": round(metrics_b["per_class"][label]["accuracy"] - stats["accuracy"], 12)}
            for label, stats in metrics_a["per_class"].items()]
    return sorted(rows, key=lambda r: (-r["delta"], r["label"]))
