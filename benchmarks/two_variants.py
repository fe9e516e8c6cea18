"""Two steered variants decoded together and one after the other, for ``benchmarks.generate`` (``two_variants``)."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from core.config import EvalConfig
from evaluation.generate import generate_missing_variants
from evaluation.generation_store import GenerationStore
from steering.methods.intervention import Steering


def decode_together(loaded: Any, questions: list[Any], steering: Steering, decoding: EvalConfig,
                    repeats: int) -> dict[str, Any]:
    """Two steered variants of the split, as ``evaluate`` generates several (``generate_missing_variants``, each
    run into a fresh store): the caa variant and the same vector at half the scale, decoded together
    (``eval.decode_rows`` = two batches' rows: one greedy decoding of each question's row twice) and one after the
    other (``decode_rows=0``), ``repeats`` times each in alternating order (T A A T ...); every run must give
    the same answers, and the caa variant's must equal the single-variant runs' (checked by the caller's
    records)."""
    half = dataclasses.replace(steering, scale=steering.scale / 2)
    variants = {"caa": (steering, "caa"), "caa_half": (half, "caa_half")}
    configs = {"together": dataclasses.replace(decoding, decode_rows=2 * decoding.batch_size),
               "one_after_the_other": dataclasses.replace(decoding, decode_rows=0)}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    answers: list[list[str]] = []
    for i in range(repeats):
        for name in (configs if i % 2 == 0 else reversed(configs)):
            with tempfile.TemporaryDirectory() as tmp:
                tick = time.perf_counter()
                got = generate_missing_variants(loaded, questions, variants, configs[name],
                                                GenerationStore(Path(tmp) / "g.jsonl"), progress=False)
                seconds[name].append(time.perf_counter() - tick)
            texts = [[r["answer"] for r in got[v][0]] for v in variants]
            if answers and texts != answers:
                raise AssertionError(f"two variants, {name}: the answers differ from the first run's")
            answers = answers or texts
            new_tokens = sum(r["n_new_tokens"] for v in variants for r in got[v][0])
            print(f"two variants {name}: {seconds[name][-1]:.1f} s", flush=True)
    return {"variants": {"caa": steering.scale, "caa_half": half.scale}, "decode_rows": 2 * decoding.batch_size,
            "seconds": seconds, "new_tokens": new_tokens,
            "speedup_of_together_over_one_after_the_other":
                statistics.median(seconds["one_after_the_other"]) / statistics.median(seconds["together"]),
            "answers_identical": True, "caa_answers": answers[0]}


__all__ = ['decode_together']
