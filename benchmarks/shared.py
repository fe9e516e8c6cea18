"""What ``evaluate`` saves by computing the variant-independent work once for all variants, side by side.

Four variants on smollm2-135m, the smoke test split (80 questions), fp32: baseline and three CAA variants
(the CAA vector of the steering layer, extracted in this process from the smoke pool as
``benchmarks.generate`` does, at scales 4, 2 and -4: the sharing depends on the layer a variant steers,
not on what it adds there). Each part is timed both ways in the same run, and the results compared:

- ``generation``: each variant alone (``generate_missing``: its batch's prompts prefilled for it) against
  ``generate_missing_variants`` (batch by batch, every variant in turn: one prefill per batch). fp32 greedy:
  the answers must be identical;
- ``mc``: each variant alone (``MCJudge.bind(...)``: its own prompts' keys/values and every layer over the
  answers) against ``MCJudge.bind_all`` (the prompts and the layers up to the steering layer once);
- ``effects``: ``measure_effects`` of each variant alone (the unsteered passes repeated for each) against
  all of them in one call.

Run: ``python -m benchmarks.shared`` (options: ``--help``); writes ``benchmarks/results/shared.json``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from benchmarks import RESULTS_DIR, parser, smoke_caa, write_report
from evaluation.generate import generate_missing, generate_missing_variants
from evaluation.generation_store import GenerationStore, variant_hash
from evaluation.judges import JudgeItem
from evaluation.mc import MCJudge
from evaluation.side_effects import measure_effects
from steering.methods.intervention import Steering

RESULTS = RESULTS_DIR / "shared.json"
SCALES = {"caa_4": 4.0, "caa_2": 2.0, "caa_minus_4": -4.0}
T = TypeVar("T")


def timed(work: Callable[[], T]) -> tuple[T, float]:
    tick = time.perf_counter()
    out = work()
    return out, time.perf_counter() - tick


def largest_difference(a: dict[str, list[dict[str, Any]]], b: dict[str, list[dict[str, Any]]]) -> float:
    """The largest absolute difference between the numeric fields of two variant -> rows mappings."""
    return max((abs(float(x[k]) - float(y[k])) for v in a for x, y in zip(a[v], b[v], strict=True) for k in x
                if isinstance(x[k], int | float)), default=0.0)


def main() -> None:
    p = parser("shared", __doc__, flags=("model", "device", "threads"))
    p.add_argument("--overrides", default="", help='config overrides, e.g. "eval.max_new_tokens=32"')
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, loaded, splits, caa, _ = smoke_caa(args.model, args.device, args.overrides)
    questions = splits[cfg.eval.split]
    vector = caa.vectors[cfg.layer]
    steerings = {"baseline": Steering.baseline(),
                 **{name: Steering(name, layer=cfg.layer, scale=scale, vector=vector, source_run="benchmark")
                    for name, scale in SCALES.items()}}
    decoding = cfg.eval
    keys = {v: (s, variant_hash(cfg.model, "float32", decoding, s.key_fields())) for v, s in steerings.items()}
    report: dict[str, Any] = {"model": cfg.model.alias, "layer": cfg.layer, "variants": list(steerings),
                              "n_questions": len(questions), "max_new_tokens": decoding.max_new_tokens,
                              "batch_size": decoding.batch_size}

    with tempfile.TemporaryDirectory() as tmp:
        alone, alone_s = timed(lambda: {v: generate_missing(loaded, questions, s, decoding,
                                                            GenerationStore(Path(tmp) / f"{v}.jsonl"), k,
                                                            progress=False)[0]
                                        for v, (s, k) in keys.items()})
        together, together_s = timed(lambda: generate_missing_variants(loaded, questions, keys, decoding,
                                                                       GenerationStore(Path(tmp) / "all.jsonl"),
                                                                       progress=False))
    same = sum(a["answer"] == b["answer"] for v in keys for a, b in zip(alone[v], together[v][0], strict=True))
    report["generation"] = {"alone_seconds": alone_s, "shared_seconds": together_s, "speedup": alone_s / together_s,
                            "answers_identical": f"{same}/{len(questions) * len(keys)}"}
    print(f"generation: each alone {alone_s:.1f} s, shared {together_s:.1f} s ({alone_s / together_s:.2f}x); "
          f"answers identical {same}/{len(questions) * len(keys)}")
    answers = {v: [str(r["answer"]) for r in records] for v, (records, _) in together.items()}

    items = [JudgeItem.from_question(q, "") for q in questions]
    judge = MCJudge.from_config(cfg)
    mc_alone, mc_alone_s = timed(lambda: {v: judge.bind(loaded, s).score(items) for v, s in steerings.items()})
    bound = judge.bind_all(loaded, steerings)
    mc_shared, mc_shared_s = timed(lambda: {v: bound[v].score(items) for v in steerings})
    report["mc"] = {"alone_seconds": mc_alone_s, "shared_seconds": mc_shared_s, "speedup": mc_alone_s / mc_shared_s,
                    "largest_difference": largest_difference(mc_alone, mc_shared)}
    print(f"mc: each alone {mc_alone_s:.1f} s, shared {mc_shared_s:.1f} s ({mc_alone_s / mc_shared_s:.2f}x); "
          f"largest difference {report['mc']['largest_difference']:.2e}")

    texts = [q.question for q in questions]
    fx_alone, fx_alone_s = timed(lambda: {v: measure_effects(cfg, loaded, {v: s}, texts, {v: answers[v]})[0][v]
                                          for v, s in steerings.items()})
    fx_shared, fx_shared_s = timed(lambda: measure_effects(cfg, loaded, steerings, texts, answers)[0])
    difference = largest_difference({v: [m] for v, m in fx_alone.items()}, {v: [m] for v, m in fx_shared.items()})
    report["effects"] = {"alone_seconds": fx_alone_s, "shared_seconds": fx_shared_s,
                         "speedup": fx_alone_s / fx_shared_s, "largest_difference": difference}
    print(f"effects: each alone {fx_alone_s:.1f} s, shared {fx_shared_s:.1f} s ({fx_alone_s / fx_shared_s:.2f}x); "
          f"largest difference {difference:.2e}")
    total_alone = alone_s + mc_alone_s + fx_alone_s
    total_shared = together_s + mc_shared_s + fx_shared_s
    report["total"] = {"alone_seconds": total_alone, "shared_seconds": total_shared,
                       "speedup": total_alone / total_shared}
    print(f"together: {total_alone:.1f} s -> {total_shared:.1f} s ({total_alone / total_shared:.2f}x)")
    write_report(args.output, report)


if __name__ == "__main__":
    main()
