"""Scoring one setting for the tune stage (CAA's layer and scale, or ITI's k and alpha): the shared all-layer
extraction, the trial scorer and the Optuna objective with pruning and the stop request."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
from optuna.trial import Trial

from core import artifacts, tracking
from core.artifacts import (
    TAG_STUDY,
    TRIAL_STAGE,
)
from core.config import Config, ConfigError
from core.config_io import config_to_dict
from core.data import Question, source_sha256
from core.models import TORCH_DTYPES, LoadedModel, load_from_config
from core.stores import file_lock
from evaluation.statistics import bootstrap_ci
from stages.extract import load_extraction, norm_meta
from stages.tune_space import ATTR_CONSTRAINTS, PRUNING_CHUNK, Constraint, Objective, SearchSpace
from stages.tune_storage import (
    ATTR_FAIL_REASON,
    outputs_root,
)
from steering.extract import Extraction, contrastive_pairs, extract_caa
from steering.methods import tunable
from steering.scale import RELATIVE_SCALE_METRIC, SCALE_METRIC

ATTR_RELATIVE_SCALE = "relative_scale"  # a trial's steering scale as a fraction of the residual norm
EXTRACTION_CACHE_VERSION = 2  # 2: with the residual norms a relative scale needs


class NonFiniteObjective(ValueError):
    """A trial's objective was NaN or infinite; the trial fails (never counts as 0)."""


def extraction_key(cfg: Config) -> str:
    """What decides a cached all-layer extraction: the model, the data and extract sections, the
    extraction dtype and (for a local file) the data's sha256; 16 hex digits.

    Args:
        cfg: the run's config.
    """
    full = config_to_dict(cfg)
    fields = {"version": EXTRACTION_CACHE_VERSION, "model": full["model"], "data": full["data"],
              "extract": full["extract"], "dtype": cfg.extract_dtype,
              "data_sha256": source_sha256(cfg.data.source) or ""}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def extraction_cache_dir(cfg: Config) -> Path:
    """``$TRUTHSTEER_OUTPUTS/tune/extractions/<model>-<extraction key>/``, an artifact root that
    ``extract.load_extraction`` reads.

    Args:
        cfg: the run's config.
    """
    return outputs_root() / "tune" / "extractions" / f"{cfg.model.alias}-{extraction_key(cfg)}"


def save_extraction(extraction: Extraction, root: Path) -> None:
    """Write ``extraction`` as the extract stage lays it out (``CAA_TENSORS``, ``CAA_META``) under
    ``root``, atomically: a reader sees the whole folder or none.

    Args:
        extraction: what ``extract_caa`` returned.
        root: the folder to write (replaced if present).
    """
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vectors = extraction.steering_vectors()
    meta = {**vectors.to_meta(), "question_ids": list(extraction.question_ids),
            "n_examples": extraction.n_examples, "n_valid_by_layer": extraction.n_valid.tolist(),
            **norm_meta(extraction)}
    tensors = {"vectors": extraction.vectors, "diffs": extraction.diffs,  # (n_layers, d_model), (n, n_layers, d_model)
               "valid": extraction.valid.to(torch.uint8)}  # (n_examples, n_layers)
    if extraction.resid_norms is not None:
        tensors["resid_norms"] = extraction.resid_norms  # (n_examples, n_layers)
    artifacts.save_tensors(tmp / artifacts.CAA_TENSORS, tmp / artifacts.CAA_META, tensors, meta)
    shutil.rmtree(root, ignore_errors=True)  # a torn folder from a killed writer
    os.replace(tmp, root)


