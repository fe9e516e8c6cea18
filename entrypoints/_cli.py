"""What every entry point shares: its arguments, the config they resolve to, and error handling.

Each ``entrypoints/<step>.py`` declares an ``Entry``: its flags, the config overrides they stand for,
its dry-run plan and its run (a ``stages`` function), and exposes ``ENTRY.main``. Known errors (bad
config, bad data, a model that cannot be reached) print one line and exit 2; a write the disk or the
store refuses (full, read-only) prints one line and exits 1; anything else propagates with its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from core.config import Config, ConfigError
from core.config_io import config_yaml, load_config, preset_names, split_overrides


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")


def parser(step: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the step module's docstring."""
    return argparse.ArgumentParser(
        prog=f"python -m entrypoints.{step}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="model alias (configs/models/); default: base.yaml's model")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="",
                   help="TruthfulQA CSV/Parquet path or Hugging Face dataset id; default: data.source")
    p.add_argument("--split", default="", help="split preset: smoke or full; default: data.split")


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overrides", default="",
                   help='dotted config overrides, e.g. "steering.layer=12,eval.max_new_tokens=96"')
    p.add_argument("--preset", default="", help=f"named config preset: {', '.join(preset_names()) or 'none'}")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", type=_bool, nargs="?", const=True, default=False,
                   help="validate and print the plan; load no weights and log nothing")


def add_trained_judge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trained-judge", default="",
                   help="the trained judge (judge.trained): models:/truthsteer-judge/<version>, runs:/<id>/judge or a folder")


def trained_judge_override(args: argparse.Namespace) -> list[str]:
    return [f"judge.trained={args.trained_judge}"] if getattr(args, "trained_judge", "") else []


def run_arg(p: argparse.ArgumentParser, name: str, help_text: str) -> None:
    p.add_argument(f"--{name}", default="", help=help_text)


def build_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """Config from base.yaml, the model file, the preset, the shortcut flags and ``--overrides``."""
    shortcuts = []
    if getattr(args, "data", ""):
        shortcuts.append(f"data.source={args.data}")
    if getattr(args, "split", ""):
        shortcuts.append(f"data.split={args.split}")
    overrides = [*shortcuts, *extra]
    if args.overrides:
        overrides += split_overrides(args.overrides)
    return load_config(getattr(args, "model", "") or None, overrides, getattr(args, "preset", "") or None)


def print_plan(step: str, cfg: Config, lines: Sequence[str] = ()) -> None:
    print(f"dry run of {step}: config is valid; no weights loaded, nothing logged")
    for line in lines:
        print(f"  {line}")
    print("resolved config:")
    print(config_yaml(cfg))


Option = tuple[str, Any, Any, str]  # (flag without --, type, default, help)


