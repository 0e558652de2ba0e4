"""What every benchmark does last: its results as JSON (benchmarks/results/ is not committed)."""

import json
from pathlib import Path


def write_results(path: str | Path, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
