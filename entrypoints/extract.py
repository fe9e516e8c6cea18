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

from entrypoints import _cli

ENTRY = _cli.Entry.pool_stage("extract", __doc__)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
