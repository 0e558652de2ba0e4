"""The training loop of the D3D jobs, ``pipelines/train_teacher.py`` (the flow stream) and
``pipelines/train_d3d.py`` (the RGB student distilled from stored teacher targets).

A script builds a :class:`Job` (datasets, network, and a step function that computes a batch's
loss terms) and hands it to :func:`launch`; everything else is here and the same for both:

* the shared command line (:func:`argument_parser`);
* one process, or one per GPU (or CPU process) under ``torchrun``: DDP over nccl on CUDA, gloo
  on CPU; :class:`~flowprep.dataset.ClipSampler` splits each epoch's items over the ranks;
* ``ClipDataset(normalize=False)`` uint8 clips through the DataLoader, scaled to [-1, 1] on the
  device (:func:`to_device`), AMP (float16 autocast and a GradScaler) on CUDA;
* SGD (momentum 0.9) or AdamW and a cosine schedule from ``--lr`` to 0 over ``--epochs``;
* ``RUN_DIR/checkpoint.pt`` at the end of every epoch and when ``--max-steps`` stops the run;
  rerunning the command resumes where it stopped, even mid-epoch;
* a loss, validation metric or weight that is not finite stops the run before anything more is
  saved (:class:`NonFinite`, exit status 3): the checkpoint keeps the last finite step;
* ``RUN_DIR/log.jsonl`` (rank 0, strict JSON): a ``start`` line per invocation, an ``epoch`` line
  per epoch, an ``end`` line per invocation (a ``stop`` line when the run stopped on a
  non-finite value): ``step`` (steps done in all), ``epoch`` (epochs completed),
  the per-clip means of the loss terms over the epoch's ``steps`` that this invocation ran (the
  ``end`` line: over all it ran), ``lr`` of the last step, ``clips_per_s`` of all
  ranks, ``data_wait`` (the fraction of the time a step waited for its batch), ``seconds``, and
  with ``--val-split`` the validation metrics (:func:`evaluate`); with ``--log-every N`` a ``step``
  line every N steps, the same quantities over the steps since the last ``step`` line (or the
  epoch's start): ``steps`` of them, the loss terms (the student's ``ce`` and ``distill``, the
  teacher's ``ce``), ``lr``, ``clips_per_s``, ``data_wait`` and ``seconds``;
* ``--tensorboard``: the ``step`` and ``epoch`` lines' numbers also as TensorBoard scalars
  (``step/loss``, ``epoch/val_top1``, ...; x: the step) in event files in RUN_DIR (the
  ``tensorboard`` extra).

``--max-steps`` stops the run early but does not shorten the schedule, which always spans
``--epochs``: a rerun with a larger ``--max-steps`` then continues the very run an uninterrupted
one would have made (a larger ``--epochs`` stretches the rest of the schedule).

Determinism: the sampler order is a function of (seed, epoch), each clip's draws of (seed, epoch,
index), and the torch RNG (dropout) is reseeded from (seed, rank, step) before every step, so a
resumed run repeats an uninterrupted one without saving RNG states.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from flowprep.clips import unit_range
from flowprep.dataset import ClipDataset, ClipSampler, MissingTeacher
from flowprep.devices import resolve_device
from flowprep.errors import OptionError
from flowprep.networks import build_model, load_weights
from flowprep.storage import storage

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
ITEMS = re.compile(r"items-rank\d+\.jsonl")
# Arguments a rerun may change: they stop the run elsewhere or change how it runs, not what it computes.
FREE_ARGS = ("epochs", "max_steps", "num_workers", "progress", "record_items", "out", "log_every", "tensorboard")
# What every checkpoint of a run holds (save_checkpoint).
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "epoch_step", "args", "world_size"}
EXIT_USAGE = 2  # a bad option, or an input named by one (argparse's status)
EXIT_NON_FINITE = 3  # a loss, validation metric or weight that is not finite stopped the run
MAX_SEED = 2**63 - 1


class ResumeMismatch(OptionError):
    """RUN_DIR holds a checkpoint of a run with other arguments (option ``out``)."""


class NonFinite(RuntimeError):
    """A loss, a validation metric or a weight that is not finite: the run stops before it saves."""


def number(kind: type, minimum: float, *, above: bool = False, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type`` for the numeric options of the training and probe commands: the text
    as ``kind`` (``int`` or ``float``), finite, ``>= minimum`` (``> minimum`` with ``above``) and
    ``<= maximum``; anything else is refused as argparse refuses a value, naming the option (exit
    status 2), before anything runs."""
    bounds = f"{'>' if above else '>='} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    wanted = f"{'an integer' if kind is int else 'a finite number'} {bounds}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or value < minimum or (above and value == minimum) \
                or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    return parse


