"""What made an output: library versions and file digests, recorded in dataset.json and teacher.json."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import av
import cv2
import h5py
import numpy as np
import pyarrow as pa
import torch

import flowprep


def versions() -> dict[str, str]:
    """The versions of flowprep, Python and every library whose code shapes an output's bytes."""
    return {
        "flowprep": flowprep.__version__,
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "pyav": av.__version__,
        "ffmpeg": str(av.ffmpeg_version_info),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "h5py": h5py.__version__,
        "torch": torch.__version__,
    }


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
