"""The ``flowprep`` command: parses options, calls the library, prints."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import click

from flowprep.errors import OptionError
from flowprep.extract import ExtractReport, OutputMismatch, OutputRefused, allowed_failures, extract
from flowprep.flow import BACKENDS, parse_flow_params
from flowprep.lock import OutputLocked
from flowprep.pipeline import NO_FLOW, ExtractConfig
from flowprep.process import run_and_exit
from flowprep.shards import ShardReader
from flowprep.shards.layout import FAILURES, TEACHERS, read_failures
from flowprep.storage import Storage, storage
from flowprep.teacher.targets import list_teachers

EXIT_FAILURES = 3
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
NO_SPLIT = "(no split)"  # info's name for the videos that came without a split
# What reading an output folder raises for an ordinary problem (missing, damaged, unknown video):
# one line each, exit status 1.
READ_ERRORS = (OSError, ValueError, KeyError, IndexError)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


ALLOW_FAILURES = click.option("--allow-failures", default="0", show_default=True,
                              help="Failed videos tolerated before the exit status is non-zero: a count (5) or a fraction (0.02).")


def parse_size(text: str) -> int:
    """``"1GiB"``, ``"512M"``, ``"1000000"`` to bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 512M or 1GiB")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** "_KMGT".index(unit.upper() or "_"))
    if size < 1:
        raise click.BadParameter(f"{text!r} is less than one byte")
    return size


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` without NaN and infinities (which click's range lets through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class OutputLocation(click.ParamType):
    """An output folder: a local path (checked like ``click.Path``) or an ``s3://``/``gs://`` URI."""

    name = "path or URI"

    def __init__(self, exists: bool = False):
        self._path = click.Path(exists=exists, file_okay=False)

    def convert(self, value, param, ctx):
        if "://" not in str(value):
            return self._path.convert(value, param, ctx)
        try:
            storage(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return value


def bad_usage(error: OptionError) -> click.UsageError:
    """``error`` as bad usage of the current command (exit status 2), naming the option it concerns."""
    ctx = click.get_current_context()
    param = next((p for p in ctx.command.params if p.name == error.option), None)
    return click.BadParameter(str(error), ctx, param) if param else click.UsageError(str(error), ctx)


def one_line(error: Exception) -> str:
    """``error`` as the one line the CLI prints: a system error's file and reason (without
    library detail), a KeyError's message unquoted, else the message."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, OSError) and error.errno:
        return f"{error.filename}: {error.strerror}" if error.filename else os.strerror(error.errno)
    return str(error)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: int, quiet: bool) -> None:
    """flowprep: Kinetics-style videos to sharded RGB and TV-L1 optical-flow tensors."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def extract_options(f):
    options = [
        click.option("--src", required=True, type=click.Path(exists=True, file_okay=False), help="Kinetics folder: <split>/<label>/<id>.mp4, <label>/<id>.mp4, or flat with --annotations."),
        click.option("--out", required=True, type=OutputLocation(), help="Output folder (created; rerun the same command to resume), or s3://bucket/prefix, gs://bucket/prefix (Arrow shards; docs/cluster.md)."),
        click.option("--annotations", type=click.Path(exists=True, dir_okay=False), help="Kinetics annotation CSV (label,youtube_id,time_start,time_end,split)."),
        click.option("--trim", is_flag=True, help="Cut full-length sources <youtube_id>.<ext> to the CSV's [time_start, time_end]."),
        click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False), help="Class names, one a line, in index order (default: sorted class names found)."),
        click.option("--limit", type=click.IntRange(min=1), help="Only the first N videos found (a quick try; missing files are still all reported)."),
        click.option("--fps", default=25, show_default=True, type=click.IntRange(min=1), help="Output frame rate, resampled by timestamp."),
        click.option("--short-side", default=256, show_default=True, type=click.IntRange(min=16), help="Resize the short side to this many pixels."),
        click.option("--max-frames", type=click.IntRange(min=2), help="At most N frames per video."),
        click.option("--flow", "flow_backend", default="auto", show_default=True, type=click.Choice(["auto", *sorted(BACKENDS), NO_FLOW]), help=f"Flow backend: torch (PyTorch TV-L1, on a GPU when there is one), opencv-cuda (needs OpenCV built with CUDA), opencv (CPU), or auto: torch on a GPU, then opencv-cuda, then opencv. {NO_FLOW}: no flow, RGB-only shards (no --flow-params; the other flow options are recorded, unused)."),
        click.option("--flow-params", default="", help="TV-L1 parameters, e.g. tau=0.25,lambda=0.15,warps=5 (all recorded). torch: variant=cpu (OpenCV CPU's algorithm, the default) or variant=cuda (OpenCV CUDA's, with iterations=300)."),
        click.option("--flow-bound", default=20.0, show_default=True, type=FiniteFloatRange(min=0, min_open=True), help="Clip flow to ±this many pixels."),
        click.option("--flow-dtype", default="uint8", show_default=True, type=click.Choice(["uint8", "float16"]), help="uint8: quantized to the bound; float16: unquantized."),
        click.option("--rgb-codec", default="jpeg-rst:95", show_default=True, help="RGB frame codec: jpeg:Q, jpeg-rst:Q (crops decode only their MCUs), yuv420:lz4, yuv420:zstd:L, yuv420:raw (crops unpack only their tiles), png:L, zstd:L or raw (docs/format.md)."),
        click.option("--flow-codec", default="zstd:3", show_default=True, help="Flow frame codec: zstd:L, png:L, jpeg:Q or raw."),
        click.option("--format", "fmt", default="arrow", show_default=True, type=click.Choice(["arrow", "hdf5"]), help="Shard file format."),
        click.option("--shard-size", default="1GiB", show_default=True, callback=lambda ctx, p, v: parse_size(v), help="Target size of a shard: videos go into shards in input order by their estimated size (from the container header), never split (docs/architecture.md)."),
        click.option("--chunk-frames", default=8, show_default=True, type=click.IntRange(min=1), help="Frames per stored batch and per flow task."),
        click.option("--fail-corrupt", is_flag=True, help="Fail a video (stage decode) when FFmpeg flags one of its frames as corrupt; by default it is written, with a warning and the count in the index."),
        click.option("--workers", type=click.IntRange(min=0), help="Flow workers (default: every CPU of the Ray cluster, or --gpu-share per GPU for a GPU backend; 0: no Ray, this process only). With --flow none: CPUs, one decoder each by default."),
        click.option("--decoders", type=click.IntRange(min=1), help="Decode workers (default: one per 16 CPU flow workers, or per 4 CPUs beside GPU flow workers; with --flow none, --workers)."),
        click.option("--writers", default="auto", show_default=True, type=click.Choice(["auto", "workers", "driver"]), help="Where Ray runs write shards: workers (each shard by a task on a cluster node, straight to --out: no byte through this process; a local --out must then be the same shared folder on every node), driver (this process writes every shard), or auto: workers for s3:// or gs:// and on a one-node cluster, else driver."),
        click.option("--gpu-share", default=1, show_default=True, type=click.IntRange(min=1), help="GPU flow workers per GPU; each gets that share of the GPU and of its memory."),
        click.option("--ray-address", envvar="RAY_ADDRESS", help="Ray cluster to use, e.g. auto (default: $RAY_ADDRESS, else a local Ray)."),
        click.option("--overwrite", is_flag=True, help="Delete flowprep's output in --out (dataset.json, index.parquet, failures.jsonl, shards/, teachers/) and start over. A folder holding any other file is refused, with or without it."),
        click.option("--retry-failed", is_flag=True, help="On a rerun, try again the videos that failed in complete shards too."),
        ALLOW_FAILURES,
        click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command("extract")
@extract_options
@click.option("--dry-run", is_flag=True, help="Write nothing (not even --out) and take no lock: find and plan the videos as the run would, time a short calibration here with the chosen backend and workers, and print the videos, shards, bytes and wall time the run would take (only what is left to do in an existing --out); the last line is JSON.")
def extract_command(src, out, annotations, trim, labels_file, limit, fps, short_side, max_frames, flow_backend, flow_params,
                    flow_bound, flow_dtype, rgb_codec, flow_codec, fmt, shard_size, chunk_frames, fail_corrupt, workers, decoders,
                    writers, gpu_share, ray_address, overwrite, retry_failed, allow_failures, progress, dry_run):
    """Decode, compute TV-L1 flow and write RGB + flow shards for every video under --src
    (RGB-only shards with --flow none).

    A failed video is a line in OUT/failures.jsonl and the run goes on. Rerunning the same
    command resumes: videos in complete shards are skipped (and so are the failures recorded
    while those shards were written, unless --retry-failed); the rest are done again.

    --out must be new, empty or flowprep's own output: a folder holding files that flowprep did
    not write is refused (it never deletes them, --overwrite neither).

    Exit status: 0 when no video failed or the failures are within --allow-failures; 3 when
    more failed; 1 on other errors (--out holds a run with other options or files flowprep did
    not write, a damaged shard, a full disk: the output stays resumable); 2 on bad usage.
    """
    try:
        config = ExtractConfig(fps=fps, short_side=short_side, max_frames=max_frames, trim=trim, flow_backend=flow_backend,
                               flow_params=parse_flow_params(flow_params), flow_bound=flow_bound, flow_dtype=flow_dtype,
                               rgb_codec=rgb_codec, flow_codec=flow_codec, format=fmt, shard_size=shard_size,
                               chunk_frames=chunk_frames, fail_corrupt=fail_corrupt)
    except OptionError as e:
        raise bad_usage(e) from None
    check_allow_failures(allow_failures)
    options = dict(annotations=annotations, labels_file=labels_file, limit=limit, overwrite=overwrite, retry_failed=retry_failed,
                   workers=workers, decoders=decoders, writers=writers, ray_address=ray_address, gpu_share=gpu_share)
    try:
        if dry_run:
            from flowprep.estimate import estimate_run

            print_estimate(estimate_run(src, out, config, **options))
            return
        report = extract(src, out, config, progress=progress, **options)
    except OptionError as e:  # the source or the flow parameters, found wrong before anything is written
        raise bad_usage(e) from None
    except (OutputMismatch, OutputRefused, OutputLocked, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # no room, no permission, --out below a file
        if e.errno in NO_SPACE:
            raise click.ClickException(f"out of space writing to {out} ({one_line(e)}): the output is resumable, "
                                       "make room and rerun the same command") from None
        raise click.ClickException(one_line(e)) from None
    print_summary(report, out)
    exit_for_failures(report.failed, report.videos, allow_failures)


def check_allow_failures(rule: str) -> None:
    """``--allow-failures`` checked before a run starts (exit 2 when it is not a count or fraction)."""
    try:
        allowed_failures(rule, 0)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def exit_for_failures(failed: int, videos: int, rule: str) -> None:
    """Exit with status 3 when more than ``--allow-failures`` of ``videos`` failed."""
    allowed = allowed_failures(rule, videos)
    if failed > allowed:
        click.echo(f"{failed} videos failed, more than --allow-failures {rule} permits ({allowed})", err=True)
        sys.exit(EXIT_FAILURES)


def human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def print_estimate(estimate) -> None:
    """``extract --dry-run``'s report (:class:`~flowprep.estimate.Estimate`); the last line is JSON."""
    e, shape, cal = estimate, estimate.shape, estimate.calibration
    click.echo(f"dry run: nothing written to {e.out} ({e.output} output)")
    click.echo(f"videos:  {e.videos} found, {e.missing} missing, {len(e.unreadable)} unreadable; {e.done} already done, "
               f"{e.to_do} to do in {e.shards} shard(s) ({e.shards_done} complete)")
    for video_id, reason in list(e.unreadable.items())[:5]:
        click.echo(f"         unreadable: {video_id}: {reason}")
    click.echo(f"frames:  {e.frames} frames, {e.flow_pairs} flow pairs (from the container headers)")
    rates = cal.to_dict()
    per_pixel = ", ".join(f"{name} {rates[f'{name}_bytes_per_pixel']:.3f}" for name in ("rgb", "flow")
                          if rates[f"{name}_bytes_per_pixel"] is not None)
    click.echo(f"bytes:   {human_bytes(e.estimated_bytes)} (RGB {human_bytes(e.rgb_bytes)}, flow {human_bytes(e.flow_bytes)}; "
               f"calibrated bytes a pixel: {per_pixel or 'none'}; the shard plan's table says {human_bytes(e.plan_bytes)})")
    if shape.on_gpu:
        spread = f"{shape.flow_workers} flow worker(s) on {shape.gpus} GPU(s) beside {shape.decoders} decoder(s)"
    elif shape.mode == "ray":
        spread = f"{shape.flow_workers} flow worker(s) and {shape.decoders} decoder(s) on {shape.cores} cores"
    else:
        spread = "one process"
    click.echo(f"time:    {human_seconds(e.estimated_seconds)}: decode {human_seconds(e.decode_seconds)} + flow "
               f"{human_seconds(e.flow_seconds)} of work, over {spread}, plus {e.planning_seconds:.1f} s of planning")
    click.echo(f"workers: {shape.counted}")
    click.echo(f"calibration: {cal.pairs} pairs spread over {len(cal.videos)} videos ({', '.join(cal.videos) or 'none'}) and "
               f"{cal.decoded_frames} frames from their starts in {cal.seconds:.1f} s, {e.flow} on {e.device or 'no flow'}"
               + (f"; failed: {', '.join(f'{v} ({r})' for v, r in cal.failed.items())}" if cal.failed else ""))
    for note in e.notes:
        click.echo(f"note:    {note}")
    click.echo(json.dumps(e.to_dict(), sort_keys=True))


def print_summary(report: ExtractReport, out: str | Path) -> None:
    click.echo(f"videos:  {report.videos} found, {report.skipped} already done, {report.written} written, {report.failed} failed"
               + (f" (see {storage(out) / FAILURES})" if report.failed else ""))
    click.echo(f"frames:  {report.frames} frames, {report.flow_pairs} flow pairs in {report.seconds:.1f} s "
               f"({report.frames_per_second:.2f} frames/s, {report.pairs_per_second:.2f} pairs/s)")
    click.echo(f"written: {human_bytes(report.bytes_written)} to {out}")


def describe(out: str | Path) -> dict:
    reader = ShardReader(out)
    store = reader.storage
    rows = [reader.meta(v) for v in reader.video_ids]
    failures = read_failures(store)
    shards = sorted({r["shard"] for r in rows})
    return {
        "out": str(out),
        "videos": len(rows),
        "failed": len(failures),
        "frames": sum(r["num_frames"] for r in rows),
        "has_flow": reader.has_flow,
        "flow_pairs": sum(r["num_frames"] - 1 for r in rows) if reader.has_flow else 0,
        "bytes": sum(r["bytes"] for r in rows),
        "shards": len(shards),
        "shard_bytes": sum(store.size(s) for s in shards),
        "classes": len(reader.label_map),
        "videos_per_split": dict(sorted(Counter(r["split"] or NO_SPLIT for r in rows).items())),
        "params": reader.dataset["params"],
        "versions": reader.dataset["versions"],
        "teachers": {name: describe_teacher(store, name) for name in list_teachers(store)},
    }


def describe_teacher(out: Storage, name: str) -> dict:
    """A teacher's summary, or ``{"error": ...}`` naming the file that cannot be read: one bad
    teacher folder does not hide the rest of the output."""
    from flowprep.teacher.targets import TeacherTargets

    try:
        targets = TeacherTargets(out, name)
        params = targets.description["params"]
        return {"model": params["model"], "outputs": targets.outputs, "grid": params["grid"], "videos": len(targets),
                "views": targets.total_views, "failed": len(read_failures(targets.store)),
                "bytes": sum(size for n, size in targets.store.files("shards").items() if n.endswith(".arrow"))}
    except READ_ERRORS as e:
        return {"error": one_line(e)}


@main.command()
@click.argument("out", type=OutputLocation(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(out, as_json):
    """Summarise an output folder: videos, frames, shards, bytes, parameters.

    Exit status 0, or 1 when the folder cannot be read (one line naming the file). Videos that
    came without a split are counted as "(no split)".
    """
    try:
        summary = describe(out)
    except READ_ERRORS as e:
        raise click.ClickException(one_line(e)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    p = summary["params"]
    click.echo(f"{out}: {summary['videos']} videos ({summary['failed']} failed), {summary['frames']} frames, "
               f"{summary['flow_pairs']} flow pairs, {summary['classes']} classes")
    click.echo(f"shards:  {summary['shards']} {p['format']} files, {human_bytes(summary['shard_bytes'])}")
    click.echo(f"splits:  {', '.join(f'{split}: {n}' for split, n in summary['videos_per_split'].items())}")
    click.echo(f"frames:  {p['fps']} fps, short side {p['short_side']}, rgb {p['rgb_codec']}")
    if summary["has_flow"]:
        click.echo(f"flow:    {p['flow_backend']} {p['flow_params']}, ±{p['flow_bound']} px as {p['flow_dtype']} ({p['flow_codec']})")
    else:
        click.echo(f"flow:    {NO_FLOW} (RGB only)")
    for name, t in summary["teachers"].items():
        if "error" in t:
            click.echo(f"teacher: {name}: cannot be read: {t['error']}")
            continue
        g = t["grid"]
        click.echo(f"teacher: {name}: {t['model']}, {t['videos']} videos ({t['failed']} failed), {t['views']} views "
                   f"(clip {g['clip_len']}x{g['frame_stride']}, crop {g['crop']}, every {g['window_stride']}, {g['crops']} crops"
                   f"{', flips' if g['flip'] else ''}), outputs {t['outputs']}, {human_bytes(t['bytes'])}")


@main.command("teacher")
@click.option("--shards", "out", required=True, type=OutputLocation(exists=True), help="An output folder of flowprep extract (local: the targets are written into it).")
@click.option("--name", required=True, help="The targets' name: they go to SHARDS/teachers/NAME/.")
@click.option("--model", required=True, help="i3d (loads pytorch-i3d state dicts), s3dg, or package.module:factory (called with in_channels=2, num_classes=N).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="State dict (or a dict holding one under state_dict/model); required for i3d and s3dg.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Classes of the model (default: the checkpoint's).")
@click.option("--clip-len", default=64, show_default=True, type=click.IntRange(min=1), help="Flow frames per clip.")
@click.option("--frame-stride", default=1, show_default=True, type=click.IntRange(min=1), help="Step between clip frames.")
@click.option("--crop", default=224, show_default=True, type=click.IntRange(min=1), help="Side of the square crop, pixels.")
@click.option("--window-stride", default=16, show_default=True, type=click.IntRange(min=1), help="Flow positions between clip starts.")
@click.option("--crops", default=3, show_default=True, type=click.IntRange(min=1), help="Crop positions along the long side (both ends and between; 1: centre).")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Also store the mirrored views.")
@click.option("--outputs", default="logits", show_default=True, help="Comma-separated: logits, embedding (the classifier's pooled input), or end-point names such as Mixed_4f (globally pooled).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Views per model batch.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when there is one), cpu, cuda.")
@click.option("--workers", type=click.IntRange(min=0), help="Model workers (default: one per GPU of the Ray cluster, else one per CPU; 0: no Ray, this process only).")
@click.option("--ray-address", envvar="RAY_ADDRESS", help="Ray cluster to use, e.g. auto (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--overwrite", is_flag=True, help="Delete the targets of this name (flowprep's files only; a folder holding others is refused) and start over.")
@click.option("--retry-failed", is_flag=True, help="On a rerun, compute again the target shards that hold failed videos too.")
@ALLOW_FAILURES
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def teacher_command(out, name, model, checkpoint, num_classes, clip_len, frame_stride, crop, window_stride, crops, flip,
                    outputs, batch_size, device, workers, ray_address, overwrite, retry_failed, allow_failures, progress):
    """Run a flow-stream network once over every stored view and keep its outputs.

    Every video gets a grid of views (clip starts every --window-stride flow positions, --crops
    crop positions, unflipped and flipped); each view's outputs are stored as float16 in
    SHARDS/teachers/NAME/, which ClipDataset(teacher=NAME) serves with the RGB clip of that view.
    Rerunning the same command resumes; other options under the same NAME are refused unless
    --overwrite. A video whose flow cannot be read, or on which the model raises, is a line in
    the teacher's failures.jsonl; a lost Ray worker's work is done again by another worker.

    Exit status: 0 when every video has targets or the failures are within --allow-failures; 3
    when more failed; 1 on other errors (the folder holds targets of other options, damaged
    targets or files flowprep did not write, a checkpoint that does not fit the model or a
    teacher of another class count than the shards, another run holds the lock); 2 on bad usage
    (an unknown model, device or output, a file that is not a checkpoint). Nothing is written
    when the options or the model fail their checks.
    """
    from flowprep.devices import resolve_device
    from flowprep.networks import MODELS, CheckpointMismatch, CheckpointUnreadable
    from flowprep.teacher.run import TeacherConfig, TeacherMismatch, compute_targets
    from flowprep.teacher.views import ViewGrid

    if model in MODELS and not checkpoint:
        raise click.UsageError(f"--model {model} needs --checkpoint")
    check_allow_failures(allow_failures)
    try:
        resolve_device(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    try:
        config = TeacherConfig(model=model, checkpoint=checkpoint, num_classes=num_classes,
                               grid=ViewGrid(clip_len, frame_stride, crop, window_stride, crops, flip),
                               outputs=tuple(o.strip() for o in outputs.split(",") if o.strip()), batch_size=batch_size, device=device)
        report = compute_targets(out, name, config, overwrite=overwrite, retry_failed=retry_failed, workers=workers,
                                 ray_address=ray_address, progress=progress)
    except OptionError as e:  # an output without flow, an unknown model or output, no class count
        raise bad_usage(e) from None
    except CheckpointUnreadable as e:
        raise click.BadParameter(str(e), param_hint="--checkpoint") from None
    except (CheckpointMismatch, TeacherMismatch, OutputLocked, ValueError, FileNotFoundError) as e:
        raise click.ClickException(one_line(e)) from None
    click.echo(f"videos:  {report.videos} in the shards, {report.skipped} done before, {report.written} written, {report.failed} failed"
               + (f" (see {Path(out) / 'teachers' / name / FAILURES})" if report.failed else ""))
    click.echo(f"views:   {report.views} in {report.seconds:.1f} s ({report.views_per_second:.2f} views/s)")
    click.echo(f"targets: {report.stored} of {report.videos} videos have targets, {report.videos - report.stored} have none")
    exit_for_failures(report.failed, report.videos, allow_failures)


@main.command()
@click.argument("out", type=OutputLocation(exists=True))
@click.option("--sample-frames", default=3, show_default=True, type=click.IntRange(min=1), help="Frames decoded per video.")
@click.option("--repair", is_flag=True, help="Drop every damaged shard (and leftovers of an interrupted run) and rebuild the index; then rerun the extract command to extract the dropped videos again. Refused while a run writes OUT.")
def verify(out, sample_frames, repair):
    """Check every shard against the index checksums and decode a sample of frames, and every
    teacher's target shards (size, sha256, finite values, rows that hold their views).

    Exit status 0 when all is whole, 1 with the list of problems otherwise. With --repair, the
    problems are listed, every damaged shard is dropped with its index rows and the index is
    rebuilt (exit status 0): a rerun of the same extract command then extracts the videos of the
    dropped shards again. --repair takes the output's lock: while a run writes OUT it is refused
    (exit status 1, naming that run) and deletes nothing; plain verify only reads.
    """
    from flowprep.shards.verify import repair as repair_output
    from flowprep.shards.verify import verify as verify_output
    from flowprep.teacher.verify import repair_targets, target_problems

    store = storage(out)
    try:
        if repair:
            problems, dropped = repair_output(store, sample_frames)
            for name in list_teachers(store):
                found, gone = repair_targets(store, name)
                problems += found
                dropped += [f"{TEACHERS}/{name}/{shard}" for shard in gone]
        else:
            problems = verify_output(store, sample_frames)
            problems += [p for name in list_teachers(store) for _, p in target_problems(store, name)]
    except OutputLocked as e:
        raise click.ClickException(str(e)) from None
    except READ_ERRORS as e:
        raise click.ClickException(one_line(e)) from None
    for problem in problems:
        click.echo(problem)
    if repair:
        if dropped:
            click.echo(f"dropped {len(dropped)} damaged shard(s): {', '.join(dropped)}; rerun the extract command "
                       "(same options) to extract their videos again, and flowprep teacher for teacher targets")
        click.echo(f"{out}: {len(ShardReader(out))} videos whole" + (", repaired" if problems else ", nothing to repair"))
        return
    if problems:
        click.echo(f"{len(problems)} problem(s) in {out}: `flowprep verify {out} --repair` drops the damaged shards "
                   "for a rerun of the extract command to redo", err=True)
        sys.exit(1)
    click.echo(f"{out}: {len(ShardReader(out))} videos verified, no problem")


@main.command()
@click.argument("out", type=OutputLocation(exists=True))
@click.argument("video_id")
@click.option("--out", "dest", required=True, type=click.Path(dir_okay=False), help="FILE.png (one frame) or FILE.mp4 (every flow).")
@click.option("--frame", type=click.IntRange(min=0), help="Frame for a PNG (default: the middle one).")
@click.option("--scale", type=FiniteFloatRange(min=0, min_open=True), help="Flow magnitude in pixels shown in full colour (default: the video's 99th percentile).")
def show(out, video_id, dest, frame, scale):
    """Write RGB beside its flow in the Middlebury colour wheel, frame index and flow scale marked
    (RGB alone, frame index marked, for an output extracted with --flow none).

    The video's stored bytes are checked against the index checksum first. Exit status 0 when
    written, 1 on an error (an unknown video, a missing or damaged shard or index).
    """
    from flowprep.visualize import show as show_video

    try:
        path = show_video(out, video_id, dest, frame, scale)
    except READ_ERRORS as e:
        raise click.ClickException(one_line(e)) from None
    click.echo(f"wrote {path}")


@main.command()
@click.argument("out", type=OutputLocation(exists=True))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--layout", default="rawframes", show_default=True, type=click.Choice(["rawframes"]), help="Target layout.")
@click.option("--quality", default=95, show_default=True, type=click.IntRange(1, 100), help="JPEG quality.")
def export(out, dest, layout, quality):
    """Export to the mmaction2/denseflow rawframes layout (img_/flow_x_/flow_y_ JPEGs and file lists;
    img_ and the RGB list only for an output extracted with --flow none).

    Every video's stored bytes are checked against the index checksum as it is read. Exit status
    0 when all is written, 1 on an error (a missing or damaged shard or index, DEST not writable).
    """
    from flowprep.export import export_rawframes

    try:
        counts = export_rawframes(out, dest, quality)
    except READ_ERRORS as e:
        raise click.ClickException(one_line(e)) from None
    click.echo(f"wrote {sum(counts.values())} videos to {dest} ({', '.join(f'{k}: {v}' for k, v in counts.items())})")


@main.command()
@click.option("--flow", default="auto", show_default=True, type=click.Choice(["auto", *sorted(BACKENDS)]), help="Backend to measure: auto is the one extract picks here (torch on a GPU, then opencv-cuda, then opencv).")
@click.option("--size", default="340x256", show_default=True, help="WIDTHxHEIGHT of the frame pairs (the sample clips scaled to cover it, centre-cropped).")
@click.option("--pairs", default=8, show_default=True, type=click.IntRange(min=1), help="Frame pairs per timed run (fidelity: the first 32).")
@click.option("--batch", type=click.IntRange(min=1), help="torch: pairs solved at once (default: all, as far as GPU memory allows).")
@click.option("--device", help="cpu, cuda or cuda:N (default: a GPU when torch sees one; opencv runs on the CPU).")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs; pairs/s is their median.")
def bench(flow, size, pairs, batch, device, repeat):
    """Measure a flow backend here on real frame pairs of the sample clips: pairs/s, peak GPU
    memory per pair, and end-point error against OpenCV's CPU TV-L1 with the same parameters.

    opencv runs one single-threaded solver per core (as extract's flow workers); torch on CUDA
    runs eagerly and compiled (torch.compile, what extract uses there), each after an untimed
    run. Each stage is said on stderr as it ends (a first compilation on a GPU can take
    minutes); the last line is JSON. Exit status 0, 2 on bad usage (a backend or device this
    machine does not have included).
    """
    from flowprep.bench import CLIPS, FIDELITY_PAIRS, NOISE_GRAY_LEVELS, bench_flow, parse_frame_size

    try:
        result = bench_flow(flow, parse_frame_size(size), pairs, batch, device, repeat, say=lambda line: click.echo(line, err=True))
    except OptionError as e:
        raise bad_usage(e) from None
    summary = result.to_dict()
    click.echo(f"flow:     {result.flow} on {result.device}, {summary['size']}, {result.pairs} pairs ({result.distinct_pairs} "
               f"distinct) of {', '.join(CLIPS)}, {repeat} timed runs, parameters {result.params}")
    per = f"with {result.processes} single-thread processes" if result.processes else "per GPU" if result.device != "cpu" else "on the CPU"
    for name, mode in result.modes.items():
        memory = f", peak {human_bytes(mode['peak_bytes_per_pair'])} a pair" if mode["peak_bytes_per_pair"] is not None else ""
        click.echo(f"speed:    {name}: {mode['pairs_per_s']:.3f} pairs/s {per} (min {mode['pairs_per_s_min']:.3f}, "
                   f"max {mode['pairs_per_s_max']:.3f}), batch {mode['batch']}{memory}")
    for name, mode in result.modes.items():
        click.echo(f"fidelity: {name}: mean EPE {mode['epe_vs_opencv']:.4f} px, p99 {mode['epe_p99_vs_opencv']:.4f} px against "
                   f"{result.reference}, on {min(pairs, FIDELITY_PAIRS)} pairs")
    floor = result.noise_floor
    click.echo(f"noise:    OpenCV against itself with {NOISE_GRAY_LEVELS} gray levels of noise: mean EPE "
               f"{floor['mean_epe_px']:.4f} px, p99 {floor['p99_epe_px']:.4f} px (docs/flow.md)")
    click.echo(json.dumps(summary, sort_keys=True))


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False), help="Output folder (a previous demo's output is replaced; any other folder must be new or empty).")
@click.option("--workers", type=click.IntRange(min=0), help="Flow workers (default: every CPU).")
def demo(out, workers):
    """Build a small Kinetics-style folder from real sample clips, extract it, read a clip back."""
    from flowprep.samples import make_sample_folder

    with tempfile.TemporaryDirectory(prefix="flowprep-demo-") as src:
        videos = make_sample_folder(src)
        click.echo(f"source: {len(videos)} sample videos in {src}")
        config = ExtractConfig(short_side=96, max_frames=16, shard_size=256 * 1024, chunk_frames=8)
        try:
            report = extract(src, out, config, overwrite=True, workers=workers)
        except OutputRefused as e:  # --out holds files flowprep did not write
            raise click.ClickException(str(e)) from None
    print_summary(report, Path(out))
    reader = ShardReader(out)
    video_id = reader.video_ids[0]
    rgb, flow = reader.rgb(video_id, 0, 8), reader.flow(video_id, 0, 8)
    magnitude = (flow ** 2).sum(-1) ** 0.5
    click.echo(f"read back {video_id!r} ({reader.meta(video_id)['label']}): rgb {tuple(rgb.shape)} {rgb.dtype}, "
               f"flow {tuple(flow.shape)} {flow.dtype}, mean |flow| {magnitude.mean():.2f} px, max {magnitude.max():.2f} px")
    click.echo(f"inspect it: flowprep info {out}")


def run() -> None:
    """The ``flowprep`` console command: :func:`main`, ended by :func:`~flowprep.process.run_and_exit`."""
    run_and_exit(main)


if __name__ == "__main__":
    run()