# The counts (steps, clips, crops, frames): whole numbers from 1.
positive_int = number(int, 1)


def class_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """``--flip-swap``'s ``A:B[,C:D...]`` as class-name pairs; the names are checked against the
    label map when the datasets are made."""
    pairs = tuple(tuple(pair.split(":")) for pair in text.split(","))
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r} is not class pairs A:B, comma-separated")
    return pairs


def option_flag(option: str) -> str:
    """An :class:`OptionError`'s option (``clip_len``) as the command line spells it (``--clip-len``)."""
    return "--" + option.replace("_", "-")


@contextmanager
def dataset_options():
    """Errors of making a :class:`ClipDataset` from the command line's options as the
    :class:`OptionError` of the option they concern: the dataset's own (``crop``, ``clip_len``,
    ``teacher_outputs``, ...), ``teacher`` for targets that are not there, ``shards`` for a folder
    that is not an output of ``flowprep extract`` (or holds no flow for a job that reads it)."""
    try:
        yield
    except MissingTeacher as e:
        raise OptionError(str(e), "teacher") from None
    except OptionError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise OptionError(str(e), "shards") from None


def build_network(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """:func:`~flowprep.networks.build_model`, a model it cannot build an OptionError on ``model``."""
    try:
        return build_model(name, in_channels, num_classes)
    except ValueError as e:
        raise OptionError(str(e), "model") from None


def shard_location(text: str) -> str:
    """A ``--shards`` argument as the job passes it on: a local folder made absolute (so a log or
    checkpoint names it wherever the job ran), an object storage URI as it is."""
    try:
        local = storage(text).local
    except ValueError as e:
        raise OptionError(str(e), "shards") from None
    return str(Path(text).resolve()) if local else text


class _TensorBoard(argparse.Action):
    """``--tensorboard``: a flag that is refused (exit 2) where the tensorboard package is missing."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            parser.error(f'{option_string} needs the tensorboard package: pip install "flowprep[tensorboard]"')
        setattr(namespace, self.dest, True)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The options both jobs share; a script adds its own and passes the parser to :func:`launch`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shards", nargs="+", required=True, help="output folders of flowprep extract")
    add("--out", required=True, help="run folder: checkpoint.pt, log.jsonl; rerunning the command resumes")
    add("--model", required=True, help="s3dg, i3d or package.module:factory (called with in_channels=, num_classes=)")
    add("--epochs", type=positive_int, required=True, help="the schedule's length")
    add("--max-steps", type=positive_int, help="stop after this many steps in all (the schedule still spans --epochs)")
    add("--batch-size", type=positive_int, required=True, help="clips per step and process")
    add("--clip-len", type=positive_int, required=True, help="frames per clip (>= 8 for i3d, s3dg)")
    add("--frame-stride", type=positive_int, default=1, help="step between clip frames")
    add("--crop", type=positive_int, required=True, help="side of the square crop (>= 112 for i3d, s3dg)")
    add("--lr", type=number(float, 0, above=True), required=True, help="peak learning rate (per step, whatever the number of processes)")
    add("--optimizer", choices=("sgd", "adamw"), default="sgd", help="SGD with momentum 0.9, or AdamW")
    add("--weight-decay", type=number(float, 0), default=1e-4)
    add("--flip-swap", type=class_pairs, help="A:B[,C:D...]: class pairs a horizontal flip turns into each other "
                                            "(left-right direction classes); a flipped clip of A is labelled B and of B, A")
    add("--seed", type=number(int, 0, maximum=MAX_SEED), default=0, help="initial weights, sampler order, clip draws and dropout")
    add("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    add("--num-workers", type=number(int, 0), default=4, help="DataLoader workers per process")
    add("--split", default="train", help="the videos to train on")
    add("--val-split", help="validate on these videos after every epoch (default: no validation)")
    add("--val-clips", type=positive_int, default=1, help="clips per validation video, logits averaged (1: the centre clip)")
    add("--record-items", action="store_true", help="each rank appends the items of every step to RUN_DIR/items-rank{r}.jsonl")
    add("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default: when stderr is a terminal)")
    add("--log-every", type=positive_int, help="a step line in log.jsonl every N steps (default: none)")
    add("--tensorboard", action=_TensorBoard, help="also write the step and epoch lines as TensorBoard scalars in RUN_DIR")
    return parser


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """One process, or the process group of a ``torchrun`` launch (its WORLD_SIZE, RANK and
    LOCAL_RANK): nccl with one GPU per process (``cuda:LOCAL_RANK``) on CUDA, gloo on CPU."""
    device = torch.device(resolve_device(device))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world_size, device)


@dataclass
class StepOutput:
    """A step function's result for a batch of B clips, all per clip so that validation can count
    each clip once: ``loss`` ``[B]`` the total (training backpropagates its mean), ``terms`` its
    parts to log (name -> ``[B]``), ``logits`` ``[B, num_classes]`` for top-1."""

    loss: Tensor
    terms: dict[str, Tensor]
    logits: Tensor


@dataclass
class Job:
    """What a training script plugs into the loop.

    ``trainable`` is what the optimizer trains and DDP wraps; ``modules`` are the checkpoint's
    keys for its parts: ``"model"`` the network alone (what ``flowprep teacher --checkpoint`` and
    the probe load), any other key saved beside it. ``step(net, batch)`` computes the loss of a
    batch from :func:`to_device`, ``net`` being ``trainable`` (DDP-wrapped under torchrun).
    ``check`` runs on every rank before each checkpoint (raise to stop the run); ``start``
    joins the ``start`` log line.
    """

    train_set: ClipDataset
    val_set: ClipDataset | None
    trainable: nn.Module
    modules: dict[str, nn.Module]
    step: Callable[[nn.Module, dict], StepOutput]
    num_classes: int
    start: dict = field(default_factory=dict)
    check: Callable[[], None] | None = None


@dataclass
class RunResult:
    """What :func:`launch` returns: the job (datasets, modules) and the ``end`` log line
    (``None`` when the run had already reached its end)."""

    job: Job
    end: dict | None


def make_datasets(args: argparse.Namespace, modalities: Sequence[str], **teacher) -> tuple[ClipDataset, ClipDataset | None]:
    """Training and (with ``--val-split``) validation clips of ``--shards`` as uint8 tensors (flow
    of float16 shards as float32); ``teacher``: ``teacher=NAME, teacher_outputs=(...)`` for stored
    targets. An option they do not fit is an :class:`OptionError` (:func:`dataset_options`)."""
    common = dict(modalities=modalities, clip_len=args.clip_len, frame_stride=args.frame_stride, crop=args.crop,
                  flip_swap=args.flip_swap or (), seed=args.seed, normalize=False, **teacher)
    with dataset_options():
        train = ClipDataset(args.shards, train=True, split=args.split, **common)
        val = ClipDataset(args.shards, train=False, split=args.val_split, num_clips=args.val_clips, **common) if args.val_split else None
    require_videos(args, split=train, val_split=val)
    return train, val


def require_videos(args: argparse.Namespace, **datasets: ClipDataset | None) -> None:
    """An :class:`OptionError` on the split option (``split=dataset, ...``) whose dataset has no videos."""
    for option, dataset in datasets.items():
        if dataset is not None and not len(dataset):
            raise OptionError(f"no videos of split {getattr(args, option)!r} in {', '.join(map(str, args.shards))}", option)


def num_classes(dataset: ClipDataset) -> int:
    """The size of the label map, which every folder of the dataset must share."""
    maps = [r.label_map for r in dataset.readers]
    if any(m != maps[0] for m in maps):
        raise OptionError("the --shards folders have different label maps: extract them with one label map", "shards")
    return len(maps[0])


class ResumableSampler(Sampler):
    """A :class:`ClipSampler`'s epoch from item ``skip`` of this rank on, so a run resumed mid-epoch
    goes on with the same order and never loads the items its first steps trained on."""

    def __init__(self, sampler: ClipSampler):
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def make_loader(dataset: ClipDataset, args: argparse.Namespace, dist: Dist, shuffle: bool) -> DataLoader:
    """Batches of ``dataset`` for this rank; the sampler is a :class:`ResumableSampler`."""
    sampler = ResumableSampler(ClipSampler(dataset, dist.world_size, dist.rank, shuffle=shuffle, seed=args.seed))
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=dist.device.type == "cuda", persistent_workers=args.num_workers > 0)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch on ``device``: clips ``rgb`` ``[B, 3, T, H, W]`` and ``flow``
    ``[B, 2, T, H, W]`` uint8 become float32 ``q / 127.5 - 1`` in [-1, 1] (RGB as I3D and S3D-G
    take it, and the stored flow's own scale, flipped x already stored as ``255 - q``); float32
    clips (the flow of float16 shards, already in [-1, 1]), ``label`` ``[B]`` and ``teacher_*``
    ``[B, dim]`` are moved as they are; ids and views stay."""
    out = dict(batch)
    for key, value in batch.items():
        if key in ("rgb", "flow") and value.dtype == torch.uint8:
            out[key] = unit_range(value.to(device, non_blocking=True))
        elif key in ("rgb", "flow", "label") or key.startswith("teacher_"):
            out[key] = value.to(device, non_blocking=True)
    return out


def autocast(device: torch.device):
    """float16 autocast on CUDA (with the GradScaler); float32 elsewhere."""
    return torch.autocast(device.type, enabled=device.type == "cuda")


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-clip cross-entropy ``[B]`` of logits ``[B, C]``, in float32 whatever autocast did."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def make_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, or AdamW; weight decay on every parameter (BatchNorm and biases too)."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr * (1 + cos(pi * s / total_steps)) / 2`` at step ``s``: ``--lr`` down to 0 at the end."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))


@dataclass
class Position:
    """Where a run is: ``epoch`` epochs completed, ``step`` optimizer steps in all, ``epoch_step``
    of them in the epoch under way."""

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def run_args(args: argparse.Namespace) -> dict:
    return dict(vars(args))


def save_checkpoint(path: Path, job: Job, optimizer, scheduler, scaler, pos: Position, args: argparse.Namespace,
                    world_size: int) -> None:
    """Atomically: a killed save leaves the previous checkpoint. Only tensors, numbers, strings,
    lists and dicts, so ``torch.load(weights_only=True)`` reads it."""
    state = {name: module.state_dict() for name, module in job.modules.items()}
    state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                 epoch=pos.epoch, step=pos.step, epoch_step=pos.epoch_step, seed=args.seed, args=run_args(args),
                 num_classes=job.num_classes, world_size=world_size)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