def stage(name: str) -> Any:
    """The module ``stages.<name>``, imported when a run needs it (``--help`` imports no torch)."""
    import importlib

    return importlib.import_module(f"stages.{name}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """An entry point, declared: parse, build the config, check, then print the plan (``--dry-run``) or run
    the stage inside its MLflow run (``core.tracking.stage_run``).

    Args:
        stage: the entry point's name (``python -m entrypoints.<stage>``, the run's stage tag).
        doc: the module docstring (``--help``).
        plan: ``(cfg, args) -> lines`` of the dry run; loads no weights.
        run: ``(cfg, args) -> ...``: the stage, inside the active run.
        model: take ``--model``.
        data: take ``--data`` and ``--split``.
        runs: ``--<flag>`` MLflow run ids, flag -> help.
        options: further flags as (flag, type, default, help).
        sets: flag -> the config key its value overrides when given, e.g. ``{"judge": "judge.model"}``.
        trained_judge: take ``--trained-judge`` (``judge.trained``).
        run_name: ``(cfg, args) -> name``; None: ``<model>-<stage>``.
        tags: ``(cfg, args) -> tags`` of the run.
        check: ``(cfg, args) -> None``: fails before any run starts (also in a dry run).
    """

    stage: str
    doc: str | None
    plan: Callable[[Config, argparse.Namespace], Sequence[str]]
    run: Callable[[Config, argparse.Namespace], Any]
    model: bool = True
    data: bool = True
    runs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    options: Sequence[Option] = ()
    sets: Mapping[str, str] = dataclasses.field(default_factory=dict)
    trained_judge: bool = False
    run_name: Callable[[Config, argparse.Namespace], str | None] = lambda cfg, args: None
    tags: Callable[[Config, argparse.Namespace], Mapping[str, str] | None] = lambda cfg, args: None
    check: Callable[[Config, argparse.Namespace], None] = lambda cfg, args: None

    @classmethod
    def pool_stage(cls, stage_name: str, doc: str | None) -> Entry:
        """A stage that reads the data split's pool (``--data-run``): ``stages.<name>.plan`` and ``run``."""
        return cls(stage_name, doc, lambda cfg, args: stage(stage_name).plan(cfg, args.data_run),
                   lambda cfg, args: stage(stage_name).run(cfg, data_run=args.data_run),
                   runs={"data-run": "MLflow run id of a data stage whose splits to use"})

    def parser(self) -> argparse.ArgumentParser:
        p = parser(self.stage, self.doc)
        if self.model:
            add_model(p)
        if self.data:
            add_data(p)
        for name, help_text in self.runs.items():
            run_arg(p, name, help_text)
        for name, kind, default, help_text in self.options:
            p.add_argument(f"--{name}", type=kind, default=default, help=help_text)
        if self.trained_judge:
            add_trained_judge(p)
        add_config(p)
        return p

    def config(self, args: argparse.Namespace) -> Config:
        """The config of ``args``: the flags in ``sets`` and ``--trained-judge`` before ``--overrides``."""
        extra = [f"{key}={getattr(args, flag.replace('-', '_'))}" for flag, key in self.sets.items()
                 if getattr(args, flag.replace("-", "_"))]
        return build_config(args, [*extra, *trained_judge_override(args)])

    def main(self) -> None:
        from core.tracking import stage_run

        args = self.parser().parse_args()
        cfg = self.config(args)
        self.check(cfg, args)
        if self.data and not getattr(args, "data_run", ""):  # the data as the run reads it, dry or not
            from core.data import splits_for

            splits_for(cfg)
        if args.dry_run:
            print_plan(self.stage, cfg, self.plan(cfg, args))
            return
        with stage_run(self.stage, cfg, run_name=self.run_name(cfg, args), tags=self.tags(cfg, args)):
            self.run(cfg, args)


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def main(fn: Callable[[], None]) -> None:
    """Run an entry point: SIGTERM ends runs as KILLED; known errors print one line and exit 2, a refused write
    (full disk, read-only folder) one line and exit 1."""
    from core.models import ModelUnavailable

    known: tuple[type[BaseException], ...] = (ConfigError, ModelUnavailable)
    try:
        from core.data import DataError

        known += (DataError,)
    except ImportError:
        pass
    try:
        from evaluation.degenerate import DegenerateAnswers
        from evaluation.judges import JudgeError
        from evaluation.verdicts import InvalidRateExceeded

        known += (JudgeError, InvalidRateExceeded, DegenerateAnswers)
    except ImportError:
        pass
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # MLflow's database layer logs each failed session with its traceback, then raises it to its caller: the
    # caller's handling (one line for a refused write) is the report, so the logged copy is dropped.
    logging.getLogger("mlflow.store.db.utils").addFilter(lambda record: record.exc_info is None)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file read: noise
    try:
        fn()
    except known as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        from core.stores import write_refused

        refused = write_refused(err)
        if refused is None:
            raise
        print(f"error: a write was refused ({refused}): free disk space or make the store's and the outputs' "
              "folders writable, then run the same command again to resume (the run is marked FAILED where the "
              "store could still record it)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the run was ended KILLED; no traceback
        print(f"stopped ({err or 'interrupted'}): the run is marked KILLED; start the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
