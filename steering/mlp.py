"""The MLP steering module: a state-dependent mixture of the vector bank plus a learned correction.

At the steering layer L the residual h is mapped to

    delta(h) = scale * (bank[0] + sum_k g_k(h) * (bank[k] - bank[0])) + mlp(n(h))
    g(h)     = W_g n(h) + b_g                      (zero-initialised, so g = 0 at init)
    mlp(x)   = W_2 GELU(W_1 x + b_1) + b_2         (W_2, b_2 zero-initialised)
    n(h)     = h / sqrt(mean(h^2) + eps)           (RMS normalisation, no learned weight)

so that an untrained module outputs exactly ``scale * bank[0]``: training starts from CAA. Both
the gates and the MLP read the RMS-normalised residual: raw residual norms differ by orders of
magnitude between layers and models (and a few "massive activation" dimensions dominate them), so
one learning rate would not suit them all. Everything is computed in fp32, whatever the model's
dtype; ``steering.hooks.steer`` casts the delta back to the residual's dtype.

The module's output already includes ``scale``: steer with it at hook scale 1.0 (``module.steering``
does so). A checkpoint is ``mlp.safetensors`` (parameters and the bank) beside ``mlp.json`` (the
``MLPSteeringConfig`` under ``"module"``, plus whatever the trainer adds: branch, resolved config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import mlflow
import torch
from torch import Tensor, nn

from core.artifacts import MLP_DIR, MLP_META, MLP_TENSORS, TAG_BRANCH_RUN, load_tensors, save_tensors
from core.config import Config, ConfigError
from core.tracking import download
from steering.hooks import SteeredCount, steer
from steering.methods.intervention import Steering, module_on_layer_device, steering_key_fields

Branch = Literal["mc", "gen", "joint"]
LOSS_BRANCHES: tuple[Branch, ...] = ("mc", "gen")  # the branches with a loss (and sequences) of their own
BRANCHES: tuple[Branch, ...] = ("mc", "gen", "joint")  # joint: one module on the weighted sum of both losses


@dataclasses.dataclass(frozen=True)
class MLPSteeringConfig:
    """Hyperparameters of an `MLPSteering` module, stored in its checkpoint.

    Args:
        model: alias of the model it steers, e.g. ``smollm2-135m``.
        layer: the decoder layer whose output it steers.
        d_model: residual stream width.
        n_bank: rows of the vector bank, base vector included (1 + K bootstrap vectors).
        expansion: hidden width of the MLP as a multiple of ``d_model``: 1, 2 or 4.
        scale: multiplier of the bank mixture (the CAA scale the module starts from).
        eps: added to the mean square in the RMS normalisation.
    """

    model: str
    layer: int
    d_model: int
    n_bank: int
    expansion: int = 2
    scale: float = 4.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer={self.layer} must be >= 0 (a decoder layer index)")
        if self.d_model <= 0:
            raise ValueError(f"d_model={self.d_model} must be > 0 (the residual width, e.g. 576)")
        if self.n_bank < 1:
            raise ValueError(f"n_bank={self.n_bank} must be >= 1: the bank holds the base vector first")
        if self.expansion not in (1, 2, 4):
            raise ValueError(f"expansion={self.expansion} must be 1, 2 or 4")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale={self.scale} must be a finite number")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps={self.eps} must be a small positive number, e.g. 1e-6")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MLPSteeringConfig:
        """Rebuild from ``dataclasses.asdict`` output; unknown or missing keys are an error naming them."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if unknown or missing:
            raise ValueError(f"MLP config has unknown keys {unknown} and lacks {missing}; expected keys {names}")
        return cls(**dict(data))


