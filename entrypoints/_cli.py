"""What every entry point shares: its arguments, the config they resolve to, and error handling.

Each ``entrypoints/<step>.py`` declares its own parameters with the helpers here, builds a frozen
Config and hands it to a library function. Known errors (bad config, bad data, a model that cannot
be reached) print one line and exit 2; anything else propagates with its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
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


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def main(fn: Callable[[], None]) -> None:
    """Run an entry point: SIGTERM ends runs as KILLED; known errors print one line and exit 2."""
    from core.models import ModelUnavailable

    known: tuple[type[BaseException], ...] = (ConfigError, ModelUnavailable)
    try:
        from core.data import DataError

        known += (DataError,)
    except ImportError:
        pass
    try:
        from evaluation.judges import JudgeError

        known += (JudgeError,)
    except ImportError:
        pass
    signal.signal(signal.SIGTERM, _raise_interrupt)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file read: noise
    try:
        fn()
    except known as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