def shared_extraction(
    cfg: Config,
    pool: Sequence[Question],
    loaded: LoadedModel,
    *,
    extract_run: str = "",
) -> tuple[Extraction, str]:
    """The all-layer extraction every trial steers with, and where it came from.

    From ``extract_run`` when given; else from the cache folder (``extraction_cache_dir``), computed
    there from the pool split when missing. Workers on one machine compute it once: the first takes
    a file lock and the others wait for it, then read.

    Args:
        cfg: the run's config (model, data, extract sections).
        pool: the pool split's questions, for the contrastive pairs.
        loaded: the model, used for the extraction when its dtype is ``cfg.extract_dtype``.
        extract_run: an extract stage run id.

    Returns:
        The extraction and its source: ``run:<id>``, ``cache`` (read) or ``computed`` (written now).
    """
    if extract_run:
        extraction = load_extraction(extract_run)
        if extraction.model != cfg.model.alias:
            raise ConfigError(f"extract run {extract_run} holds the extraction of {extraction.model!r}, not "
                              f"{cfg.model.alias!r}; pass an extract run of {cfg.model.alias}")
        return extraction, f"run:{extract_run}"
    root = extraction_cache_dir(cfg)
    with file_lock(root.with_name(f"{root.name}.lock")):
        if (root / artifacts.CAA_TENSORS).exists():
            return load_extraction(root), "cache"
        pairs = contrastive_pairs(pool, cfg.extract.pairs_per_question, cfg.data.seed)
        same_dtype = loaded.dtype == TORCH_DTYPES[cfg.extract_dtype]
        extractor = loaded if same_dtype else load_from_config(cfg, dtype=cfg.extract_dtype)
        extraction = extract_caa(extractor, pairs, batch_size=cfg.extract.batch_size,
                                 max_length=cfg.extract.max_length, nan_threshold=cfg.extract.nan_threshold)
        extraction = dataclasses.replace(extraction, provenance={
            "stage": "tune", "extraction_key": extraction_key(cfg), "dtype": cfg.extract_dtype,
            "code_version": tracking.code_version()})
        save_extraction(extraction, root)
        return extraction, "computed"


@dataclasses.dataclass(frozen=True, eq=False)
class TrialScorer:
    """Scores a setting (a trial's params) on questions, with the model and judge loaded once.

    Args:
        cfg: the run's config (eval batch size and decoding, extract max_length, steering positions).
        objective: what is scored.
        loaded: the main model.
        vectors: the method's shared source: ``(n_layers, d_model)`` CAA vectors (``caa``), the ranked heads,
            an ``ItiDirections`` (``iti``).
        source: where the vectors came from (enters the steering's identity).
        judge: the judge of a generating objective (``make_judge(objective.judge, cfg)``); None for ``mc``.
        method: the tunable method: ``caa`` (params ``layer``, ``scale``) or ``iti`` (params ``k``, ``alpha``).
        passages: the neutral texts a trial's cost of steering is measured on (``costs``); empty for none.
    """

    cfg: Config
    objective: Objective
    loaded: LoadedModel
    vectors: Any
    source: str
    judge: Any = None
    method: str = "caa"
    passages: tuple[str, ...] = ()

    def costs(self, params: Mapping[str, float]) -> dict[str, float]:
        """What the setting costs on the neutral passages (``evaluation.side_effects``): ``kl_neutral`` and
        ``ce_neutral_delta``, means over passages as ``evaluate`` logs them."""
        from evaluation.side_effects import neutral_effects

        rows = neutral_effects(self.loaded, {"trial": self.steering(params)}, self.passages,
                               batch_size=self.cfg.effects.batch_size, max_tokens=self.cfg.effects.max_tokens)["trial"]
        return {"kl_neutral": math.fsum(r["kl"] for r in rows) / len(rows),
                "ce_neutral_delta": math.fsum(r["ce_steered"] - r["ce_unsteered"] for r in rows) / len(rows)}

    def steering(self, params: Mapping[str, float]) -> Any:
        """The method's intervention for ``params`` (``Tunable.steer``): CAA's ``vectors[layer] * scale``,
        ITI's best ``k`` heads shifted by ``alpha``; from each row's last prompt token (or as configured).

        Args:
            params: the trial's params.
        """
        tune = tunable(self.method).tune
        assert tune is not None  # tunable() made sure
        return tune.steer(self.cfg, self.vectors, self.source, params)

    def score(self, questions: Sequence[Question], params: Mapping[str, float],
              batch_index: int = 0) -> list[dict[str, Any]]:
        """One judge row per question (the objective metric among its fields).

        Args:
            questions: the questions to score.
            params: the trial's params (``layer``/``scale`` or ``k``/``alpha``).
            batch_index: the chunk's index, which seeds sampling when ``eval.do_sample``.
        """
        from evaluation.judges import JudgeItem

        steering = self.steering(params)
        if not self.objective.generates:
            from evaluation.linear import onednn_linears
            from evaluation.mc import MCJudge

            judge = MCJudge.from_config(self.cfg).bind(self.loaded, steering)
            with onednn_linears(self.loaded.model, self.loaded.device):  # as evaluate scores it
                return judge.score([JudgeItem.from_question(q, "") for q in questions])
        from evaluation.generate import generate_batch

        answers = generate_batch(self.loaded, [q.question for q in questions], steering,
                                 self.cfg.eval, batch_index=batch_index)
        return self.judge.score([JudgeItem.from_question(q, a.text) for q, a in zip(questions, answers, strict=True)])


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _finite_or_fail(trial: Trial, values: Sequence[float], order: Sequence[int], questions: Sequence[Question],
                    metric: str, params: Mapping[str, float]) -> None:
    bad = [questions[i].id for i, v in zip(order, values, strict=True) if not math.isfinite(v)]
    if bad:
        where, scale = ", ".join(f"{name} {value:g}" for name, value in params.items()), list(params)[-1]
        reason = (f"{metric} is not finite for {len(bad)} of {len(values)} questions (first: {bad[0]}) at {where}: "
                  f"the steered activations overflowed; lower the {scale} range or use a wider dtype "
                  "(float32/bfloat16)")
        trial.set_user_attr(ATTR_FAIL_REASON, reason)
        raise NonFiniteObjective(reason)


