"""Per-class accuracy gains of one evaluation over another: the D3D paper's per-class figure.

    python pipelines/compare.py evals/s3dg-rgb evals/d3d --out figures/d3d-vs-rgb

EVAL_A and EVAL_B are folders of ``pipelines/evaluate.py`` over the same videos. Writes
``DIR/per_class.csv`` (``label,videos,accuracy_a,accuracy_b,delta``: top-1 accuracies as
fractions, ``delta = accuracy_b - accuracy_a``, sorted by delta, largest gain first) and
``DIR/per_class.png`` (horizontal bars, in accuracy points, of the ``--top`` classes that gain
most and the ``--top`` that lose most), and prints those gains and losses. The figure needs
matplotlib (``pip install "flowprep[plots]"``). Exit status 2: bad usage, including
evaluations of different videos.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from flowprep.evaluate import per_class_gains, read_eval
from flowprep.process import run_and_exit
from flowprep.train import positive_int

COLUMNS = ("label", "videos", "accuracy_a", "accuracy_b", "delta")


def extremes(rows: list[dict], top: int) -> tuple[list[dict], list[dict]]:
    """The ``top`` largest gains and the ``top`` largest losses of rows sorted by delta, each
    largest first (ties by label)."""
    gains = [r for r in rows if r["delta"] > 0][:top]
    losses = sorted((r for r in rows if r["delta"] < 0), key=lambda r: (r["delta"], r["label"]))[:top]
    return gains, losses


def plot(gains: list[dict], losses: list[dict], names: tuple[str, str], path: Path) -> None:
    """Horizontal bars of the gains (top, green) and losses (bottom, red) in accuracy points."""
    from matplotlib.figure import Figure

    shown = gains + losses[::-1]  # largest gain at the top, largest loss at the bottom
    figure = Figure(figsize=(7, 1.2 + 0.3 * max(len(shown), 1)), layout="constrained")
    axes = figure.subplots()
    positions = range(len(shown))[::-1]
    axes.barh(list(positions), [100 * r["delta"] for r in shown],
              color=["tab:green" if r["delta"] > 0 else "tab:red" for r in shown])
    axes.set_yticks(list(positions), [r["label"] for r in shown])
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel(f"per-class top-1 accuracy, {names[1]} minus {names[0]} (points)")
    if not shown:
        axes.text(0.5, 0.5, "no class changes", ha="center", va="center", transform=axes.transAxes)
    figure.savefig(path, dpi=150)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_a", metavar="EVAL_A", type=Path, help="the baseline evaluation folder")
    parser.add_argument("eval_b", metavar="EVAL_B", type=Path, help="the evaluation compared with it")
    parser.add_argument("--out", required=True, type=Path, help="DIR: per_class.csv, per_class.png")
    parser.add_argument("--top", type=positive_int, default=10, help="classes shown among the gains and among the losses")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, f"{parser.prog}: error: per_class.png needs matplotlib: pip install \"flowprep[plots]\"\n")
    try:
        rows = per_class_gains(read_eval(args.eval_a), read_eval(args.eval_b))
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    gains, losses = extremes(rows, args.top)
    names = (args.eval_a.resolve().name, args.eval_b.resolve().name)
    plot(gains, losses, names, args.out / "per_class.png")
    print(f"per-class top-1 accuracy of {args.eval_b} against {args.eval_a}, {len(rows)} classes")
    for title, shown in (("gains", gains), ("losses", losses)):
        print(f"largest {title}:" if shown else f"no {title}")
        for r in shown:
            print(f"  {100 * r['delta']:+6.1f}  {r['label']}  ({100 * r['accuracy_a']:.1f} -> {100 * r['accuracy_b']:.1f}, {r['videos']} videos)")
    return rows


if __name__ == "__main__":
    run_and_exit(main)
