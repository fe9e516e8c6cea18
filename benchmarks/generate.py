"""Steered generation: batched (what ``evaluate`` does) against one question at a time.

Both modes answer with the caa variant (the CAA vector of the steering layer, extracted in this
process from the smoke pool split with ``steering.extract``, times ``steering.scale``), greedy,
``eval.max_new_tokens`` new tokens at most, steered from the prompt end on, fp32:

- ``batched``: ``evaluation.generate.generate_missing`` over the smoke test split (80 questions), in
  batches of ``eval.batch_size`` (80 for smollm2-135m), answers appended to a throw-away
  generation store: the evaluate stage's code path;
- ``one_at_a_time``: the researchers' loop, one ``generate`` call per question. To keep the run
  short it times the first ``--sequential`` questions of the same split (all of them with
  ``--sequential 0``) and reports seconds per question; the speedup compares per-question rates.
  Its answers are checked against the batched ones (fp32 greedy: they must be identical);
- ``batched_bf16`` (unless ``--no-bf16``): the batched path again with the model in bf16
  (``--overrides model.dtype=bfloat16`` in the stages), the same CAA vector. bf16 answers differ
  from fp32 ones and depend on the batch size; the report counts how many agree.

One warm-up generation runs first. Run: ``python -m benchmarks.generate`` (options: ``--help``);
writes ``benchmarks/results/generate.json``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import DATA_CSV, RESULTS_DIR, parser, write_report
from core.config import EvalConfig
from core.config_io import load_config
from core.data import load_questions, split_questions
from core.models import load_model
from evaluation.generate import generate_batch, generate_missing
from evaluation.generation_store import GenerationStore, variant_hash
from steering.extract import contrastive_pairs, extract_caa
from steering.methods.intervention import Steering

RESULTS = RESULTS_DIR / "generate.json"


def main() -> None:
    p = parser("generate", __doc__, flags=('model', 'device', 'threads'))
    p.add_argument("--overrides", default="", help='config overrides, e.g. "eval.max_new_tokens=32"')
    p.add_argument("--sequential", type=int, default=10,
                   help="questions timed one at a time (0: all of the split)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 batched run")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.model, [f"data.source={DATA_CSV}", "data.split=smoke", *filter(None, [args.overrides])])
    loaded = load_model(cfg.model, dtype="float32", device=args.device)
    splits = split_questions(load_questions(DATA_CSV), cfg.data.sizes, cfg.data.seed)
    questions = splits[cfg.eval.split]

    tick = time.perf_counter()
    pairs = contrastive_pairs(splits["pool"], cfg.extract.pairs_per_question, cfg.data.seed)
    caa = extract_caa(loaded, pairs, batch_size=cfg.extract.batch_size, max_length=cfg.extract.max_length)
    extract_seconds = time.perf_counter() - tick
    steering = Steering("caa", layer=cfg.layer, scale=cfg.steering.scale, vector=caa.vectors[cfg.layer],
                        positions=cfg.steering.positions, source_run="benchmark")
    decoding = cfg.eval
    key = variant_hash(cfg.model, "float32", decoding, steering.key_fields())
    generate_batch(loaded, [questions[0].question], steering, EvalConfig(max_new_tokens=4))  # warm-up

    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        records, _ = generate_missing(loaded, questions, steering, decoding, GenerationStore(Path(tmp) / "g.jsonl"),
                                      key, progress=False)
        batched_seconds = time.perf_counter() - tick
    print(f"batched: {len(questions)} questions in {batched_seconds:.1f} s "
          f"({batched_seconds / len(questions):.3f} s/question, batch size {decoding.batch_size})")

    subset = questions[:args.sequential] if args.sequential else questions
    tick = time.perf_counter()
    single = [generate_batch(loaded, [q.question], steering, decoding)[0] for q in subset]
    sequential_seconds = time.perf_counter() - tick
    per_question_sequential = sequential_seconds / len(subset)
    per_question_batched = batched_seconds / len(questions)
    speedup = per_question_sequential / per_question_batched
    matches = [a.text == r["answer"] for a, r in zip(single, records, strict=False)]
    print(f"one at a time: {len(subset)} of {len(questions)} questions in {sequential_seconds:.1f} s "
          f"({per_question_sequential:.3f} s/question; all {len(questions)} would take "
          f"{per_question_sequential * len(questions):.0f} s)")
    print(f"speedup of batched over one at a time (per question): {speedup:.1f}x; "
          f"one-at-a-time answers identical to batched: {sum(matches)}/{len(matches)}")

    bf16: dict[str, Any] = {}
    if args.bf16:
        half = load_model(cfg.model, dtype="bfloat16", device=args.device)
        half_key = variant_hash(cfg.model, "bfloat16", decoding, steering.key_fields())
        generate_batch(half, [questions[0].question], steering, EvalConfig(max_new_tokens=4))  # warm-up
        with tempfile.TemporaryDirectory() as tmp:
            tick = time.perf_counter()
            half_records, _ = generate_missing(half, questions, steering, decoding,
                                               GenerationStore(Path(tmp) / "g.jsonl"), half_key, progress=False)
            half_seconds = time.perf_counter() - tick
        agree = sum(h["answer"] == r["answer"] for h, r in zip(half_records, records, strict=True))
        bf16 = {"seconds": half_seconds, "seconds_per_question": half_seconds / len(questions),
                "mean_new_tokens": statistics.mean(r["n_new_tokens"] for r in half_records),
                "answers_identical_to_fp32_batched": f"{agree}/{len(questions)}",
                "speedup_per_question_vs_fp32_one_at_a_time": per_question_sequential / (half_seconds / len(questions)),
                "speedup_vs_fp32_batched": batched_seconds / half_seconds}
        print(f"batched bf16: {half_seconds:.1f} s ({bf16['speedup_per_question_vs_fp32_one_at_a_time']:.1f}x the "
              f"fp32 one-at-a-time loop per question; answers equal to fp32 batched: {agree}/{len(questions)})")

    report: dict[str, Any] = {
        "model": cfg.model.alias, "dtype": "float32", "device": str(loaded.device), "variant": "caa", "layer": cfg.layer, "scale": cfg.steering.scale,
        "positions": cfg.steering.positions, "max_new_tokens": decoding.max_new_tokens,
        "batch_size": decoding.batch_size, "split": f"smoke/{cfg.eval.split}", "n_questions": len(questions),
        "caa_extract_seconds": extract_seconds,
        "batched": {"seconds": batched_seconds, "seconds_per_question": per_question_batched,
                    "mean_new_tokens": statistics.mean(r["n_new_tokens"] for r in records),
                    "truncated": sum(bool(r["truncated"]) for r in records)},
        "one_at_a_time": {"questions_timed": len(subset), "seconds": sequential_seconds,
                          "seconds_per_question": per_question_sequential,
                          "extrapolated_seconds_all": per_question_sequential * len(questions),
                          "mean_new_tokens": statistics.mean(a.n_new_tokens for a in single),
                          "answers_identical_to_batched": f"{sum(matches)}/{len(matches)}"},
        "speedup_per_question": speedup,
        "batched_bf16": bf16,
        "note": ("one at a time was timed on the first questions_timed questions of the split; the speedup "
                 "compares seconds per question") if len(subset) < len(questions) else "",
    }
    write_report(args.output, report)


if __name__ == "__main__":
    main()
