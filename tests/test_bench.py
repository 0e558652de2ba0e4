"""``flowprep bench`` on tiny pairs of the sample clips: its report, and its usage errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flowprep.cli import main

KEYS = {"flow", "device", "pairs_per_s", "epe_vs_opencv", "epe_p99_vs_opencv", "peak_bytes_per_pair", "noise_floor", "modes"}


def bench(*args) -> dict:
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 0, result.output
    # Each stage is said on stderr as it ends, the reference first.
    stages = [line.split("] ", 1)[1].split(":")[0] for line in result.stderr.splitlines()]
    assert stages[0] == "reference" and len(stages) >= 2, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert stages[1:] == list(summary["modes"])
    return summary


def test_opencv_against_itself_is_exact():
    summary = bench("--flow", "opencv", "--pairs", "2", "--size", "64x48")
    assert KEYS <= summary.keys()
    assert (summary["flow"], summary["device"], summary["size"], summary["pairs"]) == ("opencv", "cpu", "64x48", 2)
    assert summary["pairs_per_s"] > 0 and len(summary["modes"]["processes"]["seconds"]) == 3
    assert summary["peak_bytes_per_pair"] is None
    # A separate solve of the same pairs with the same parameters; noise far below one gray level
    # moves OpenCV's flow, so an exact match is not a comparison that cannot fail.
    assert summary["epe_vs_opencv"] == summary["epe_p99_vs_opencv"] == 0.0
    assert summary["noise_floor"]["mean_epe_px"] > 0


def test_torch_on_the_cpu_is_near_opencv():
    summary = bench("--flow", "torch", "--device", "cpu", "--pairs", "1", "--size", "32x24", "--repeat", "1")
    assert (summary["flow"], summary["device"], summary["mode"], summary["batch"]) == ("torch", "cpu", "eager", 1)
    assert summary["params"]["variant"] == "cpu" and summary["epe_reference"] == "opencv cpu, same parameters"
    assert summary["epe_vs_opencv"] < 0.05 and summary["peak_bytes_per_pair"] is None


@pytest.mark.parametrize("args, option", [
    (["--size", "340"], "--size"),
    (["--size", "8x8"], "--size"),
    (["--pairs", "0"], "--pairs"),
    (["--batch", "0"], "--batch"),
    (["--flow", "opencv", "--batch", "4"], "--batch"),
    (["--flow", "opencv", "--device", "cuda"], "--device"),
])
def test_bad_usage_names_the_option(args, option):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2 and f"'{option}'" in result.output, result.output
