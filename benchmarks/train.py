"""Time per MLP-training step with and without the two speedups of ``steering.train``.

Modes, each a full optimizer step (forward, backward, AdamW update) on the same batches, taking
turns batch by batch so that the load of a shared machine affects them alike:
  - ``full``: the straightforward path, a full forward with the steering hook and full logits;
  - ``prefix_cache``: layers above the steering layer only, over the last prompt token and the
    answer, from the prefix cache (``steering.prefix.PrefixCache``), full logits;
  - ``answer_head``: full forward, LM head only on the answer-predicting states;
  - ``both``: the two together (what ``train`` uses).

Model smollm2-135m (fp32, CPU unless a GPU is visible), steering layer 15, 16 examples per step
(``mc``: 32 sequences, ``gen``: 16), questions from the smoke train split, a random bank of
1 + 6 vectors. Reported per branch and mode: median wall and process-CPU seconds per step over the timed steps
(after one warm-up step; CPU time is the steadier figure on a shared machine, wall time is what a
run waits); per branch: the one-off seconds to build the prefix cache of the whole train split.

Run: ``python -m benchmarks.train`` (options: ``--help``); writes ``benchmarks/results/train.json``.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import DATA_CSV, RESULTS_DIR, parser, write_report
from core.config_io import load_config
from core.data import load_questions, split_questions
from core.models import load_model
from steering.mlp import MLPSteering, MLPSteeringConfig
from steering.prefix import PrefixCache
from steering.sequences import encode_examples
from steering.train import SplitScorer, batch_order

RESULTS = RESULTS_DIR / "train.json"
MODES = {  # name: (prefix cache, answer-only head)
    "full": (False, False),
    "prefix_cache": (True, False),
    "answer_head": (False, True),
    "both": (True, True),
}


def timed_step(scorer: SplitScorer, optimizer: torch.optim.Optimizer, examples: list[int], branch: str,
               margin: float) -> tuple[float, float]:
    """Wall and process-CPU seconds of one optimizer step of ``scorer``'s module on ``examples``."""
    tick, cpu_tick = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, count = scorer.loss(examples, branch, margin)
    (loss_sum / count).backward()
    optimizer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - tick, time.process_time() - cpu_tick


def main() -> None:
    p = parser("train", __doc__, flags=('model', 'device'))
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--branches", default="mc,gen")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()

    cfg = load_config(args.model, [f"steering.layer={args.layer}", f"mlp.batch_size={args.batch_size}"])
    loaded = load_model(cfg.model, dtype="float32", device=args.device)
    torch.set_grad_enabled(True)
    questions = split_questions(load_questions(DATA_CSV), cfg.data.sizes, cfg.data.seed)["train"]
    pad_id = loaded.tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(7, cfg.model.d_model, generator=generator)  # (1 + K, d_model)
    results: dict[str, Any] = {}
    for branch in args.branches.split(","):
        seqs = encode_examples(questions, loaded.tokenizer, loaded.prompt_format, branch,
                               max_length=cfg.extract.max_length, seed=cfg.mlp.seed)
        batches = batch_order(seqs.n_examples, args.batch_size, args.steps + 1, seed=0)
        used = sorted({e for b in batches for e in b})
        tick = time.perf_counter()
        cache = PrefixCache.build(loaded.model, args.layer, seqs, pad_id, cfg.extract.batch_size,
                                  cfg.steering.positions)
        cache_seconds = time.perf_counter() - tick
        lengths = [len(seqs.token_ids[i]) for i in seqs.sequence_indices(used)]
        answers = [seqs.n_answer[i] for i in seqs.sequence_indices(used)]
        scorers, optimizers = {}, {}
        for mode, (use_cache, answer_head) in MODES.items():
            torch.manual_seed(0)
            config = MLPSteeringConfig(model=cfg.model.alias, layer=args.layer, d_model=cfg.model.d_model,
                                       n_bank=bank.shape[0], expansion=cfg.mlp.expansion, scale=cfg.steering.scale)
            module = MLPSteering(config, bank).to(loaded.device)
            scorers[mode] = SplitScorer(loaded.model, module, seqs, pad_id, cfg.steering.positions,
                                        cache=cache if use_cache else None, answer_only_head=answer_head)
            optimizers[mode] = torch.optim.AdamW(module.parameters(), lr=cfg.mlp.lr, weight_decay=cfg.mlp.weight_decay)
        wall: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        for step, examples in enumerate(batches):
            # the modes take turns on each batch, so that a change in the machine's load hits them alike
            for mode in MODES:
                seconds, cpu_seconds = timed_step(scorers[mode], optimizers[mode], examples, branch, cfg.mlp.margin)
                wall[mode].append(seconds)
                cpu[mode].append(cpu_seconds)
            print(f"{branch:>3} step {step}: " + ", ".join(f"{m} {wall[m][-1]:.2f}s" for m in MODES)
                  + f" (load {os.getloadavg()[0]:.1f})")
        per_mode: dict[str, Any] = {
            mode: {"seconds_per_step": statistics.median(wall[mode][1:]),
                   "cpu_seconds_per_step": statistics.median(cpu[mode][1:]),
                   "all_seconds": wall[mode], "all_cpu_seconds": cpu[mode]}
            for mode in MODES
        }
        for mode in per_mode:
            for key in ("seconds_per_step", "cpu_seconds_per_step"):
                per_mode[mode][f"speedup_vs_full_{key}"] = per_mode["full"][key] / per_mode[mode][key]
            print(f"{branch:>3} {mode:>12}: {per_mode[mode]['seconds_per_step']:.3f} s/step wall "
                  f"({per_mode[mode]['speedup_vs_full_seconds_per_step']:.2f}x), "
                  f"{per_mode[mode]['cpu_seconds_per_step']:.3f} s/step CPU")
        results[branch] = {
            "modes": per_mode,
            "sequences_per_step": args.batch_size * seqs.per_example,
            "mean_tokens_per_sequence": statistics.mean(lengths),
            "mean_answer_tokens": statistics.mean(answers),
            "cache_seconds_whole_train_split": cache_seconds,
            "train_split_sequences": len(seqs.token_ids),
        }
    report = {
        "model": cfg.model.alias, "layer": args.layer, "n_layers": cfg.model.n_layers,
        "batch_examples": args.batch_size, "timed_steps": args.steps, "dtype": "float32",
        "device": str(loaded.device), "branches": results,
    }
    write_report(args.output, report)


if __name__ == "__main__":
    main()