def make_objective(
    scorer: TrialScorer,
    space: SearchSpace,
    questions: Sequence[Question],
    *,
    pruner: str,
    seed: int,
    study_name: str,
    stop: StopRequest | None = None,
    cost: str = "",
    constraint: Constraint | None = None,
    two_objectives: bool = False,
) -> Callable[[Trial], float | tuple[float, float]]:
    """The Optuna objective: suggest every axis of ``space`` (layer and scale, or k and alpha), score every
    question, return the mean (and, for two objectives, the ``cost``).

    With a ``cost`` (``kl_neutral``, ``ce_neutral_delta``) the scored trial also measures what its steering
    costs on neutral text (``TrialScorer.costs``; user attrs and metrics of the trial), and with a
    ``constraint`` records its violation (``ATTR_CONSTRAINTS``) for the sampler and the summary.

    With a pruner, questions are scored in chunks of ``PRUNING_CHUNK`` in an order shuffled per
    trial (``WilcoxonPruner``'s advice); each question's value is reported at the step of its index
    in ``questions`` (``median``: the running mean at the step of the count so far), and the trial
    is pruned when the pruner says so. Runs inside the trial's MLflow run (``track_in_mlflow``).

    Args:
        scorer: the model, vectors and judge.
        space: the search space.
        questions: the val split.
        pruner: ``wilcoxon``, ``median`` or ``none``.
        seed: seeds the per-trial question order.
        study_name: tagged on the trial's run.
        stop: checked before the first and between chunks (a stopped trial is re-queued by ``guarded``).
        cost: the cost each trial measures; "" for none.
        constraint: the bound on a cost that makes a trial feasible; None for none.
        two_objectives: return ``(value, cost)`` for a two-objective study.
    """
    metric = scorer.objective.metric
    stop = stop or StopRequest()

    def objective(trial: Trial) -> float | tuple[float, float]:
        tick = time.perf_counter()
        mlflow.set_tags({artifacts.TAG_STAGE: TRIAL_STAGE, artifacts.TAG_MODEL: scorer.cfg.model.alias,
                         artifacts.TAG_HOST: socket.gethostname(), artifacts.TAG_PID: str(os.getpid()),
                         TAG_STUDY: study_name, artifacts.TAG_VARIANT: scorer.method})
        params = {name: axis.suggest(trial) for name, axis in space.axes.items()}
        steering = scorer.steering(params)
        relative = getattr(steering, "relative_scale", None)
        if relative is not None:  # the trial in units that transfer to another model (warm starts read it)
            trial.set_user_attr(ATTR_RELATIVE_SCALE, relative)
            mlflow.log_metric(RELATIVE_SCALE_METRIC, relative)
        if getattr(steering, "layer", None) is not None:  # the multiplier it steered with, whatever the param's unit
            mlflow.log_metric(SCALE_METRIC, float(steering.scale))
        order = list(range(len(questions)))
        if pruner != "none":
            random.Random(f"{seed}/{trial.number}").shuffle(order)
        size = PRUNING_CHUNK if pruner != "none" else scorer.cfg.eval.batch_size
        rows: list[dict[str, Any]] = []
        values: list[float] = []
        for index, chunk in enumerate(_chunks(order, size)):
            stop.check()
            chunk_rows = scorer.score([questions[i] for i in chunk], params, batch_index=index)
            chunk_values = [float(r[metric]) for r in chunk_rows]
            _finite_or_fail(trial, chunk_values, chunk, questions, metric, params)
            rows += chunk_rows
            values += chunk_values
            if pruner == "none":
                continue
            for i, value in zip(chunk, chunk_values, strict=True):
                if pruner == "wilcoxon":
                    trial.report(value, step=i)
            if pruner == "median":
                trial.report(math.fsum(values) / len(values), step=len(values))
            if len(values) < len(questions) and trial.should_prune():
                partial = math.fsum(values) / len(values)
                trial.set_user_attr("n_evaluated", len(values))
                trial.set_user_attr("partial_mean", partial)
                mlflow.log_metrics({f"{metric}_partial": partial, "n_questions": float(len(values))})
                raise optuna.TrialPruned(f"{metric} {partial:.4f} over {len(values)} of {len(questions)} questions "
                                         f"is worse than the best trial's ({pruner} pruner)")
        value = math.fsum(values) / len(values)
        _, low, high = bootstrap_ci(values, scorer.cfg.eval.n_bootstrap, scorer.cfg.eval.confidence, scorer.cfg.eval.seed)
        metrics = {metric: value, f"{metric}_ci_low": low, f"{metric}_ci_high": high, "n_questions": float(len(values)),
                   "trial_seconds": time.perf_counter() - tick}
        if "mc1" in rows[0] and metric != "mc1":
            metrics["mc1"] = math.fsum(float(r["mc1"]) for r in rows) / len(rows)
        costs = scorer.costs(params) if cost else {}
        for name, spent in costs.items():
            trial.set_user_attr(name, spent)
        if constraint is not None:
            trial.set_user_attr(ATTR_CONSTRAINTS, [constraint.violation(costs[constraint.metric])])
        mlflow.log_metrics({**metrics, **costs})
        return (value, costs[cost]) if two_objectives else value

    return objective


class WorkerStopped(KeyboardInterrupt):
    """A SIGINT/SIGTERM asked the worker to stop; raised only at a safe point between two chunks."""


class StopRequest:
    """Graceful stops: the first SIGINT or SIGTERM only sets ``signum``; the running trial stops at
    its next chunk boundary (``check``) and is re-queued, and no trial starts after it. A second
    signal raises ``KeyboardInterrupt`` at once, as without this handler.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.signum = signum
        print(f"signal {signum}: stopping after the running chunk; the running trial is re-queued "
              "(signal again to stop at once)", flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGINT and SIGTERM inside the block (in the main thread; elsewhere, nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def check(self) -> None:
        """Raise ``WorkerStopped`` when a signal came."""
        if self.signum is not None:
            raise WorkerStopped(f"signal {self.signum}")


__all__ = ['EXTRACTION_CACHE_VERSION', 'NonFiniteObjective', 'StopRequest', 'TrialScorer', 'WorkerStopped', 'extraction_cache_dir', 'extraction_key', 'make_objective', 'save_extraction', 'shared_extraction']
