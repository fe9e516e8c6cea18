"""Steered generation: batched (what ``evaluate`` does) against one question at a time.

Both modes answer with the caa variant (the CAA vector of the steering layer, extracted in this
process from the smoke pool split with ``steering.extract``, times ``steering.scale``), greedy,
``eval.max_new_tokens`` new tokens at most, steered from the prompt end on, fp32:

- ``batched``: ``evaluation.generate.generate_missing`` over the smoke test split (80 questions), in
  batches of ``eval.batch_size`` (80 for smollm2-135m), answers appended to a throw-away
  generation store: the evaluate stage's code path, run ``--repeats`` times (3), each into a fresh store,
  with the same answers each time;
- ``one_at_a_time``: the researchers' loop, one ``generate`` call per question. To keep the run
  short it times the first ``--sequential`` questions of the same split (all of them with
  ``--sequential 0``) and reports seconds per question; the speedup compares per-question rates (the loop's one
  run against the batched path's median run).
  Its answers are checked against the batched ones (fp32 greedy: they must be identical);
- ``two_variants``: two steered variants (the caa vector at ``steering.scale`` and at half of it), as ``evaluate``
  generates several, decoded together (``eval.decode_rows`` = two batches' rows, ``generate_together``) and one
  after the other (``decode_rows=0``), ``--repeats`` times each in alternating order, each run into a fresh store
  with the same answers, the caa variant's equal to its answers alone; ``throughput`` sets the runs together
  against the roof as for one variant (``two_variants_together_new_tokens_share_of_roof``, its median and first run);
- ``batched_bf16`` (unless ``--no-bf16``): the batched path again with the model in bf16
  (``--overrides model.dtype=bfloat16`` in the stages), the same CAA vector. bf16 answers differ
  from fp32 ones and depend on the batch size; the report counts how many agree.

One warm-up generation runs first. The machine's fp32 matmul throughput (the *roof*: the best of a few
square products of ``--roof-size`` on the same threads, with ``torch.mm``, with oneDNN as decoding runs it,
and with oneDNN on a factor laid out for it beforehand, whichever is fastest) is measured in the same run,
and the batched path's best run (the roof is a best of five on the same machine, whose other tenants slow some
runs by 10-20%; the median and the first run are reported beside it) is set against it two ways, and each run
against the roof sustained beside it:

- ``new_tokens_share_of_roof``: new tokens per second times the model's matmul FLOPs per token (2 x the
  weights of every decoder layer's linear layers and of the LM head), over the roof: the issue's measure,
  where the prompts' prefill counts as overhead;
- ``useful_flops_share_of_roof``: every real token's work the batched path does (prompt tokens through the
  layers, a batch's shared start once as ``evaluation.prefill`` runs it (``prompt_tokens_computed``); answer
  tokens up to and including their stop token through the layers and the head) per second, over the roof.
  Padding and the tokens after a row's stop are not counted; attention scores are not counted either
  (under 3% here);
- ``new_tokens_share_of_sustained_roof_each_run``: each batched run's new tokens against the roof sustained on
  either side of it (``sustained_roof_gflops``: the roof's fastest library run back to back for about a second,
  its median product, before the first run and after each; ``benchmarks.roof.sustained_gflops``): the machine's
  other tenants slow some stretches of a run by 10-20%, which the best of five short products does not see.

What the roof cannot show: decode multiplies ``batch_size`` rows by the model's narrow weights, where the
matmul libraries are slower than on large squares. ``decode_shape_gflops`` times those very products (each
linear layer's and the LM head's shape at the batch's rows) with each library, the most decode can reach here.

``prefill_then_decode`` sets the evaluate path (prompts prefilled in groups of similar length into a static
cache, ``evaluation.prefill.prefill_prompts``; on a CPU the linear layers by oneDNN on weights laid out for it,
``evaluation.linear.onednn_linears``, and ``evaluation.attention.packed_decode_attention`` for
decoding; greedy decoding that drops a row from the batch when it stops, ``evaluation.decode.greedy_decode``)
against the same with oneDNN on the weights as they are, against the same with PyTorch's own linear layers
(``TRUTHSTEER_CPU_LINEAR=torch``), against the same with the packed attention's products by PyTorch's ``bmm``
(``TRUTHSTEER_CPU_ATTENTION=torch``, not ``evaluation.native``'s C++ ones), against the same with
``transformers``' ``sdpa`` attention under PyTorch's math kernel (the previous decoding attention), against the
same through ``model.generate`` (every row decoded to the end) and against the earlier prefill (one forward
over the padded batch into a cache that grows by concatenation each step), in the order A B C D E F G G F E D C B A,
with the same answers.

``in_place`` times one more batched run from the inside (``benchmarks.in_place``): the linear layers' and the
LM head's seconds and GFLOP/s as they run in decoding, each of their calls run again by PyTorch's own
``linear`` on the same input, and each one-token attention call run three ways (packed with its C++ products,
packed with PyTorch's ``bmm``, and ``sdpa`` under the math kernel), in alternating order. Whole runs here vary
by 10-20% from one to the next, more than attention's share of a step; timing the kernels on the same calls
does not.

Run: ``python -m benchmarks.generate`` (options: ``--help``); writes ``benchmarks/results/generate.json``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import RESULTS_DIR, parser, smoke_caa, write_report
from benchmarks.in_place import in_place_breakdown
from benchmarks.roof import decode_shape_gflops, matmul_flops, matmul_roof, sustained_gflops
from benchmarks.two_variants import decode_together
from core.config import EvalConfig
from core.models import load_model
from evaluation import generate as generation
from evaluation import native
from evaluation.generate import generate_batch, generate_missing, generation_order
from evaluation.generation_store import GenerationStore, variant_hash
from evaluation.linear import OPT_OUT, onednn_linears
from evaluation.prefill import prefill_prompts
from steering.methods.intervention import Steering
from steering.prompts import encode_text, format_prompt, shared_prefix

RESULTS = RESULTS_DIR / "generate.json"


def compare_prefills(loaded: Any, questions: list[Any], steering: Steering, decoding: EvalConfig,
                     answers: list[str]) -> dict[str, Any]:
    """Seconds to prefill and answer ``questions`` batch by batch seven ways, in the order A B C D E F G G F E D C B
    A: the evaluate path (``grouped_static``: linear layers by oneDNN on weights laid out for it, packed decode
    attention with its C++ products, greedy decoding that drops each row when it stops), the same with oneDNN on
    the weights as they are (``grouped_static_weights_as_they_are``), the same with PyTorch's own linear layers
    (``grouped_static_torch_linear``), the same with the packed attention's products by PyTorch's ``bmm``
    (``grouped_static_bmm_attention``), the same with ``sdpa`` attention under PyTorch's math kernel
    (``grouped_static_sdpa``), the same through ``model.generate``, which keeps every row to the end
    (``grouped_static_generate``), and one padded forward into a growing cache (``padded_growing``, our
    kernels and decoding); each run's answers must equal ``answers``."""
    ordered = generation_order(loaded, questions)
    by_id = {q.id: i for i, q in enumerate(questions)}
    chunks = [ordered[i:i + decoding.batch_size] for i in range(0, len(ordered), decoding.batch_size)]
    names = ("grouped_static", "grouped_static_weights_as_they_are", "grouped_static_torch_linear",
             "grouped_static_bmm_attention", "grouped_static_sdpa", "grouped_static_generate", "padded_growing")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for name in (*names, *reversed(names)):
        got = [""] * len(questions)
        kernel = (mock.patch.object(generation, "decode_attention", lambda model, device: sdpa_kernel(SDPBackend.MATH))
                  if name == "grouped_static_sdpa" else
                  mock.patch.object(generation, "greedy_processors", lambda model: ["(benchmark)"])  # generate's path
                  if name == "grouped_static_generate" else
                  mock.patch.dict(os.environ, {OPT_OUT: "torch"}) if name == "grouped_static_torch_linear" else
                  mock.patch.dict(os.environ, {native.OPT_OUT: "torch"}) if name == "grouped_static_bmm_attention" else
                  contextlib.nullcontext())
        tick = time.perf_counter()
        rows = None if name == "grouped_static_weights_as_they_are" else decoding.batch_size
        with kernel, onednn_linears(loaded.model, loaded.device, laid_out_rows=rows):
            for chunk in chunks:
                texts = [q.question for q in chunk]
                room = None if name == "padded_growing" else decoding.max_new_tokens
                prefill = prefill_prompts(loaded, texts, room)
                for q, a in zip(chunk, generate_batch(loaded, texts, steering, decoding, prefill=prefill), strict=True):
                    got[by_id[q.id]] = a.text
        seconds[name].append(time.perf_counter() - tick)
        if got != answers:
            raise AssertionError(f"{name}: {sum(g != a for g, a in zip(got, answers, strict=True))} answers differ")
        print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    means = {name: statistics.mean(values) for name, values in seconds.items()}
    return {"seconds": seconds, "mean_seconds": means,
            "speedup_over_padded_growing": means["padded_growing"] / means["grouped_static"],
            "speedup_of_packed_attention_over_sdpa_math": means["grouped_static_sdpa"] / means["grouped_static"],
            "speedup_of_cpp_attention_products_over_bmm":
                means["grouped_static_bmm_attention"] / means["grouped_static"],
            "speedup_of_onednn_linear_over_torch_linear": means["grouped_static_torch_linear"] / means["grouped_static"],
            "speedup_of_laid_out_weights_over_weights_as_they_are":
                means["grouped_static_weights_as_they_are"] / means["grouped_static"],
            "speedup_of_dropping_stopped_rows_over_generate": means["grouped_static_generate"] / means["grouped_static"],
            "answers_identical": True}