@contextmanager
def torch_file(path: Path):
    """Around ``torch.load`` of ``path``: whatever it raises for a file that is not
    ``torch.save``'s (it has no one error for that: EOFError, UnpicklingError, KeyError, ...)
    becomes a ValueError naming the file, and its warnings about a foreign pickle are silenced
    (that error says it). A ValueError raised inside (a reader's own check) passes as it is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: torch.load cannot read it ({type(e).__name__})") from None


def read_checkpoint(path: Path) -> dict:
    """The checkpoint ``path`` of a run, read to resume it; a file that is not one (empty, not
    ``torch.save``'s, another program's) is an :class:`OptionError` on ``out``."""
    try:
        with torch_file(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except ValueError as e:
        problem = str(e)
    else:
        missing = sorted(CHECKPOINT_KEYS - saved.keys()) if isinstance(saved, dict) else []
        if isinstance(saved, dict) and not missing and isinstance(saved["args"], dict):
            return saved
        problem = f"{path} lacks {', '.join(missing)}" if missing else f"{path} holds no run"
    raise OptionError(f"{problem}: not a checkpoint of a training run; use another --out, or remove it to start over", "out")


def run_folder(out: Path) -> dict | None:
    """Check ``--out`` before anything is built: the checkpoint of the run to resume, or ``None``
    for a new run. A new run needs a new or empty folder, or one holding only what a start that
    never reached its first checkpoint leaves (a log without ``epoch`` or ``end`` lines, items
    logs, a half-written checkpoint), which it continues; anything else (an earlier run's log
    whose checkpoint is gone, other files, a file for a folder) is an :class:`OptionError` on
    ``out``, and nothing is deleted."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out} is a file, not a run folder", "out")
    checkpoint = out / CHECKPOINT
    if checkpoint.exists():
        return read_checkpoint(checkpoint)
    others = [p.name for p in sorted(out.iterdir()) if not leftover(p)] if out.exists() else []
    if others:
        raise OptionError(f"{out} holds {', '.join(others)} but no {CHECKPOINT}: it is not a run to resume; "
                          "use a new or empty --out", "out")
    return None


