"""The vector bank: the base CAA vector at the steering layer plus K bootstrap-resampled vectors.

The extract stage stores, per example and layer, the difference of mean activations
truthful - untruthful (``diffs``) and whether it was finite (``valid``). At one layer the bank
keeps the valid examples only; its base vector is their mean and each of its K bootstrap
vectors is the mean of ``sample_size`` of them drawn with a seeded ``torch.Generator``: with
replacement (the bootstrap) or without (subsampling). The spread of the K vectors around the
base is what the MLP steering module mixes over (``steering.mlp``), and how stable the
direction is tells whether a layer is worth steering at:

* split-half cosine: the mean of a random half of the examples against the mean of the rest;
* bootstrap cosine mean / min: of the K bootstrap vectors to the base.

``stages.bank.run`` logs those figures for every layer (``*_by_layer`` metrics with
``step=layer``) so that a layer can be picked from the MLflow UI, then builds the bank at
``cfg.layer`` and logs it as ``BANK_TENSORS`` (tensor ``vectors``, ``(1 + K, d_model)`` fp32,
base first) beside ``BANK_META`` (layer, model, sample size, seed, notes, stability, the
extract run and the resolved config), so that loading needs no extra flags.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.artifacts import BANK_META, BANK_TENSORS, load_tensors, save_tensors
from core.config import BankConfig, ConfigError
from core.tracking import download

LAYER_METRICS = ("n_valid", "split_half_cosine", "bootstrap_cosine_mean", "bootstrap_cosine_min")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class VectorBank:
    """A base steering vector and K resampled variants of it, at one layer of one model.

    Args:
        vectors: ``(1 + K, d_model)`` fp32, the base vector first, then the K bootstrap vectors.
        layer: the decoder layer the vectors were extracted at (and are meant to steer).
        model: the model alias.
        meta: provenance: sample size used and requested, replace, seed, clamping notes,
            stability figures, the resampled example indices, the extract run and the config.
    """

    vectors: Tensor
    layer: int
    model: str
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, Tensor) or self.vectors.ndim != 2 or self.vectors.shape[0] < 1:
            shape = tuple(self.vectors.shape) if isinstance(self.vectors, Tensor) else type(self.vectors).__name__
            raise ValueError(f"vectors has shape {shape}; it must be (1 + K, d_model) with the base vector first")
        if self.vectors.dtype != torch.float32:
            raise ValueError(f"vectors has dtype {self.vectors.dtype}; store the bank as torch.float32")
        if self.layer < 0:
            raise ValueError(f"layer={self.layer} must be >= 0")

    @property
    def base(self) -> Tensor:
        """The base vector, the mean of every valid example: ``(d_model,)``."""
        return self.vectors[0]

    @property
    def bootstrap(self) -> Tensor:
        """The K resampled vectors: ``(K, d_model)``."""
        return self.vectors[1:]

    @property
    def n_bootstrap(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``BANK_TENSORS`` and ``BANK_META`` under ``directory`` (an artifact root); return their paths.

        Args:
            directory: where to write; ``bank/bank.safetensors`` and ``bank/bank.json`` go below it.
        """
        tensors_path, meta_path = Path(directory) / BANK_TENSORS, Path(directory) / BANK_META
        meta = {**self.meta, "layer": self.layer, "model": self.model, "n_bootstrap": self.n_bootstrap,
                "d_model": self.d_model}
        save_tensors(tensors_path, meta_path, {"vectors": self.vectors}, meta)
        return tensors_path, meta_path

    @classmethod
    def load(cls, directory: Path) -> VectorBank:
        """Read a bank that ``save`` wrote under ``directory`` (an artifact root).

        Args:
            directory: the directory holding ``bank/bank.safetensors`` and ``bank/bank.json``.
        """
        tensors, meta = load_tensors(Path(directory) / BANK_TENSORS, Path(directory) / BANK_META)
        return _from_files(tensors, meta, str(directory))


