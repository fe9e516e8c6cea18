"""bank: a vector bank, the base CAA vector plus bootstrap-resampled vectors at the steering layer.

Parameters: --model, --extract-run (the extract run whose examples to resample), --overrides
(e.g. "bank.n_bootstrap=8,bank.sample_size=40,bank.replace=false,steering.layer=12"), --preset,
--dry-run.
Logs: split_half_cosine, bootstrap_cosine_mean, bootstrap_cosine_min, n_valid and sample_size at
the steering layer, the same for every layer as <name>_by_layer (step = layer) to pick a layer
by, the param extract_run and tag truthsteer.extract_run; artifacts: the bank
(bank/bank.safetensors, base vector first) and its JSON sidecar bank/bank.json.
"""

from argparse import Namespace

from core import artifacts
from core.config import Config
from entrypoints import _cli


def _plan(cfg: Config, args: Namespace) -> list[str]:
    size = "all valid examples" if cfg.bank.sample_size is None else f"{cfg.bank.sample_size} examples"
    return [f"extract run: {args.extract_run}",
            f"layer {cfg.layer} of {cfg.model.alias} ({cfg.model.n_layers} layers, d_model {cfg.model.d_model})",
            f"base + {cfg.bank.n_bootstrap} vectors of {size}, "
            f"{'with' if cfg.bank.replace else 'without'} replacement, seed {cfg.bank.seed}"]


ENTRY = _cli.Entry("bank", __doc__, _plan, lambda cfg, args: _cli.stage("bank").run(cfg, extract_run=args.extract_run),
                   data=False, runs={"extract-run": "MLflow run id of the extract stage"},
                   check=lambda cfg, args: _cli.stage("bank").require_extract_run(args.extract_run),
                   tags=lambda cfg, args: {artifacts.TAG_EXTRACT_RUN: args.extract_run})
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