def leftover(path: Path) -> bool:
    """Whether ``path`` is what a run leaves in RUN_DIR before its first checkpoint."""
    if path.name == LOG:
        try:
            return all(json.loads(line)["event"] in ("start", "stop") for line in path.read_text().splitlines())
        except (ValueError, KeyError, TypeError):
            return False
    return path.name == Path(CHECKPOINT).with_suffix(".partial").name or bool(ITEMS.fullmatch(path.name))


def load_checkpoint(saved: dict, path: Path, job: Job, optimizer, scheduler, scaler, args: argparse.Namespace,
                    world_size: int) -> Position:
    """Restore a run from its checkpoint ``saved`` (read from ``path``); :class:`ResumeMismatch`
    when ``args`` (but for :data:`FREE_ARGS`) or the number of processes differ from the run's."""
    ours = run_args(args)
    changed = [f"--{k.replace('_', '-')} {saved['args'].get(k)!r} (now {ours.get(k)!r})"
               for k in sorted(saved["args"].keys() | ours.keys()) if k not in FREE_ARGS and saved["args"].get(k) != ours.get(k)]
    if saved["world_size"] != world_size:
        changed.append(f"{saved['world_size']} processes (now {world_size})")
    if changed:
        raise ResumeMismatch(f"{path} is a run with other arguments: {'; '.join(changed)}. Rerun with its arguments "
                             f"(--epochs and --max-steps may grow) or use another --out.", "out")
    for name, module in job.modules.items():
        load_weights(module, saved[name])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    # The schedule's length may have grown with --epochs: the next step takes its lr from the new one.
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
    return Position(saved["epoch"], saved["step"], saved["epoch_step"])


