"""Benchmarks: each script measures its ratios side by side in one run and writes
``benchmarks/results/<name>.json`` through ``write_report``, which adds where it ran."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = (PROJECT_DIR / ".." / "shared" / "data" / "truthfulqa").resolve()
DATA_CSV = DATA_DIR / "TruthfulQA.csv"
RESULTS_DIR = PROJECT_DIR / "benchmarks" / "results"


def parser(name: str, doc: str | None, *, flags: tuple[str, ...] = ("model", "data", "device", "threads")
           ) -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks.<name>``, with the shared ``flags`` among ``--model``
    (smollm2-135m), ``--data`` (the TruthfulQA CSV), ``--device`` (auto) and ``--threads`` (0: torch's default)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared: dict[str, dict[str, Any]] = {
        "model": {"default": "smollm2-135m"}, "data": {"default": str(DATA_CSV), "help": "TruthfulQA CSV"},
        "device": {"default": "auto"}, "threads": {"type": int, "default": 0, "help": "torch CPU threads; 0: torch's default"}}
    for flag in flags:
        p.add_argument(f"--{flag}", **shared[flag])
    return p


def cpu() -> dict[str, Any]:
    """The CPU's model name and its vector extensions that decide fp32 and bf16 speed (Linux; empty elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu_model": model, "cpu_vector_flags": [f for f in wanted if f in flags]}


def machine() -> dict[str, Any]:
    """Where a benchmark ran: CPU count, model and vector flags, load average (1, 5, 15 min) at the end,
    platform, torch."""
    import torch

    return {**cpu(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_after": list(os.getloadavg()), "platform": platform.platform(),
            "processor": platform.processor(), "torch": torch.__version__}


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report`` plus ``machine()`` as JSON to ``path`` (folders created) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, **machine()}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
