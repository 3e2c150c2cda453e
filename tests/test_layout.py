"""The package's layout holds: imports flow one way between the families, and Ray stays at the edges."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raygpt"
# What each family may import from raygpt, besides itself and the flat base.
MAY_IMPORT = {"base": set(), "data": set(), "training": {"data"}, "search": {"data", "training"},
              "bench": {"data", "training", "search"}}
RAY_AT_THE_EDGES = {"cluster.py", "training/ray_train.py", "search/tune.py", "search/analysis.py",
                    "search/optuna_search.py", "bench/tune.py"}


def family(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else "base"


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at the top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_family_has_its_folder():
    assert {p.name for p in PACKAGE.iterdir()
            if p.is_dir() and (p / "__init__.py").exists()} >= set(MAY_IMPORT) - {"base"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    own = family(path)
    if path.name in ("cli.py", "__main__.py") and own == "base":
        return  # the command dispatches to every family
    allowed = MAY_IMPORT[own] | {own}
    for name in imported_modules(path):
        parts = name.split(".")
        if parts[0] == "raygpt" and len(parts) > 1 and parts[1] in MAY_IMPORT and parts[1] != "base":
            assert parts[1] in allowed, f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_ray_is_imported_only_at_the_edges(path):
    rel = str(path.relative_to(PACKAGE))
    uses_ray = any(n == "ray" or n.startswith("ray.") for n in imported_modules(path))
    assert not uses_ray or rel in RAY_AT_THE_EDGES, f"{rel} imports Ray"


def test_no_file_of_the_package_is_ignored_by_git():
    # `data/` in .gitignore once hid raygpt/data/ from commits (and from `ray job submit`'s upload,
    # which honours .gitignore): generated folders are ignored at the top only.
    import shutil
    import subprocess

    if shutil.which("git") is None or not (PACKAGE.parent / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    out = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=PACKAGE.parent, capture_output=True,
                         text=True)
    assert out.stdout.split() == []