def log_event(out: Path, dist: Dist, record: dict, board=None) -> None:
    """Append a line to RUN_DIR/log.jsonl and print it (rank 0 only); strict JSON: a value that
    is not finite is a ValueError, never a bare NaN in the log. With a TensorBoard ``board``, a
    ``step`` or ``epoch`` line's numbers become scalars ``<event>/<key>`` at its step."""
    if dist.main:
        line = json.dumps(record, allow_nan=False)
        with open(out / LOG, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
        if board is not None and record["event"] in ("step", "epoch"):
            for key, value in record.items():
                if key not in ("event", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    board.add_scalar(f"{record['event']}/{key}", value, record["step"])
            board.flush()


def tensorboard_writer(out: Path, dist: Dist, args: argparse.Namespace, pos: Position):
    """With ``--tensorboard``, rank 0's SummaryWriter on RUN_DIR, which hides the scalars an
    earlier invocation wrote past ``pos`` (``purge_step``: those steps are trained again); else None."""
    if not (args.tensorboard and dist.main):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out), purge_step=pos.step + 1)


def items_log(out: Path, dist: Dist, pos: Position, args: argparse.Namespace) -> Path | None:
    """RUN_DIR/items-rank{r}.jsonl with ``--record-items``, kept up to the run's step (lines a
    killed run wrote past its checkpoint are dropped: those steps are taken again)."""
    if not args.record_items:
        return None
    path = out / f"items-rank{dist.rank}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= pos.step))
    return path


