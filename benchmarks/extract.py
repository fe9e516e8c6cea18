"""Time CAA extraction of the smoke pool batched against one pair at a time, in one process.

Model smollm2-135m (fp32; CPU unless a GPU is visible), the 60 questions of the smoke pool split
(data.seed 0, one pair per question), ``extract_caa`` with ``extract.batch_size`` pairs per forward
(32 from the model file: 64 sequences) and with 1 pair per forward (2 sequences). One untimed
warm-up call first; then the modes alternate for ``--repeats`` rounds and the median is reported.
Also reported: the largest difference between the two modes' diffs (batched == unbatched under
left padding), and the padding share of the batched forwards (length-sorted batches, as
``extract_caa`` makes them, and what file order would give).

Run: ``python -m benchmarks.extract`` (options: ``--help``); writes ``benchmarks/results/extract.json``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import RESULTS_DIR, parser, write_report
from core.config_io import load_config
from core.data import splits_for
from core.models import LoadedModel, load_model
from steering.extract import (
    Extraction,
    Pair,
    contrastive_pairs,
    encode_pairs,
    extract_caa,
    length_sorted_batches,
)

RESULTS = RESULTS_DIR / "extract.json"


def timed(loaded: LoadedModel, pairs: list[Pair], batch_size: int, max_length: int) -> tuple[float, Extraction]:
    """Seconds of one ``extract_caa`` call and its result."""
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    extraction = extract_caa(loaded, pairs, batch_size=batch_size, max_length=max_length, nan_threshold=1.0)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tick, extraction


def padding_share(loaded: LoadedModel, pairs: list[Pair], batches: list[list[int]],
                  max_length: int) -> tuple[float, int]:
    """Share of padded positions over the forwards of ``batches``, and the real tokens they hold."""
    padded = real = 0
    for indices in batches:
        mask = encode_pairs(loaded, [pairs[i] for i in indices], max_length)["attention_mask"]  # (2B, seq)
        padded += mask.numel()
        real += int(mask.sum())
    return 1 - real / padded, real


def main() -> None:
    p = parser("extract", __doc__)
    p.add_argument("--batch-size", type=int, default=0, help="pairs per batched forward; 0: extract.batch_size")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per mode (median reported)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.model, [f"data.source={args.data}", "data.split=smoke"])
    batch_size = args.batch_size or cfg.extract.batch_size
    max_length = cfg.extract.max_length
    pairs = contrastive_pairs(splits_for(cfg)["pool"], cfg.extract.pairs_per_question, cfg.data.seed)
    loaded = load_model(cfg.model, dtype="float32", device=args.device)
    timed(loaded, pairs[:4], 4, max_length)  # warm-up: allocator, kernels, tokenizer caches

    seconds: dict[str, list[float]] = {"batched": [], "one_by_one": []}
    results: dict[str, Extraction] = {}
    for _ in range(args.repeats):
        for mode, size in (("batched", batch_size), ("one_by_one", 1)):
            elapsed, results[mode] = timed(loaded, pairs, size, max_length)
            seconds[mode].append(elapsed)
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    max_abs_diff = float((results["batched"].diffs - results["one_by_one"].diffs).abs().max())
    sorted_batches = length_sorted_batches(loaded, pairs, batch_size, max_length)
    pad_share, real_tokens = padding_share(loaded, pairs, sorted_batches, max_length)
    file_order = [list(range(start, min(start + batch_size, len(pairs)))) for start in range(0, len(pairs), batch_size)]
    pad_share_file_order, _ = padding_share(loaded, pairs, file_order, max_length)

    print(f"{'mode':>10} | {'pairs/fwd':>9} | {'forwards':>8} | {'median s':>8} | {'pairs/s':>7} | all s")
    for mode, size in (("batched", batch_size), ("one_by_one", 1)):
        forwards = -(-len(pairs) // size)
        print(f"{mode:>10} | {size:>9} | {forwards:>8} | {median[mode]:>8.2f} | {len(pairs) / median[mode]:>7.1f} | "
              f"{', '.join(f'{s:.2f}' for s in seconds[mode])}")
    speedup = median["one_by_one"] / median["batched"]
    print(f"speedup batched vs one-by-one: {speedup:.2f}x; max |diff| between modes {max_abs_diff:.2e}; "
          f"batched padding share {pad_share:.1%} (in file order it would be {pad_share_file_order:.1%})")

    report: dict[str, Any] = {
        "model": cfg.model.alias, "n_layers": cfg.model.n_layers, "dtype": "float32", "pairs": len(pairs),
        "batch_size": batch_size, "max_length": max_length, "repeats": args.repeats,
        "seconds": seconds, "median_seconds": median, "speedup_batched_vs_one_by_one": speedup,
        "max_abs_diff_between_modes": max_abs_diff, "batched_padding_share": pad_share,
        "batched_padding_share_file_order": pad_share_file_order,
        "real_tokens": real_tokens, "device": str(loaded.device),
    }
    write_report(args.output, report)


if __name__ == "__main__":
    main()
