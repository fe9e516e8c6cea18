"""bank: a vector bank, the base CAA vector plus bootstrap-resampled vectors at the steering layer.

Parameters: --model, --extract-run (the extract run whose examples to resample), --overrides
(e.g. "bank.n_bootstrap=8,bank.sample_size=40,bank.replace=false,steering.layer=12"), --preset,
--dry-run.
Logs: split_half_cosine, bootstrap_cosine_mean, bootstrap_cosine_min, n_valid and sample_size at
the steering layer, the same for every layer as <name>_by_layer (step = layer) to pick a layer
by, the param extract_run and tag truthsteer.extract_run; artifacts: the bank
(bank/bank.safetensors, base vector first) and its JSON sidecar bank/bank.json.
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("bank", __doc__)
    _cli.add_model(p)
    _cli.run_arg(p, "extract-run", "MLflow run id of the extract stage")
    _cli.add_config(p)
    return p


def main() -> None:
    from core import artifacts
    from core.tracking import stage_run
    from stages import bank

    args = build_parser().parse_args()
    cfg = _cli.build_config(args)
    extract_run = bank.require_extract_run(args.extract_run)
    if args.dry_run:
        size = "all valid examples" if cfg.bank.sample_size is None else f"{cfg.bank.sample_size} examples"
        _cli.print_plan("bank", cfg, [
            f"extract run: {extract_run}",
            f"layer {cfg.layer} of {cfg.model.alias} ({cfg.model.n_layers} layers, d_model {cfg.model.d_model})",
            f"base + {cfg.bank.n_bootstrap} vectors of {size}, "
            f"{'with' if cfg.bank.replace else 'without'} replacement, seed {cfg.bank.seed}",
        ])
        return
    with stage_run("bank", cfg, tags={artifacts.TAG_EXTRACT_RUN: extract_run}):
        bank.run(cfg, extract_run=extract_run)


if __name__ == "__main__":
    _cli.main(main)