def all_reduce_sum(values: Sequence[float], dist: Dist) -> list[float]:
    if dist.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@dataclass
class Totals:
    """Sums over steps and ranks: ``sums`` of the per-clip loss terms, clips, and the seconds the
    ranks spent (``seconds``) and waited on the DataLoader (``wait``)."""

    sums: dict[str, float] = field(default_factory=dict)
    clips: int = 0
    steps: int = 0
    wait: float = 0.0
    seconds: float = 0.0

    def add(self, other: Totals) -> None:
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.clips += other.clips
        self.steps += other.steps
        self.wait += other.wait
        self.seconds += other.seconds

    def reduced(self, dist: Dist) -> Totals:
        names = sorted(self.sums)
        *sums, clips, wait, seconds = all_reduce_sum([*(self.sums[n] for n in names), self.clips, self.wait, self.seconds], dist)
        return Totals(dict(zip(names, sums)), round(clips), self.steps, wait, seconds)

    def summary(self, world_size: int) -> dict:
        """Means per clip of the loss terms, clips/s of all ranks, and the fraction of the time
        the ranks waited for a batch (``data_wait``)."""
        seconds = self.seconds / world_size
        means = {name: value / max(self.clips, 1) for name, value in self.sums.items()}
        return {**means, "steps": self.steps, "clips_per_s": self.clips / seconds if seconds else 0.0,
                "data_wait": self.wait / self.seconds if self.seconds else 0.0, "seconds": seconds}


