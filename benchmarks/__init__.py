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


def smoke_caa(model: str, device: str, overrides: str) -> tuple[Any, Any, dict[str, list[Any]], Any, float]:
    """What the generation benchmarks start from: the config of ``model`` on the smoke split (``overrides``
    added), the fp32 model, the splits, and the CAA extraction from the pool split with its seconds."""
    import time

    from core.config_io import load_config
    from core.data import load_questions, split_questions
    from core.models import load_model
    from steering.extract import contrastive_pairs, extract_caa

    cfg = load_config(model, [f"data.source={DATA_CSV}", "data.split=smoke", *filter(None, [overrides])])
    loaded = load_model(cfg.model, dtype="float32", device=device)
    splits = split_questions(load_questions(DATA_CSV), cfg.data.sizes, cfg.data.seed)
    tick = time.perf_counter()
    pairs = contrastive_pairs(splits["pool"], cfg.extract.pairs_per_question, cfg.data.seed)
    caa = extract_caa(loaded, pairs, batch_size=cfg.extract.batch_size, max_length=cfg.extract.max_length)
    return cfg, loaded, splits, caa, time.perf_counter() - tick


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
