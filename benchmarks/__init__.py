"""Benchmarks: each script measures its ratios side by side in one run and writes
``benchmarks/results/<name>.json`` through ``write_report``, which adds where it ran."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = (PROJECT_DIR / ".." / "shared" / "data" / "truthfulqa").resolve()
DATA_CSV = DATA_DIR / "TruthfulQA.csv"
RESULTS_DIR = PROJECT_DIR / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    """Where a benchmark ran: CPU count, load average (1, 5, 15 min) at the end, platform, torch."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_after": list(os.getloadavg()), "platform": platform.platform(),
            "processor": platform.processor(), "torch": torch.__version__}


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report`` plus ``machine()`` as JSON to ``path`` (folders created) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, **machine()}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