def train_epoch(net: nn.Module, job: Job, loader: DataLoader, optimizer, scheduler, scaler, pos: Position,
                stop: int, args: argparse.Namespace, dist: Dist, items: Path | None, board=None) -> tuple[Totals, float]:
    """Train from ``pos`` to the end of its epoch or to step ``stop``, updating ``pos``; returns
    this rank's totals and the lr of the last step. With ``--log-every N``, logs a ``step`` line
    (all ranks reduced) at every step that is a multiple of N."""
    sampler: ResumableSampler = loader.sampler
    sampler.set_epoch(pos.epoch, skip=pos.epoch_step * args.batch_size)
    remaining = len(loader)
    steps = min(remaining, stop - pos.step)
    indices = [i for i, _ in sampler] if items else []
    net.train()
    totals, lr = Totals(), scheduler.get_last_lr()[0]
    show = args.progress if dist.main else False  # None: when stderr is a terminal
    bar = tqdm(total=pos.epoch_step + remaining, initial=pos.epoch_step, desc=f"epoch {pos.epoch + 1}/{args.epochs}",
               unit="step", disable=None if show is None else not show, dynamic_ncols=True)
    start = ready = window_start = time.perf_counter()
    window = Totals()  # since the last step line
    batches = iter(loader)
    for k in range(steps):
        batch = next(batches)
        wait = time.perf_counter() - ready
        if items:
            record = {"step": pos.step + 1, "epoch": pos.epoch, "items": indices[k * args.batch_size : (k + 1) * args.batch_size],
                      "videos": list(batch["video_id"])}
            with open(items, "a") as f:
                f.write(json.dumps(record) + "\n")
        torch.manual_seed(step_seed(args.seed, dist.rank, pos.step))
        lr = scheduler.get_last_lr()[0]
        with autocast(dist.device):
            result = job.step(net, to_device(batch, dist.device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(result.loss.mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        # One device sync per step: the step time and the data wait are then what the device saw.
        sums = torch.stack([result.loss.detach().sum(), *(t.detach().sum() for t in result.terms.values())]).float()
        finite = torch.isfinite(sums).all().int()
        if dist.world_size > 1:  # every rank stops at the same step
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        values = sums.tolist()
        pos.step += 1
        pos.epoch_step += 1
        if not finite:
            terms = ", ".join(f"{name} {value / len(result.loss):.4g}" for name, value in zip(["loss", *result.terms], values))
            raise NonFinite(f"the loss is not finite ({terms})" if dist.world_size == 1 else
                            f"the loss is not finite on at least one rank (rank {dist.rank}: {terms})")
        done = Totals(dict(zip(["loss", *result.terms], values)), clips=len(result.loss), steps=1, wait=wait)
        totals.add(done)
        window.add(done)
        bar.update()
        bar.set_postfix(loss=f"{values[0] / len(result.loss):.3f}", lr=f"{lr:.2g}")
        if args.log_every and pos.step % args.log_every == 0:
            window.seconds = time.perf_counter() - window_start
            log_event(Path(args.out), dist, {"event": "step", "step": pos.step, "epoch": pos.epoch, "lr": lr,
                                             **window.reduced(dist).summary(dist.world_size)}, board)
            window, window_start = Totals(), time.perf_counter()
        ready = time.perf_counter()
    totals.seconds = time.perf_counter() - start
    bar.close()
    if steps == remaining:
        pos.epoch, pos.epoch_step = pos.epoch + 1, 0
    return totals, lr


def evaluate(net: nn.Module, job: Job, loader: DataLoader, dist: Dist) -> dict:
    """``val_top1``: the clip logits averaged over each video's K clips (``--val-clips``), argmax
    against the label; ``val_loss`` and ``val_<term>``: means over clips. Each clip counts once:
    ClipSampler pads the ranks with repeats of the first items, which are left out here."""
    dataset, k = loader.dataset, loader.dataset.views_per_video
    videos = len(dataset) // k
    logits = torch.zeros(videos, job.num_classes, dtype=torch.float64, device=dist.device)
    sums: dict[str, Tensor] = {}
    loader.sampler.set_epoch(0)
    net.eval()
    seen = 0
    with torch.no_grad():
        for batch in loader:
            # shuffle=False: this rank's j-th item is position rank + j * world_size of the item order,
            # and positions past the end are the padding repeats.
            position = dist.rank + dist.world_size * (seen + torch.arange(len(batch["label"]), device=dist.device))
            seen += len(batch["label"])
            keep = position < len(dataset)
            with autocast(dist.device):
                result = job.step(net, to_device(batch, dist.device))
            logits.index_add_(0, position[keep] // k, result.logits.double()[keep])
            for name, values in {"loss": result.loss, **result.terms}.items():
                sums[name] = sums.get(name, 0) + values.double()[keep].sum()
    names = sorted(sums)
    totals = torch.cat([logits.flatten(), torch.stack([sums[n] for n in names])])
    if dist.world_size > 1:
        torch.distributed.all_reduce(totals)
    logits = totals[: logits.numel()].view_as(logits)
    labels = torch.tensor(dataset.labels[::k], device=dist.device)
    top1 = (logits.argmax(1) == labels).double().mean().item()
    metrics = {"val_top1": top1, **{f"val_{n}": v / len(dataset) for n, v in zip(names, totals[logits.numel() :].tolist())}}
    bad = [f"{name} {value:.4g}" for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise NonFinite(f"the validation metrics are not finite ({', '.join(bad)})")
    return metrics


def non_finite_weights(job: Job) -> list[str]:
    """The floating-point tensors of ``job``'s modules (parameters and buffers) that hold a NaN or
    an infinity, as ``module.name``; one device sync."""
    named = [(f"{key}.{name}", t) for key, module in job.modules.items() for name, t in module.state_dict().items()
             if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def run(job: Job, args: argparse.Namespace, dist: Dist, saved: dict | None) -> RunResult:
    """Train ``job`` as ``args`` say, from RUN_DIR's checkpoint ``saved`` (:func:`run_folder`)
    when there is one. A loss, validation metric or weight that is not finite stops the run
    before it saves anything more: :class:`NonFinite`, with a ``stop`` line in the log."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainable = job.trainable.to(dist.device)
    optimizer = make_optimizer(trainable.parameters(), args)
    loader = make_loader(job.train_set, args, dist, shuffle=True)
    val_loader = make_loader(job.val_set, args, dist, shuffle=False) if job.val_set is not None else None
    steps_per_epoch = len(loader)
    scheduler = cosine_schedule(optimizer, args.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dist.device.type == "cuda")
    checkpoint = out / CHECKPOINT
    resumed = saved is not None
    pos = load_checkpoint(saved, checkpoint, job, optimizer, scheduler, scaler, args, dist.world_size) if resumed else Position()
    stop = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    if pos.step >= stop:
        if dist.main:
            print(f"{out}: the run is at step {pos.step} (epoch {pos.epoch}); nothing to do up to step {stop}")
        return RunResult(job, None)
    items = items_log(out, dist, pos, args)
    board = tensorboard_writer(out, dist, args, pos)
    net = trainable
    if dist.world_size > 1:
        net = DistributedDataParallel(trainable, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    log_event(out, dist, {"event": "start", "step": pos.step, "epoch": pos.epoch, "epoch_step": pos.epoch_step,
                          "resumed": resumed, "steps_per_epoch": steps_per_epoch, "stop_step": stop,
                          "world_size": dist.world_size, "device": str(dist.device), **job.start, "args": run_args(args)})

    kept = pos.step if resumed else None  # the step the checkpoint holds

    def save() -> None:
        nonlocal kept
        if job.check is not None:
            job.check()
        bad = non_finite_weights(job)
        if bad:
            raise NonFinite(f"the weights are not finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        if dist.main:
            save_checkpoint(checkpoint, job, optimizer, scheduler, scaler, pos, args, dist.world_size)
        kept = pos.step

    everything, val, val_step = Totals(), {}, None
    try:
        while pos.step < stop:
            totals, lr = train_epoch(net, job, loader, optimizer, scheduler, scaler, pos, stop, args, dist, items, board)
            totals = totals.reduced(dist)
            everything.add(totals)
            if pos.epoch_step == 0:
                if val_loader is not None:
                    val, val_step = evaluate(net, job, val_loader, dist), pos.step
                save()
                log_event(out, dist, {"event": "epoch", "step": pos.step, "epoch": pos.epoch, "lr": lr,
                                      **totals.summary(dist.world_size), **val}, board)
        if pos.epoch_step:  # stopped by --max-steps within an epoch
            save()
        if val_loader is not None and val_step != pos.step:
            val = evaluate(net, job, val_loader, dist)
    except NonFinite as e:
        kept_text = f"{checkpoint} keeps step {kept}" if kept is not None else "no checkpoint was saved"
        message = f"step {pos.step}: {e}: the run stops; {kept_text}"
        log_event(out, dist, {"event": "stop", "step": pos.step, "epoch": pos.epoch, "checkpoint_step": kept, "reason": message})
        raise NonFinite(message) from None
    end = {"event": "end", "step": pos.step, "epoch": pos.epoch, "epoch_step": pos.epoch_step, "lr": lr,
           **everything.summary(dist.world_size), **val}
    log_event(out, dist, end)
    if board is not None:
        board.close()
    return RunResult(job, end)


def usage_message(parser: argparse.ArgumentParser, error: OptionError) -> str:
    """The line argparse prints for a bad value, for ``error``: ``PROG: error: argument --OPTION: ...``."""
    return f"{parser.prog}: error: argument {option_flag(error.option)}: {error}\n"


def launch(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
           build_job: Callable[[argparse.Namespace, Dist], Job]) -> RunResult:
    """A script's ``main``: parse ``argv``, check ``--shards``, ``--out`` and ``--device``, join
    the process group under torchrun, seed torch (so a seed gives the same initial weights), build
    the job and train it. Bad usage (an :class:`OptionError`) exits with status 2 and a
    :class:`NonFinite` stop with 3, each with one line on stderr."""
    args = parser.parse_args(argv)
    try:
        args.shards = [shard_location(s) for s in args.shards]
        saved = run_folder(Path(args.out))
        dist = setup_distributed(args.device)
    except OptionError as e:
        parser.exit(EXIT_USAGE, usage_message(parser, e))
    except ValueError as e:  # --device, named by resolve_device's message
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {e}\n")
    try:
        torch.manual_seed(args.seed)
        return run(build_job(args, dist), args, dist, saved)
    except OptionError as e:
        status, message = EXIT_USAGE, usage_message(parser, e)
    except NonFinite as e:
        status, message = EXIT_NON_FINITE, f"{parser.prog}: error: {e}\n"
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
    # Exit outside the except clauses: the failed run's frames, and with them its DataLoaders and
    # their worker processes, are released here, before the interpreter shuts down.
    parser.exit(status, message)