class MLPSteering(nn.Module):
    """``forward(resid) -> delta``: the steering delta at one layer, a bank mixture plus an MLP.

    Args:
        config: the module's hyperparameters.
        bank: ``(n_bank, d_model)`` vector bank, base vector first; stored as an fp32 buffer.
    """

    bank: Tensor  # (n_bank, d_model) fp32 buffer

    def __init__(self, config: MLPSteeringConfig, bank: Tensor) -> None:
        super().__init__()
        expected = (config.n_bank, config.d_model)
        if not isinstance(bank, Tensor) or bank.ndim != 2 or tuple(bank.shape) != expected:
            shape = tuple(bank.shape) if isinstance(bank, Tensor) else type(bank).__name__
            raise ValueError(
                f"bank has shape {shape}; it must be (n_bank, d_model) = {expected}, base vector first "
                "(a VectorBank's .vectors)"
            )
        if not bool(torch.isfinite(bank).all()):
            raise ValueError("bank holds NaN or inf; rebuild the vector bank from finite activations")
        self.config = config
        hidden = config.expansion * config.d_model
        self.register_buffer("bank", bank.detach().to(torch.float32).clone())  # (n_bank, d_model)
        with warnings.catch_warnings():  # n_bank=1 (no bootstrap vectors) makes an empty gate layer
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            self.gate = nn.Linear(config.d_model, config.n_bank - 1)
        self.up = nn.Linear(config.d_model, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, config.d_model)
        for zeroed in (self.gate, self.down):  # g = 0 and mlp = 0 at init: the module starts as CAA
            nn.init.zeros_(zeroed.weight)
            nn.init.zeros_(zeroed.bias)
        self.float()

    def normalise(self, resid: Tensor) -> Tensor:
        """RMS-normalised residual, fp32, same shape."""
        x = resid.to(torch.float32)  # (..., d_model)
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.config.eps)  # (..., d_model)

    def gates(self, resid: Tensor) -> Tensor:
        """Mixture weights g(h) of the K bank directions, ``(..., n_bank - 1)``."""
        return self.gate(self.normalise(resid))  # (..., K)

    def forward(self, resid: Tensor) -> Tensor:
        """Steering delta for residuals ``resid`` of shape ``(..., d_model)``, returned in fp32, same shape."""
        if resid.shape[-1] != self.config.d_model:
            raise ValueError(
                f"resid has shape {tuple(resid.shape)}; its last axis must be d_model={self.config.d_model} "
                f"(the residual of layer {self.config.layer} of {self.config.model})"
            )
        normed = self.normalise(resid)  # (..., d_model)
        base = self.bank[0]  # (d_model,)
        directions = self.bank[1:] - base  # (K, d_model)
        mixture = base + self.gate(normed) @ directions  # (..., d_model)
        correction = self.down(self.act(self.up(normed)))  # (..., d_model)
        return self.config.scale * mixture + correction  # (..., d_model)

    @contextmanager
    def steering(self, model: nn.Module, start_positions: Tensor | None = None) -> Iterator[SteeredCount]:
        """Steer ``model`` at ``config.layer`` with this module (hook scale 1.0: ``scale`` is inside).

        Args:
            model: the model the module was trained on.
            start_positions: ``(batch,)`` first steered position per row, or None for every position.

        Yields:
            The hook's ``SteeredCount``.
        """
        with steer(model, self.config.layer, module=self, scale=1.0, start_positions=start_positions) as count:
            yield count