def main() -> None:
    p = parser("generate", __doc__, flags=('model', 'device', 'threads'))
    p.add_argument("--overrides", default="", help='config overrides, e.g. "eval.max_new_tokens=32"')
    p.add_argument("--sequential", type=int, default=10,
                   help="questions timed one at a time (0: all of the split)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 batched run")
    p.add_argument("--roof-size", type=int, default=2048, help="side of the square matmul that measures the roof")
    p.add_argument("--repeats", type=int, default=3,
                   help="times the batched path runs: its best run is set against the roof, as the roof is a best of five")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg, loaded, splits, caa, extract_seconds = smoke_caa(args.model, args.device, args.overrides)
    questions = splits[cfg.eval.split]
    steering = Steering("caa", layer=cfg.layer, scale=cfg.steering.scale, vector=caa.vectors[cfg.layer],
                        positions=cfg.steering.positions, source_run="benchmark")
    decoding = cfg.eval
    key = variant_hash(cfg.model, "float32", decoding, steering.key_fields())
    generate_batch(loaded, [questions[0].question], steering, EvalConfig(max_new_tokens=4))  # warm-up
    roofs = matmul_roof(args.roof_size)
    roof = max(roofs.values())
    print(f"fp32 matmul roof: {roof:.1f} GFLOP/s ({args.roof_size}^3, {torch.get_num_threads()} threads; "
          + ", ".join(f"{library} {gflops:.1f}" for library, gflops in roofs.items()) + ")")
    rows = min(decoding.batch_size, len(questions))
    shapes = decode_shape_gflops(loaded.model, rows)
    shape_gflops = max(shapes.values())
    print(f"the model's decode matmuls at {rows} rows: " + ", ".join(
        f"{library} {gflops:.1f} GFLOP/s ({gflops / roof:.0%} of the roof)" for library, gflops in shapes.items()))

    runs: list[float] = []
    records: list[dict[str, Any]] = []
    fastest = max(roofs, key=roofs.__getitem__)
    sustained = [sustained_gflops(args.roof_size, fastest)]  # before the first run and after each: run i between i, i + 1
    for _ in range(args.repeats):  # each into a fresh store: the whole evaluate path each time
        with tempfile.TemporaryDirectory() as tmp:
            tick = time.perf_counter()
            got, _ = generate_missing(loaded, questions, steering, decoding, GenerationStore(Path(tmp) / "g.jsonl"),
                                      key, progress=False)
            runs.append(time.perf_counter() - tick)
        sustained.append(sustained_gflops(args.roof_size, fastest))
        if records and [r["answer"] for r in got] != [r["answer"] for r in records]:
            raise AssertionError("the batched runs answered differently from one another")
        records = records or got
    batched_seconds, median_seconds = min(runs), statistics.median(runs)
    print(f"batched: {len(questions)} questions in " + ", ".join(f"{s:.1f}" for s in runs)
          + f" s ({args.repeats} runs; best {batched_seconds / len(questions):.3f} s/question, batch size "
          f"{decoding.batch_size})")
    together = decode_together(loaded, questions, steering, decoding, args.repeats)
    if together.pop("caa_answers") != [r["answer"] for r in records]:
        raise AssertionError("two variants: the caa variant's answers differ from its answers alone")
    layer_flops, head_flops = matmul_flops(loaded.model)
    new_tokens = sum(r["n_new_tokens"] for r in records)
    fed = sum(r["n_new_tokens"] + (not r["truncated"]) for r in records)  # up to and including the stop token
    prompt_ids = [encode_text(loaded.tokenizer, format_prompt(q.question, loaded.tokenizer, loaded.prompt_format))
                  for q in generation_order(loaded, questions)]
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    computed = 0  # each batch's shared start runs once (evaluation.prefill), the rest of every prompt in its row
    for i in range(0, len(prompt_ids), decoding.batch_size):
        shared = shared_prefix(prompt_ids[i:i + decoding.batch_size])
        computed += shared + sum(len(ids) - shared for ids in prompt_ids[i:i + decoding.batch_size])
    useful = (computed + fed) * layer_flops + fed * head_flops
    throughput = {
        "roof_gflops": roof, "roof_gflops_by_library": roofs, "matmul_gflops_per_token": (layer_flops + head_flops) / 1e9,
        "new_tokens": new_tokens, "new_tokens_per_second": new_tokens / batched_seconds,
        "roof_tokens_per_second": roof * 1e9 / (layer_flops + head_flops),
        "new_tokens_share_of_roof": new_tokens * (layer_flops + head_flops) / batched_seconds / (roof * 1e9),
        "new_tokens_share_of_roof_median_run": new_tokens * (layer_flops + head_flops) / median_seconds / (roof * 1e9),
        "new_tokens_share_of_roof_first_run": new_tokens * (layer_flops + head_flops) / runs[0] / (roof * 1e9),
        "prompt_tokens": prompt_tokens, "prompt_tokens_computed": computed, "useful_gflops_per_second": useful / batched_seconds / 1e9,
        "useful_flops_share_of_roof": useful / batched_seconds / (roof * 1e9),
        "decode_shape_gflops": shape_gflops,
        # each run against the roof sustained on either side of it (products back to back for ~1 s, their median)
        "sustained_roof_gflops": sustained,
        "new_tokens_share_of_sustained_roof_each_run": [
            new_tokens * (layer_flops + head_flops) / seconds / (statistics.mean(sustained[i:i + 2]) * 1e9)
            for i, seconds in enumerate(runs)],
        # two variants as evaluate generates them: together (decode_rows), or one after the other (the shipped
        # configs' decode_rows=0), the prompts' prefill shared either way
        **{f"two_variants_{way}_new_tokens_share_of_roof{suffix}":
           together["new_tokens"] * (layer_flops + head_flops) / pick(together["seconds"][way]) / (roof * 1e9)
           for way in ("together", "one_after_the_other")
           for suffix, pick in (("", min), ("_median_run", statistics.median), ("_first_run", lambda s: s[0]))},
        "decode_shape_gflops_by_library": shapes,
        "decode_shape_share_of_roof": shape_gflops / roof,
        "new_tokens_share_of_decode_shape_gflops": new_tokens * (layer_flops + head_flops) / batched_seconds
        / (shape_gflops * 1e9),
        # rows that stopped: model.generate would keep them in the batch until every row has (rows x longest);
        # greedy_decode drops them
        "row_steps_after_stop_share": 1 - fed / (len(records) * max(r["n_new_tokens"] + (not r["truncated"])
                                                                 for r in records)),
    }
    print(f"batched throughput (best run): {throughput['new_tokens_per_second']:.0f} new tokens/s = "
          f"{throughput['new_tokens_share_of_roof']:.1%} of the roof's {throughput['roof_tokens_per_second']:.0f} "
          f"(median run {throughput['new_tokens_share_of_roof_median_run']:.1%}, first run "
          f"{throughput['new_tokens_share_of_roof_first_run']:.1%}); "
          f"with the prompts' work {throughput['useful_gflops_per_second']:.1f} GFLOP/s = "
          f"{throughput['useful_flops_share_of_roof']:.0%} of the roof")
    print("each run against the roof sustained on either side of it (" + ", ".join(f"{g:.0f}" for g in sustained)
          + " GFLOP/s): " + ", ".join(f"{share:.1%}" for share in throughput["new_tokens_share_of_sustained_roof_each_run"]))

    print(f"two variants decoded together: {throughput['two_variants_together_new_tokens_share_of_roof']:.1%} of the "
          f"roof in new tokens (median run "
          f"{throughput['two_variants_together_new_tokens_share_of_roof_median_run']:.1%}, first run "
          f"{throughput['two_variants_together_new_tokens_share_of_roof_first_run']:.1%}); "
          f"{together['speedup_of_together_over_one_after_the_other']:.2f}x the two one after the other, which reach "
          f"{throughput['two_variants_one_after_the_other_new_tokens_share_of_roof']:.1%} (median run "
          f"{throughput['two_variants_one_after_the_other_new_tokens_share_of_roof_median_run']:.1%})", flush=True)

    prefill_then_decode = compare_prefills(loaded, questions, steering, decoding, [r["answer"] for r in records])
    by_id = {r["qid"]: r["answer"] for r in records}
    ordered = generation_order(loaded, questions)
    breakdown = in_place_breakdown(loaded, ordered, steering, decoding, [by_id[q.id] for q in ordered])
    throughput["linear_gflops_in_place"] = breakdown["linear_gflops"]
    throughput["linear_share_of_roof_in_place"] = breakdown["linear_gflops"] / roof

    subset = questions[:args.sequential] if args.sequential else questions
    tick = time.perf_counter()
    single = [generate_batch(loaded, [q.question], steering, decoding)[0] for q in subset]
    sequential_seconds = time.perf_counter() - tick
    per_question_sequential = sequential_seconds / len(subset)
    per_question_batched = median_seconds / len(questions)  # the median run: the loop runs once
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
                "speedup_vs_fp32_batched_median_run": median_seconds / half_seconds}
        print(f"batched bf16: {half_seconds:.1f} s ({bf16['speedup_per_question_vs_fp32_one_at_a_time']:.1f}x the "
              f"fp32 one-at-a-time loop per question; answers equal to fp32 batched: {agree}/{len(questions)})")

    report: dict[str, Any] = {
        "model": cfg.model.alias, "dtype": "float32", "device": str(loaded.device), "variant": "caa", "layer": cfg.layer, "scale": cfg.steering.scale,
        "positions": cfg.steering.positions, "max_new_tokens": decoding.max_new_tokens,
        "batch_size": decoding.batch_size, "split": f"smoke/{cfg.eval.split}", "n_questions": len(questions),
        "caa_extract_seconds": extract_seconds,
        "batched": {"seconds": batched_seconds, "seconds_of_each_run": runs, "median_seconds": median_seconds,
                    "seconds_per_question_median_run": per_question_batched,
                    "mean_new_tokens": statistics.mean(r["n_new_tokens"] for r in records),
                    "truncated": sum(bool(r["truncated"]) for r in records)},
        "one_at_a_time": {"questions_timed": len(subset), "seconds": sequential_seconds,
                          "seconds_per_question": per_question_sequential,
                          "extrapolated_seconds_all": per_question_sequential * len(questions),
                          "mean_new_tokens": statistics.mean(a.n_new_tokens for a in single),
                          "answers_identical_to_batched": f"{sum(matches)}/{len(matches)}"},
        "speedup_per_question": speedup,
        "two_variants": together,
        "prefill_then_decode": prefill_then_decode,
        "in_place": breakdown,
        "throughput": throughput,
        "batched_bf16": bf16,
        "note": ("one at a time was timed on the first questions_timed questions of the split; the speedup "
                 "compares seconds per question") if len(subset) < len(questions) else "",
    }
    write_report(args.output, report)


if __name__ == "__main__":
    main()
