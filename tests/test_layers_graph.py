"""The import graph points down: entrypoints -> stages -> the libraries (steering, evaluation, analysis) -> core.

Parsed from the source (``ast``), imports inside functions included, so that an import hidden in a
function body cannot reverse an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what each package may import besides itself
ALLOWED = {
    "core": set(),
    "steering": {"core"},
    "evaluation": {"core", "steering"},
    "analysis": {"core", "steering", "evaluation"},
    "stages": {"core", "steering", "evaluation", "analysis"},
    "entrypoints": {"core", "steering", "evaluation", "analysis", "stages"},
}


def project_imports(path: Path) -> set[str]:
    """The project packages ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found |= {n.split(".")[0] for n in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package: str) -> None:
    wrong = {f"{p.relative_to(ROOT)} -> {target}"
             for p in sorted((ROOT / package).glob("**/*.py"))
             for target in project_imports(p) - ALLOWED[package] - {package}}
    assert not wrong, f"imports against the layers: {sorted(wrong)}"


def test_the_parser_sees_an_import_hidden_in_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from stages import tune\n    import evaluation.judges\n")
    assert project_imports(module) == {"stages", "evaluation"}


def test_the_registry_is_the_variant_list() -> None:
    from core.config import VARIANTS
    from core.config_io import load_config
    from stages.pipeline import STAGES, UPSTREAM, stages_of
    from steering.methods import methods

    assert tuple(methods()) == VARIANTS
    for m in methods().values():
        assert m.stage == "" or (m.stage in STAGES and m.stage in UPSTREAM), m.name
    only_caa = stages_of(load_config("smollm2-135m", "eval.variants=[baseline,caa],judge.trained=x"))
    assert only_caa == ("data", "extract", "evaluate")
    assert "bank" in stages_of(load_config("smollm2-135m", "eval.variants=[mlp_gen],judge.trained=x"))
