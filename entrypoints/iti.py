"""iti: every attention head ranked by a truthfulness probe on its output (inference-time intervention).

For each pool question, iti.pairs_per_question (correct, incorrect) answer pairs run through the
frozen model; each head's output before o_proj at the answer's last token is a probe example. A
logistic probe per head, trained on 1 - iti.val_fraction of the examples, is scored on the rest, and
every head is stored best first with its mass-mean direction (true minus false) and sigma. The iti
variant of evaluate steers the best iti.k heads by iti.alpha x sigma x direction (Li et al., 2023).

Parameters: --model, --data, --split, --data-run (reuse a data run's splits), --overrides (e.g.
"iti.pairs_per_question=4,iti.val_fraction=0.25"), --preset, --dry-run (print the plan; load no weights).
Logs: metrics n_examples, best_accuracy, top_k_accuracy, best_accuracy_by_layer (step = layer);
artifacts iti/heads.safetensors (layers, heads, directions, sigmas, accuracies) and iti/heads.json.
"""

from entrypoints import _cli

ENTRY = _cli.Entry.pool_stage("iti", __doc__)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