def _from_files(tensors: dict[str, Tensor], meta: dict[str, Any], where: str) -> VectorBank:
    if "vectors" not in tensors:
        raise ValueError(f"bank at {where} has tensors {sorted(tensors)}; expected 'vectors'")
    missing = [key for key in ("layer", "model") if key not in meta]
    if missing:
        raise ValueError(f"bank metadata at {where} lacks {', '.join(missing)}; rebuild it with the bank stage")
    vectors = tensors["vectors"]  # (1 + K, d_model)
    if meta.get("d_model") not in (None, vectors.shape[-1]):
        raise ValueError(f"bank at {where}: metadata says d_model={meta['d_model']}, "
                         f"the vectors have shape {tuple(vectors.shape)}; the files do not belong together")
    return VectorBank(vectors=vectors, layer=int(meta["layer"]), model=str(meta["model"]), meta=meta)


def load_bank(run_id_or_dir: str | Path) -> VectorBank:
    """The bank of a ``bank`` run (through MLflow's artifact API), or one saved in a local directory.

    Args:
        run_id_or_dir: an existing directory holding ``BANK_TENSORS`` and ``BANK_META`` (as
            ``VectorBank.save`` writes them, or a downloaded artifact root); anything else is
            taken as the id of a bank run in the current tracking store.
    """
    local = Path(run_id_or_dir).expanduser()
    if local.is_dir():
        return VectorBank.load(local)
    run_id = str(run_id_or_dir)
    tensors, meta = load_tensors(download(run_id, BANK_TENSORS), download(run_id, BANK_META))
    return _from_files(tensors, meta, f"run {run_id}")


# ---------------------------------------------------------------- building


def _valid_rows(diffs: Tensor, valid: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """The float64 diffs of the examples valid at ``layer`` and their example indices."""
    if diffs.ndim != 3 or not diffs.is_floating_point():
        raise ValueError(f"diffs has shape {tuple(diffs.shape)} and dtype {diffs.dtype}; "
                         "it must be floating (n_examples, n_layers, d_model)")
    if tuple(valid.shape) != tuple(diffs.shape[:2]):
        raise ValueError(f"valid has shape {tuple(valid.shape)}; it must be (n_examples, n_layers) = "
                         f"{tuple(diffs.shape[:2])} to match diffs")
    n_layers = diffs.shape[1]
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer={layer} must be in [0, {n_layers}): the extraction has {n_layers} layers; "
                          f"set steering.layer in that range")
    keep = valid[:, layer] != 0  # (n_examples,)
    index = torch.nonzero(keep).flatten()  # (n_valid,)
    rows = diffs[index, layer].to(torch.float64)  # (n_valid, d_model)
    finite = torch.isfinite(rows).all(dim=1)  # (n_valid,)
    if not bool(finite.all()):
        bad = index[~finite].tolist()
        raise ValueError(f"examples {bad[:10]} are marked valid at layer {layer} but their diffs hold NaN or inf; "
                         "the extract artifact is inconsistent: re-run the extract stage")
    return rows, index


def _check_n_bootstrap(n_bootstrap: int) -> None:
    if n_bootstrap < 0:
        raise ConfigError(f"bank.n_bootstrap={n_bootstrap} must be >= 0")


def _sample_size(requested: int | None, n_valid: int, layer: int) -> tuple[int, str | None]:
    """The sample size to draw (all valid examples when None, clamped to n_valid) and a note on clamping."""
    if requested is None:
        return n_valid, None
    if requested < 1:
        raise ConfigError(f"bank.sample_size={requested} must be >= 1 (or null for all valid examples)")
    if requested > n_valid:
        return n_valid, (f"bank.sample_size={requested} is more than the {n_valid} examples valid at layer "
                         f"{layer}; clamped to {n_valid}")
    return requested, None


def _draw(n_valid: int, n_bootstrap: int, size: int, replace: bool, seed: int) -> Tensor:
    """Row indices of the K resamples, ``(K, size)``, from one ``torch.Generator`` seeded with ``seed``.

    With replacement: ``torch.randint(0, n_valid, (K, size))``; without: the first ``size``
    entries of ``torch.randperm(n_valid)``, one permutation per resample in order.
    """
    generator = torch.Generator().manual_seed(seed)
    if replace:
        return torch.randint(0, n_valid, (n_bootstrap, size), generator=generator)  # (K, size)
    rows = [torch.randperm(n_valid, generator=generator)[:size] for _ in range(n_bootstrap)]
    return torch.stack(rows) if rows else torch.empty(0, size, dtype=torch.long)  # (K, size)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last axis, in float64; NaN where either vector is zero."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    dot = (a64 * b64).sum(dim=-1)  # (...,)
    norms = a64.norm(dim=-1) * b64.norm(dim=-1)  # (...,)
    return torch.where(norms > 0, dot / norms, torch.full_like(dot, math.nan))


