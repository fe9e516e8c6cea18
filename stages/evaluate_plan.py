"""The ``evaluate`` stage's dry run: what it would generate and judge, from the config and the generation store
alone (no weights load, nothing is logged)."""

from __future__ import annotations

from pathlib import Path

from core.config import Config
from core.models import describe_source
from evaluation.generation_store import GenerationStore, default_store_path
from evaluation.judge_loading import LLM_JUDGES
from stages.source_runs import SourceRuns


def plan(cfg: Config, sources: SourceRuns, store_path: str | Path | None = None) -> list[str]:
    """What ``run`` would do, for a dry run: no weights load, nothing is logged.

    Args:
        cfg: the resolved config.
        sources: the source runs (checked against the variants).
        store_path: the generation store; the config's default place when None.
    """
    from stages.evaluate import ordered_variants, variant_key  # the stage's own rules, not copies

    variants = ordered_variants(cfg.eval.variants)
    sources.check(variants)
    decoding = cfg.eval
    path = Path(store_path) if store_path else default_store_path(cfg.model, cfg.model.dtype, decoding)
    store = GenerationStore(path) if path.exists() else None
    n_questions = cfg.data.sizes[cfg.eval.split]
    lines = [
        f"model: {cfg.model.alias} from {describe_source(cfg.model, cfg.runtime.cache_dir)}, dtype {cfg.model.dtype}",
        f"questions: split {cfg.eval.split}"
        + (f" of data run {sources.data_run}" if sources.data_run else f" ({n_questions} questions)"),
        f"steering: layer {cfg.layer}, scale {cfg.steering.scale} ({cfg.steering.scale_mode}), "
        f"positions {cfg.steering.positions}",
        f"decoding: {decoding}",
        f"generation store: {path}",
    ]
    for variant in variants:
        key = variant_key(cfg, variant, sources)
        stored = sum(1 for r in (store.records() if store else []) if r["variant"] == variant
                     and r["variant_hash"] == key)
        source = sources.for_variant(variant)
        lines.append(f"variant {variant}: hash {key}{f', source run {source}' if source else ''}; "
                     f"{stored} answers stored")
    needs_llm = [j for j in cfg.eval.judges if j in LLM_JUDGES]
    lines.append(f"judges: {', '.join(cfg.eval.judges)}"
                 + (f"; judge model {cfg.judge.model} on {cfg.runtime.judge_device}" if needs_llm else "")
                 + (f"; trained judge {cfg.judge.trained or 'NOT SET (judge.trained)'}" if "judge" in cfg.eval.judges
                    else ""))
    return lines


__all__ = ['plan']
