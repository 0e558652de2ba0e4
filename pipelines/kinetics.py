"""Ray cluster job: extract every split of a Kinetics download with one label map.

Expects the layout of the official download scripts::

    <root>/annotations/train.csv   val.csv   test.csv   (label,youtube_id,time_start,time_end,split)
    <root>/train/*.mp4   <root>/val/*.mp4   <root>/test/*.mp4

and writes ``<out>/<split>/`` per split plus ``<out>/labels.txt`` (sorted classes of train.csv),
so that label indices agree across splits. Submit it to a cluster with::

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python pipelines/kinetics.py --root /data/kinetics400 --out /data/k400-flow

Rerunning the same command resumes every split. Without ``--splits``, those of train, val and
test that have a folder are extracted (a missing one is a warning); a split named in ``--splits``
must exist. Extra ``flowprep extract`` options can follow
``--`` (e.g. ``-- --format hdf5 --short-side 256``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flowprep.cli import main as flowprep_main
from flowprep.process import run_and_exit
from flowprep.sources import build_label_map, read_annotations

DEFAULT_SPLITS = ("train", "val", "test")


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--splits", help="Comma-separated splits to extract; each must exist. Default: those of train, val, test that exist.")
@click.option("--ray-address", default="auto", show_default=True)
@click.argument("extract_args", nargs=-1, type=click.UNPROCESSED)
def run(root: Path, out: Path, splits: str | None, ray_address: str, extract_args: tuple[str, ...]) -> None:
    if splits is None:
        present = [s for s in DEFAULT_SPLITS if (root / s).is_dir()]
        for split in sorted(set(DEFAULT_SPLITS) - set(present), key=DEFAULT_SPLITS.index):
            click.echo(f"warning: no {root / split} folder: split {split} skipped", err=True)
        if not present:
            raise click.UsageError(f"none of the splits {', '.join(DEFAULT_SPLITS)} has a folder under {root}")
    else:
        present = splits.split(",")
        missing = [s for s in present if not (root / s).is_dir()]
        if missing:
            raise click.UsageError(f"--splits names {', '.join(missing)}, but {root} has no such folder")
    out.mkdir(parents=True, exist_ok=True)
    labels = out / "labels.txt"
    if not labels.exists():
        rows = read_annotations(root / "annotations" / "train.csv")
        labels.write_text("".join(f"{name}\n" for name in build_label_map(r.get("label") for r in rows)))
    status = 0
    for split in present:
        args = ["extract", "--src", str(root / split), "--out", str(out / split), "--annotations",
                str(root / "annotations" / f"{split}.csv"), "--labels", str(labels), "--ray-address", ray_address, *extract_args]
        click.echo(f"flowprep {' '.join(args)}")
        try:
            flowprep_main(args, standalone_mode=False)
        except SystemExit as e:  # a split over its failure allowance: go on with the others
            status = max(status, e.code or 0)
        except click.ClickException as e:  # e.g. a missing split folder: report it, do the others
            e.show()
            status = max(status, e.exit_code)
    sys.exit(status)


if __name__ == "__main__":
    run_and_exit(run)
