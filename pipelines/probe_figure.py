"""EPE per layer of several motion-probe runs on one axis: the D3D paper's probe figure.

    python pipelines/probe_figure.py probes/rgb-pwc probes/d3d-pwc --labels s3dg,d3d --out figures/probe-pwc.png

Each RUN is a folder of ``pipelines/probe_motion.py``; its ``probe_layers.json`` gives one line of
the figure (EPE of its decoders on held-out clips, pixels per frame, against the layer), labelled
by ``--labels`` (default: the folders' names). Layers are placed in network order, every layer of
any run once; the all-zeros prediction's EPE is drawn dashed (once when the runs share it). The
same numbers are printed as a table, one row per layer. The figure's format follows the suffix of
``--out`` (.png, .pdf, .svg, ...) and needs matplotlib (``pip install "flowprep[plots]"``).

Exit status 2: bad usage, one line: a RUN without ``probe_layers.json`` (or one that cannot be
read), as many ``--labels`` as runs not given, no matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowprep.probe import layer_order, plot_layers, read_layers, shared_zeros
from flowprep.process import run_and_exit


def table(curves: list[tuple[str, list[dict]]]) -> list[str]:
    """Lines of text: a header, then one row per layer: each run's EPE (``-`` where a run did not
    probe the layer) and the zeros EPE (one column when the runs share it, else one per run)."""
    order = layer_order([rows for _, rows in curves])
    columns = [(label, {r["layer"]: r["epe"] for r in rows}) for label, rows in curves]
    zeros = shared_zeros(curves)
    columns += ([("zeros", zeros)] if zeros is not None
                else [(f"zeros {label}", {r["layer"]: r["epe_zeros"] for r in rows}) for label, rows in curves])
    first = max(len(name) for name in ["layer", *order])
    widths = [max(len(header), 6) for header, _ in columns]
    lines = ["  ".join([f"{'layer':{first}}", *(f"{header:>{w}}" for (header, _), w in zip(columns, widths))])]
    for layer in order:
        cells = [f"{values[layer]:>{w}.3f}" if layer in values else f"{'-':>{w}}" for (_, values), w in zip(columns, widths)]
        lines.append("  ".join([f"{layer:{first}}", *cells]))
    return lines


def main(argv=None) -> list[tuple[str, list[dict]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", metavar="RUN", nargs="+", type=Path, help="folders of pipelines/probe_motion.py")
    parser.add_argument("--labels", help="one name per run, joined by commas (default: the folders' names)")
    parser.add_argument("--out", required=True, type=Path, help="the figure (FIG.png)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels is not None else [run.resolve().name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.exit(2, f"{parser.prog}: error: argument --labels: {len(labels)} labels for {len(args.runs)} runs\n")
    try:
        curves = [(label, read_layers(run)) for label, run in zip(labels, args.runs)]
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, f"{parser.prog}: error: the figure needs matplotlib: pip install \"flowprep[plots]\"\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_layers(curves, args.out)
    print(f"EPE per layer (pixels per frame, held-out clips) -> {args.out}")
    print("\n".join(table(curves)))
    return curves


if __name__ == "__main__":
    run_and_exit(main)
