"""Redraw README's figures (``docs/figures/``) from the recorded runs that ``docs/figures/figures.yaml`` names, and
write ``docs/figures/SOURCES.md``: for each figure the runs it was drawn from, their code version (the tag
``truthsteer.code_version``) and the commit and package versions that drew it.

    make figures                                   # the store of `make run`: sqlite:///mlflow.db
    python -m analysis.docs_figures --store sqlite:////path/to/mlflow.db
    python -m analysis.docs_figures --store sqlite:////path/to/mlflow.db --only smoke_sweep_scale.png

``--only`` redraws the named files alone (their runs may live in another store than the rest's) and replaces their
rows of ``SOURCES.md``, noting the commit and versions that drew them, and keeps the other rows.

Each figure is drawn by ``analyze`` over its runs and all their descendants (a ``full`` or ``tune`` run brings its
stages and trials), exactly as ``mlflow run . -e analyze -P parent_run=<run>`` would, but without logging an
``analyze`` run. A run that is not in the store is an error that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

PROJECT_DIR = Path(__file__).resolve().parents[1]
PLAN = PROJECT_DIR / "docs" / "figures" / "figures.yaml"
PACKAGES = ("mlflow", "matplotlib", "transformers", "torch")


class PlanError(ValueError):
    """A figures plan that cannot be followed (a bad entry, a run not in the store)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file of ``docs/figures/``: which ``analyze`` figure, from which runs (and their descendants)."""

    file: str
    figure: str
    runs: tuple[str, ...]
    what: str = ""


def read_plan(path: Path) -> list[Entry]:
    """The entries of a figures plan (YAML: ``figures: [{file, figure, runs, what}]``)."""
    from analysis.frames import ABLATION_FIGURES, FIGURES

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    stems = {spec.stem for spec in (*FIGURES, *ABLATION_FIGURES)}
    entries = []
    for item in data.get("figures", []):
        entry = Entry(str(item.get("file", "")), str(item.get("figure", "")), tuple(map(str, item.get("runs", []))),
                      str(item.get("what", "")))
        if not entry.file.endswith(".png") or entry.figure not in stems or not entry.runs:
            raise PlanError(f"{path}: entry {item!r} needs file (*.png), figure (one of {', '.join(sorted(stems))}) "
                            "and runs (run ids)")
        entries.append(entry)
    return entries


def _runs(run_ids: tuple[str, ...]) -> pd.DataFrame:
    import mlflow

    from analysis.runs import Selection, select_runs

    frames = []
    for run_id in run_ids:
        try:
            mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise PlanError(f"run {run_id} is not in the store {mlflow.get_tracking_uri()}: pass the store that holds "
                            "it with --store, or record new runs and name them in docs/figures/figures.yaml") from None
        frames.append(select_runs(Selection.parse("", parent_run=run_id)))
    return pd.concat(frames, ignore_index=True).drop_duplicates("run_id").reset_index(drop=True)


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    return f"{head}+dirty" if git("status", "--porcelain", "--untracked-files=no") else head


def _drawn_at() -> str:
    return f"commit `{_commit()}` with " + ", ".join(f"{p} {importlib.metadata.version(p)}" for p in PACKAGES)


def redraw_only(entries: list[Entry], out_dir: Path, sources: str) -> str:
    """Draw the entries alone into ``out_dir``; ``sources`` (the text of ``SOURCES.md``) with their rows replaced
    (or added) and a line saying what drew them."""
    rows = [line for line in redraw(entries, out_dir).splitlines() if line.startswith("| [")]  # one per entry
    lines = sources.splitlines()
    for entry, row in zip(entries, rows, strict=True):
        start = f"| [{entry.file}]({entry.file}) |"
        at = next((i for i, line in enumerate(lines) if line.startswith(start)), None)
        if at is None:
            at = max(i for i, line in enumerate(lines) if line.startswith("| ")) + 1
            lines.insert(at, row)
        else:
            lines[at] = row
        note = f"`{entry.file}` was redrawn alone"
        lines = [line for line in lines if not line.startswith(note)]
        if lines[-1].startswith("| "):  # a paragraph, not another row of the table
            lines.append("")
        lines.append(f"{note} (`--only`), at {_drawn_at()}.")
    return "\n".join(lines) + "\n"


def redraw(entries: list[Entry], out_dir: Path) -> str:
    """Draw every entry into ``out_dir``; the text of ``SOURCES.md``."""
    from analysis import report

    lines = ["# Where README's figures come from", "",
             "Redrawn by `make figures` (`python -m analysis.docs_figures`) from the runs of "
             "`docs/figures/figures.yaml`, each with all its descendants; "
             f"drawn at {_drawn_at()}.", "",
             "| file | figure | what | runs | their code version |", "| --- | --- | --- | --- | --- |"]
    for entry in entries:
        runs = _runs(entry.runs)
        with tempfile.TemporaryDirectory() as tmp:
            result = report.analyze(runs, tmp, title=f"runs {', '.join(entry.runs)}")
            if entry.figure not in result.drawn:
                why = "; ".join(result.missing["what"].astype(str).head(5))
                raise PlanError(f"{entry.file}: analyze did not draw {entry.figure} from runs {', '.join(entry.runs)}"
                                f" ({why})")
            shutil.copyfile(Path(tmp) / f"{entry.figure}.png", out_dir / entry.file)
        code = sorted(set(runs.get("tags.truthsteer.code_version", pd.Series(dtype=str)).dropna().astype(str)))
        lines.append(f"| [{entry.file}]({entry.file}) | `{entry.figure}` | {entry.what} | "
                     f"{', '.join(f'`{r}`' for r in entry.runs)} ({len(runs)} runs in all) | "
                     f"{', '.join(f'`{c}`' for c in code) or 'not recorded'} |")
        print(f"{entry.file}: {entry.figure} from {len(runs)} runs")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.docs_figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="", help="tracking store URI; default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--plan", type=Path, default=PLAN, help="the figures plan (YAML)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the figures go; default: the plan's folder")
    p.add_argument("--only", nargs="+", default=None, metavar="FILE",
                   help="redraw only these files of the plan; keep the other rows of SOURCES.md")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from analysis.runs import connect

    print(f"tracking store: {connect(args.store or None)}")
    try:
        entries = read_plan(args.plan)
        out = args.out_dir or args.plan.parent
        out.mkdir(parents=True, exist_ok=True)
        if args.only:
            unknown = sorted(set(args.only) - {e.file for e in entries})
            if unknown:
                raise PlanError(f"--only {' '.join(unknown)}: not in {args.plan}; its files are "
                                f"{', '.join(e.file for e in entries)}")
            sources = out / "SOURCES.md"
            text = redraw_only([e for e in entries if e.file in args.only], out,
                               sources.read_text(encoding="utf-8") if sources.exists() else redraw([], out))
            sources.write_text(text, encoding="utf-8")
        else:
            (out / "SOURCES.md").write_text(redraw(entries, out), encoding="utf-8")
    except (PlanError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
