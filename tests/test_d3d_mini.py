"""benchmarks/d3d_mini.py end to end at its smoke setting: every command of the method runs on
the generated motion videos, and the last line is the documented JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("teacher_top1", "student_ce_top1", "student_d3d_top1", "probe_epe_ce", "probe_epe_d3d", "probe_epe_zeros", "chance")


def test_the_quick_run_prints_every_number_as_its_last_json_line(tmp_path):
    work, results = tmp_path / "work", tmp_path / "d3d_mini.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "d3d_mini.py"), "--quick", "--work", str(work),
                           "--json", str(results)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(isinstance(last[key], float) and math.isfinite(last[key]) for key in KEYS), last
    assert last["chance"] == 1 / 8
    assert all(0 <= last[key] <= 1 for key in ("teacher_top1", "student_ce_top1", "student_d3d_top1"))
    assert last["probe_epe_zeros"] > 0
    assert json.loads(results.read_text())["per_seed"] == last["per_seed"]
    # The Kinetics layout it made: train and val, one folder per motion class.
    assert sorted(p.name for p in (work / "src" / "val").iterdir()) == sorted(
        f"{d}_{s}px" for d in ("left", "right", "up", "down") for s in (1, 2))
