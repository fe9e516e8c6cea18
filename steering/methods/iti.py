"""``iti``: inference-time intervention (Li et al., 2023), the TruthfulQA steering anchor.

The ``iti`` stage ranks every attention head by the held-out accuracy of a probe that tells true
from false answers on its output, and stores each head's mass-mean direction and sigma
(``ITI_HEADS``). This method steers the best ``iti.k`` of them, adding ``iti.alpha * sigma *
direction`` to each head's output before ``o_proj`` from the prompt's end on (``steering.iti``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from core import artifacts
from core.config import Config, ConfigError, ModelSpec
from core.tracking import download
from steering.hooks import SteeredCount
from steering.iti import FIELDS, ItiDirections, iti_applied
from steering.methods import Method, register
from steering.methods.intervention import Steering, steering_key_fields
from steering.methods.tuning import Tunable, TuneAxis, per_sampler


@dataclasses.dataclass(frozen=True, eq=False)
class ItiSteering(Steering):
    """The heads of ``directions`` shifted by ``scale`` (ITI's alpha) times their sigma and direction.

    ``layer`` is the lowest steered layer (for the generations table); every steered layer counts once
    in the steered-token check, as one residual-stream hook does.
    """

    directions: ItiDirections | None = None

    def payload(self) -> list[Any]:
        return [x for x in (self.vector, self.module, self.directions) if x is not None]

    def hooked(self, model: nn.Module, starts: Tensor | None) -> contextlib.AbstractContextManager[SteeredCount]:
        assert self.directions is not None  # payload() made sure
        return iti_applied(model, self.directions, self.scale, start_positions=starts)

    def last_unedited_layer(self, n_layers: int) -> int:
        """Below ``layer``: the heads' shift enters inside the lowest steered layer's attention."""
        return super().last_unedited_layer(n_layers) - (1 if self.steers else 0)

    def key_fields(self) -> dict[str, Any]:
        if not self.steers or self.directions is None:
            return super().key_fields()
        return {**super().key_fields(), "layer": None, "k": int(self.directions.layers.shape[0])}


def top_heads(ranked: ItiDirections, k: int) -> ItiDirections:
    """The first ``k`` heads of ``ranked`` (the ``iti`` stage stores them best first)."""
    n = int(ranked.layers.shape[0])
    if k > n:
        raise ConfigError(f"iti.k={k} but the iti run ranked only {n} heads; set iti.k <= {n}")
    return ItiDirections(**{f: getattr(ranked, f)[:k] for f in FIELDS})


def read_ranked(source: str, model: str) -> tuple[ItiDirections, dict[str, Any]]:
    """Every head the iti run ``source`` ranked (best first) and its ``ITI_META``, checked to be of ``model``."""
    meta: dict[str, Any] = json.loads(download(source, artifacts.ITI_META).read_text())
    if meta.get("model") != model:
        raise ConfigError(f"iti run {source} probed {meta.get('model')!r}, not {model!r}; pass an iti run of "
                          f"{model} (evaluate --sources iti=<run id>, tune --source-run <run id>)")
    return ItiDirections.load(download(source, artifacts.ITI_HEADS)), meta


def load(cfg: Config, source: str, model: Any = None) -> ItiSteering:
    """The best ``iti.k`` heads of the iti run ``source``, shifted by ``iti.alpha``."""
    heads = top_heads(read_ranked(source, cfg.model.alias)[0], cfg.iti.k)
    return ItiSteering("iti", layer=int(torch.min(heads.layers)), scale=cfg.iti.alpha, directions=heads,
                       positions=cfg.steering.positions, source_run=source)


def key_fields(cfg: Config, source: str) -> dict[str, Any]:
    return {**steering_key_fields("iti", layer=None, scale=cfg.iti.alpha, positions=cfg.steering.positions,
                                  source_run=source), "k": cfg.iti.k}


def steer(cfg: Config, ranked: ItiDirections, source: str, params: Mapping[str, float]) -> ItiSteering:
    """One trial: the best ``k`` of the ``ranked`` heads shifted by ``alpha``."""
    heads = top_heads(ranked, int(params["k"]))
    return ItiSteering("iti", layer=int(torch.min(heads.layers)), scale=float(params["alpha"]), directions=heads,
                       positions=cfg.steering.positions, source_run=source)


def _check_ks(low: float, high: float, spec: ModelSpec) -> str:
    return "must be >= 1 head; e.g. ks=1:48 (or ks=4,8,16,32)" if low < 1 else ""


def _check_ranked(ranked: ItiDirections, bounds: Mapping[str, tuple[float, float]], where: str) -> dict[str, str]:
    n_heads = int(ranked.layers.shape[0])
    if bounds["k"][1] > n_heads:
        return {"k": f"exceeds the {n_heads} heads {where} ranked; give ks <= {n_heads}, e.g. ks=1:{min(48, n_heads)}"}
    return {}


K = TuneAxis("k", "ks", True, per_sampler("1:48", "4,8,16,32"), example="1:48 or 4,8,16,32", check=_check_ks,
             unit="number of heads", help="iti: heads, range or list: 1:48 or 4,8,16,32")
ALPHA = TuneAxis("alpha", "alphas", False, per_sampler("0:30", "0:30:5"), example="0:30 or 5,10,15",
                 help="iti: shift in sigmas: 0:30, 0:30:5 or 5,15")
TUNE = Tunable(axes=(K, ALPHA), section="iti", noun="heads", steer=steer, check_source=_check_ranked)

METHOD = register(Method(name="iti", stage="iti", section="iti",
                         needs="an iti stage run (its iti/heads.safetensors)", load=load, key_fields=key_fields,
                         tune=TUNE))
