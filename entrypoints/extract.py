"""extract: CAA steering vectors for every decoder layer in one batched pass over the pool split.

For each pool question, (correct, incorrect) answer pairs (extract.pairs_per_question; the best
answer first, the rest drawn with data.seed) are run through the frozen model in extract.dtype
(default: the model's dtype), one forward pass per batch of extract.batch_size pairs. The output of
every decoder layer is averaged over the answer tokens only (prompt and padding masked), and the
vector per layer is the mean difference truthful - untruthful. An example whose mean is NaN/inf at
a layer is dropped at that layer and counted; a layer above extract.nan_threshold fails the run
with the fixes (bf16, the preset gemma3-fp16-maxlen384, a lower extract.max_length).

Parameters: --model, --data, --split, --data-run (reuse a data run's splits), --overrides,
--preset, --dry-run (print the model source, layers, pool size and batches; load no weights).
Logs: metrics nan_rate (all example-layer entries), nan_rate_max, nan_rate_by_layer and
norm_by_layer (step = layer), n_examples, n_pairs, n_questions; params extract.prompt_format,
extract.device, extract.pair_seed, extract.data_run; artifacts extract/caa.safetensors (vectors
(n_layers, d_model), diffs (n_examples, n_layers, d_model), valid (n_examples, n_layers) uint8) and
its JSON sidecar extract/caa.json (model, layers, norms, counts, question ids, dtype, config).
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("extract", __doc__)
    _cli.add_model(p)
    _cli.add_data(p)
    _cli.run_arg(p, "data-run", "MLflow run id of a data stage whose splits to use")
    _cli.add_config(p)
    return p


def main() -> None:
    from core.tracking import stage_run
    from stages import extract as extract_stage

    args = build_parser().parse_args()
    cfg = _cli.build_config(args)
    if args.dry_run:
        _cli.print_plan("extract", cfg, extract_stage.plan(cfg, args.data_run))
        return
    with stage_run("extract", cfg):
        extract_stage.run(cfg, data_run=args.data_run)


if __name__ == "__main__":
    _cli.main(main)
