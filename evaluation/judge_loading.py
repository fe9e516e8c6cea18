"""Which judges a run uses and how they load: the judge LM once (the main model when it is the same), and a
trained judge refused before anything loads when it was trained on the questions to judge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.config import Config, ConfigError
from core.models import (
    LoadedModel,
    load_model,
    resolve_device,
)
from evaluation.judges import Judge, JudgeError, make_judge

LLM_JUDGES = ("llm", "llm_logprob")  # the judges that need the judge LM


def _same_device(a: Any, b: Any) -> bool:
    return bool(a.type == b.type and (a.index or 0) == (b.index or 0))


def check_trained_judge(cfg: Config, qids: Sequence[str], judges: Sequence[str] | None = None) -> None:
    """Before anything loads: with the ``judge`` judge, fail when ``judge.trained`` is unset or was
    trained on any of ``qids`` (a ConfigError naming the overlap).

    Args:
        cfg: the run's config (``eval.judges``, ``judge.trained``).
        qids: the ids of the questions to be judged.
        judges: the judge names of the run; None: ``eval.judges``.
    """
    if "judge" not in (cfg.eval.judges if judges is None else judges):
        return
    from evaluation.trained_judge import overlap_error, trained_question_ids

    if not cfg.judge.trained:
        raise ConfigError("eval.judges has 'judge' but judge.trained is empty; set it to models:/truthsteer-judge/"
                          "<version> (the tag truthsteer.judge_uri of a train_judge run) or drop the judge")
    try:
        message = overlap_error(trained_question_ids(cfg.judge.trained), qids)
    except JudgeError as err:
        raise ConfigError(str(err)) from None
    if message:
        raise ConfigError(f"judge.trained={cfg.judge.trained}: {message}")


def load_judge_model(cfg: Config, judges: Sequence[str], main: LoadedModel | None) -> LoadedModel | None:
    """The judge LM, loaded once, or None when no judge in ``judges`` needs it.

    The main model is reused when ``judge.model`` names it and ``runtime.judge_device`` resolves to
    the device it is on.

    Args:
        cfg: the run's config (``judge.model``, ``runtime.judge_device``, ``runtime.cache_dir``).
        judges: the judge names of the run.
        main: the main model, if loaded.
    """
    if not any(j in LLM_JUDGES for j in judges):
        return None
    device = resolve_device(cfg.runtime.judge_device, second=True)
    if main is not None and cfg.judge.model == main.spec.alias and _same_device(device, main.device):
        return main
    return load_model(cfg.judge.model, device=cfg.runtime.judge_device, cache_dir=cfg.runtime.cache_dir,
                      second_device=True)


def make_judges(cfg: Config, names: Sequence[str], judge_model: LoadedModel | None) -> list[Judge]:
    """One judge per name, built once for every variant.

    Args:
        cfg: the run's config.
        names: judge names (``eval.judges``).
        judge_model: the judge LM, for ``llm`` and ``llm_logprob``.
    """
    return [make_judge(name, cfg, judge_model=judge_model) for name in dict.fromkeys(names)]


__all__ = ['LLM_JUDGES', 'check_trained_judge', 'load_judge_model', 'make_judges']