def save_mlp(module: MLPSteering, directory: str | Path, extra_meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``module`` as ``MLP_TENSORS`` (parameters and bank) and ``MLP_META`` (config) into ``directory``.

    Args:
        module: the module to save.
        directory: target folder, created if missing.
        extra_meta: more JSON-serialisable metadata (branch, resolved run config); key ``module`` is reserved.

    Returns:
        ``directory`` as a Path.
    """
    extra = dict(extra_meta or {})
    if "module" in extra:
        raise ValueError("extra_meta must not contain the key 'module'; it holds the MLPSteeringConfig")
    directory = Path(directory)
    meta = {"module": dataclasses.asdict(module.config), **extra}
    save_tensors(directory / MLP_TENSORS, directory / MLP_META, module.state_dict(), meta)
    return directory


def _local_dir(source: Path, branch: str) -> Path | None:
    for candidate in (source, source / MLP_DIR.format(branch=branch)):
        if (candidate / MLP_TENSORS).exists():
            return candidate
    return None


def _download_dir(run_id: str, branch: str) -> Path:
    artifact = MLP_DIR.format(branch=branch)
    try:
        return download(run_id, artifact)
    except ConfigError:
        # A `train` run with branch=both trains each branch in a child run and tags the parent.
        tags = mlflow.MlflowClient().get_run(run_id).data.tags
        child = tags.get(TAG_BRANCH_RUN.format(branch=branch))
        if not child:
            raise
        return download(child, artifact)


def load_mlp(source: str | Path, branch: str) -> MLPSteering:
    """Load a module written by ``save_mlp``: from a folder or from a ``train`` MLflow run.

    Args:
        source: a folder holding ``mlp.safetensors`` (or ``mlp/<branch>/mlp.safetensors``), or the id of a
            ``train`` run; for a ``branch=both`` parent run the branch's child run is followed.
        branch: ``mc``, ``gen`` or ``joint``.

    Returns:
        The module in eval mode, fp32, on the CPU.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch={branch!r} is not one of {', '.join(BRANCHES)}")
    path = Path(str(source)).expanduser()
    if path.is_dir():
        found = _local_dir(path, branch)
        if found is None:
            raise FileNotFoundError(
                f"no {MLP_TENSORS} in {path} or {path / MLP_DIR.format(branch=branch)}; pass the folder "
                "save_mlp wrote or a train run id"
            )
        directory = found
    else:
        directory = _download_dir(str(source), branch)
    tensors, meta = load_tensors(directory / MLP_TENSORS, directory / MLP_META)
    if "module" not in meta:
        raise ValueError(f"{directory / MLP_META} has no 'module' section; it was not written by save_mlp")
    saved_branch = meta.get("branch")
    if saved_branch is not None and saved_branch != branch:
        raise ValueError(f"{directory} holds a {saved_branch!r} module, not {branch!r}; ask for branch={saved_branch!r}")
    config = MLPSteeringConfig.from_dict(meta["module"])
    module = MLPSteering(config, tensors["bank"])
    module.load_state_dict(tensors, strict=True)
    return module.eval()


def trained_scale(source: str | Path, branch: str) -> tuple[float, str]:
    """``(steering.scale, steering.scale_mode)`` the module of ``source`` was trained at: its train run's params,
    or the config in a folder's ``mlp.json``."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        found = _local_dir(path, branch)
        steering = json.loads((found / MLP_META).read_text()).get("config", {}).get("steering", {}) if found else {}
        params = {f"steering.{k}": str(v) for k, v in steering.items()}
    else:
        params = mlflow.MlflowClient().get_run(str(source)).data.params
    if "steering.scale" not in params:
        raise ConfigError(f"the MLP of {source} does not record the steering.scale it was trained at; unset "
                          "eval.mlp_scale to evaluate it as trained")
    return float(params["steering.scale"]), params.get("steering.scale_mode", "absolute")


def mlp_hook_scale(cfg: Config, variant: str, source: str | Path) -> float:
    """The hook scale of an MLP variant: 1.0 (the module's output is the whole delta), or with ``eval.mlp_scale``
    set, ``eval.mlp_scale`` over the ``steering.scale`` the module was trained at (the same mode)."""
    if cfg.eval.mlp_scale is None:
        return 1.0
    scale, mode = trained_scale(source, variant.removeprefix("mlp_"))
    if mode != cfg.steering.scale_mode or scale == 0:
        raise ConfigError(f"eval.mlp_scale={cfg.eval.mlp_scale} rescales the MLP of {source}, trained at "
                          f"steering.scale={scale} ({mode}); it needs a nonzero scale of the same "
                          f"steering.scale_mode ({cfg.steering.scale_mode}): unset eval.mlp_scale or train again")
    return cfg.eval.mlp_scale / scale


def mlp_steering(cfg: Config, variant: str, source: str, model: nn.Module | None = None) -> Steering:
    """The steering of ``variant`` (``mlp_mc``, ``mlp_gen`` or ``mlp_joint``): the module of the train run ``source``,
    checked against ``cfg``'s model and layer, on the device of its layer in ``model`` (CPU when None)."""
    module = load_mlp(source, variant.removeprefix("mlp_"))
    trained = module.config
    if trained.model != cfg.model.alias or trained.layer != cfg.layer:
        raise ConfigError(
            f"{variant}: the MLP of run {source} steers {trained.model!r} at layer {trained.layer}, but this "
            f"evaluation is {cfg.model.alias!r} at layer {cfg.layer}; pass a train run of the same model and "
            f"layer, or set steering.layer={trained.layer}"
        )
    placed = module if model is None else module_on_layer_device(module, model, trained.layer)
    # The module's output is the whole delta (its scale is inside): hook scale 1.0 unless eval.mlp_scale is set.
    return Steering(variant, layer=trained.layer, scale=mlp_hook_scale(cfg, variant, source), module=placed,
                    positions=cfg.steering.positions, source_run=source)


def mlp_key_fields(cfg: Config, variant: str, source: str) -> dict[str, Any]:
    """``mlp_steering(...).key_fields()`` without loading: the module steers at ``cfg.layer`` (``mlp_steering``
    checks it) with ``mlp_hook_scale``."""
    return steering_key_fields(variant, layer=cfg.layer, scale=mlp_hook_scale(cfg, variant, source),
                               positions=cfg.steering.positions,
                               source_run=source)