def _split_half(rows: Tensor, seed: int) -> float:
    """Cosine of the mean of a random half of ``rows`` to the mean of the rest; NaN under 2 rows.

    The halves are ``perm[: n // 2]`` and ``perm[n // 2 :]`` of ``torch.randperm(n)`` from a
    generator seeded with ``seed``.
    """
    n_valid = rows.shape[0]
    if n_valid < 2:
        return math.nan
    perm = torch.randperm(n_valid, generator=torch.Generator().manual_seed(seed))  # (n_valid,)
    first, second = rows[perm[: n_valid // 2]], rows[perm[n_valid // 2:]]  # (n_valid // 2, d_model), (rest, d_model)
    return float(_cosine(first.sum(dim=0) / first.shape[0], second.sum(dim=0) / second.shape[0]))


def _resample(rows: Tensor, draws: Tensor) -> Tensor:
    """Mean of the drawn rows per resample, in float64: ``(K, d_model)``."""
    if draws.shape[0] == 0:
        return rows.new_zeros(0, rows.shape[1])  # (0, d_model)
    return rows[draws].sum(dim=1) / draws.shape[1]  # (K, size, d_model) -> (K, d_model)


def _bootstrap_figures(base: Tensor, bootstrap: Tensor) -> dict[str, float]:
    if bootstrap.shape[0] == 0:
        return {"bootstrap_cosine_mean": math.nan, "bootstrap_cosine_min": math.nan}
    cosines = _cosine(bootstrap, base.expand_as(bootstrap))  # (K,)
    return {"bootstrap_cosine_mean": float(cosines.mean()), "bootstrap_cosine_min": float(cosines.min())}


def stability(
    diffs: Tensor,
    valid: Tensor,
    layer: int,
    seed: int,
    *,
    n_bootstrap: int = BankConfig.n_bootstrap,
    sample_size: int | None = BankConfig.sample_size,
    replace: bool = BankConfig.replace,
) -> dict[str, float]:
    """How stable the mean difference direction is at one layer.

    Returns ``n_valid``, ``sample_size`` (after clamping), ``split_half_cosine`` and
    ``bootstrap_cosine_mean`` / ``bootstrap_cosine_min`` (of the K resampled vectors to the base,
    drawn exactly as ``build_bank`` draws them). A figure that is undefined is NaN: everything at
    a layer with no valid example, the split half under 2 examples, the bootstrap figures when
    ``n_bootstrap`` is 0. Unlike ``build_bank`` it does not refuse ``replace=False`` with a sample
    of every example: the figures are then 1 (up to rounding), which is the truth.

    Args:
        diffs: ``(n_examples, n_layers, d_model)`` per-example truthful - untruthful differences.
        valid: ``(n_examples, n_layers)``, nonzero where the example is finite at that layer.
        layer: the layer to measure, in ``[0, n_layers)``.
        seed: seeds the split and the resampling.
        n_bootstrap: K, the number of resampled vectors.
        sample_size: examples per resample; None for all valid ones; clamped to the valid count.
        replace: draw with replacement (bootstrap) or without (subsampling).
    """
    _check_n_bootstrap(n_bootstrap)
    rows, _ = _valid_rows(diffs, valid, layer)  # (n_valid, d_model)
    n_valid = rows.shape[0]
    if n_valid == 0:
        return {"n_valid": 0.0, "sample_size": 0.0, "split_half_cosine": math.nan,
                "bootstrap_cosine_mean": math.nan, "bootstrap_cosine_min": math.nan}
    size, _ = _sample_size(sample_size, n_valid, layer)
    base = rows.sum(dim=0) / n_valid  # (d_model,)
    bootstrap = _resample(rows, _draw(n_valid, n_bootstrap, size, replace, seed))  # (K, d_model)
    return {"n_valid": float(n_valid), "sample_size": float(size), "split_half_cosine": _split_half(rows, seed),
            **_bootstrap_figures(base, bootstrap)}


def build_bank(
    diffs: Tensor,
    valid: Tensor,
    layer: int,
    *,
    n_bootstrap: int,
    sample_size: int | None,
    replace: bool,
    seed: int,
    model: str = "",
) -> VectorBank:
    """The base vector and K resampled vectors at ``layer``, from the examples valid there.

    The base is the mean of every valid example. Each bootstrap vector is the mean of
    ``sample_size`` valid examples drawn by one ``torch.Generator`` seeded with ``seed`` (see
    ``_draw``); means are taken in float64 and stored as float32. A ``sample_size`` above the
    number of valid examples is clamped to it, and the clamp is written to ``meta["notes"]``.
    Drawing without replacement a sample of every valid example would give K copies of the base,
    so that is refused with the fix.

    Args:
        diffs: ``(n_examples, n_layers, d_model)`` per-example truthful - untruthful differences.
        valid: ``(n_examples, n_layers)``, nonzero where the example is finite at that layer.
        layer: the steering layer, in ``[0, n_layers)``.
        n_bootstrap: K, the number of resampled vectors (0 for the base alone).
        sample_size: examples per resample; None for all valid ones.
        replace: draw with replacement (bootstrap) or without (subsampling).
        seed: seeds the resampling and the split-half figure.
        model: the model alias recorded in the bank.
    """
    _check_n_bootstrap(n_bootstrap)
    rows, index = _valid_rows(diffs, valid, layer)  # (n_valid, d_model), (n_valid,)
    n_examples, n_valid = diffs.shape[0], rows.shape[0]
    if n_valid == 0:
        usable = torch.nonzero((valid != 0).any(dim=0)).flatten().tolist()
        nearest = (f"steering.layer={min(usable, key=lambda u: abs(u - layer))} is the nearest layer with "
                   "valid examples (the bank run logs n_valid_by_layer), or " if usable else "no layer has any: ")
        raise ConfigError(f"no valid examples at layer {layer}: all {n_examples} differences are non-finite "
                          f"there; {nearest}re-run extract with extract.dtype=float32")
    size, clamp_note = _sample_size(sample_size, n_valid, layer)
    if not replace and n_bootstrap > 0 and size == n_valid:
        fix = (f"set bank.sample_size below {n_valid} (e.g. {n_valid // 2}) or bank.replace=true"
               if n_valid > 1 else "set bank.n_bootstrap=0, or choose a layer with more valid examples")
        asked = "null (all)" if sample_size is None else str(sample_size)
        raise ConfigError(f"bank.replace=false with bank.sample_size={asked} draws all {n_valid} examples valid "
                          f"at layer {layer} without replacement, so every bootstrap vector would equal the base; "
                          f"{fix}")
    draws = _draw(n_valid, n_bootstrap, size, replace, seed)  # (K, size)
    base = rows.sum(dim=0) / n_valid  # (d_model,)
    bootstrap = _resample(rows, draws)  # (K, d_model)
    vectors = torch.cat([base[None], bootstrap]).to(torch.float32)  # (1 + K, d_model)
    figures = {"split_half_cosine": _split_half(rows, seed), **_bootstrap_figures(base, bootstrap)}
    meta = {
        "layer": layer,
        "model": model,
        "n_examples": n_examples,
        "n_valid": n_valid,
        "invalid_examples": torch.nonzero(valid[:, layer] == 0).flatten().tolist(),
        "n_bootstrap": n_bootstrap,
        "sample_size": size,
        "sample_size_requested": sample_size,
        "replace": replace,
        "seed": seed,
        "clamped": clamp_note is not None,
        "notes": [clamp_note] if clamp_note else [],
        "indices": index[draws].tolist(),  # example (not row) indices of each resample
        "stability": {key: _json_number(value) for key, value in figures.items()},
    }
    return VectorBank(vectors=vectors, layer=layer, model=model, meta=meta)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value
