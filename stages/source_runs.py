"""The runs an evaluation reads from: a data run and each steering method's source run (``--sources``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from core.config import ConfigError
from steering.methods import check_variants, method, methods


@dataclasses.dataclass(frozen=True)
class SourceRuns:
    """The runs an evaluation reads from: a data run, and per stage that makes a method's source
    (``steering.methods``: ``extract`` for caa, ``train_mc``, ``train_gen``, ...) its run.

    Args:
        data_run: a data stage run whose splits to use ("" recomputes them from ``cfg.data``).
        stage_runs: stage name -> run id.
    """

    data_run: str = ""
    stage_runs: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, data_run: str, text: str) -> SourceRuns:
        """From ``--sources``: ``variant=RUN`` pairs separated by ``|`` (``caa=RUN|mlp_mc=RUN``)."""
        stage_runs = {}
        for pair in filter(None, (p.strip() for p in text.split("|"))):
            variant, sep, run_id = (x.strip() for x in pair.partition("="))
            if not sep or not run_id:
                raise ConfigError(f"--sources item {pair!r} is not variant=RUN; e.g. --sources 'caa=<extract run id>'")
            found = method(variant)
            if not found.stage:
                raise ConfigError(f"--sources names {variant!r}, which reads no run; drop it")
            stage_runs[found.stage] = run_id
        return cls(data_run, stage_runs)

    def for_variant(self, variant: str) -> str:
        """The source run of ``variant`` ("" for baseline)."""
        stage = method(variant).stage
        return str(self.stage_runs.get(stage, "")) if stage else ""

    def check(self, variants: Sequence[str]) -> None:
        """Fail, before anything loads, when a variant is unknown or lacks its source run."""
        check_variants(list(variants))
        missing = [v for v in variants if method(v).stage and not self.for_variant(v)]
        if missing:
            needs = "; ".join(f"{v} needs {method(v).needs}" for v in missing)
            raise ConfigError(f"variants {', '.join(missing)} have no source run: {needs}; pass them as --sources "
                              f"'{'|'.join(f'{v}=<run id>' for v in missing)}' or drop the variants, e.g. "
                              "--variants baseline")

    def params(self) -> dict[str, str]:
        """The non-empty run ids as params ``run.data`` and ``run.<stage>`` (the names ``full`` logs)."""
        named = {"run.data": self.data_run, **{f"run.{stage}": run for stage, run in self.stage_runs.items()}}
        return {k: v for k, v in sorted(named.items()) if v}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> SourceRuns:
        """Rebuild from the params of an evaluate run."""
        stages = {m.stage for m in methods().values() if m.stage}
        return cls(params.get("run.data", ""), {s: params[f"run.{s}"] for s in sorted(stages) if params.get(f"run.{s}")})


__all__ = ['SourceRuns']
