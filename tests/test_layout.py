"""The package's shape: the core reads alone (it never imports the face), stays within its line budget, and no
file outgrows one sitting."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "jina_v4"
# the face: around the core, importing it (never imported by it)
FACE = {"cli", "jobs", "serve", "serve_formats", "ray_data", "training", "saving", "__main__"}
CORE_BUDGET, FILE_BUDGET, MODEL_BUDGET = 2000, 300, 250


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def imported(path: Path) -> set[str]:
    """The package modules `path` imports, at any depth of the file (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "jina_v4":
                parts = node.module.split(".")
                names |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jina_v4.")}
    return names & set(modules())


def test_core_never_imports_the_face():
    core = {name: path for name, path in modules().items() if name not in FACE}
    for name, path in core.items():
        assert not imported(path) & FACE, f"core module {name}.py imports {sorted(imported(path) & FACE)}"


def test_line_budgets():
    sizes = {name: lines(path) for name, path in modules().items()}
    core = sum(n for name, n in sizes.items() if name not in FACE)
    assert core <= CORE_BUDGET, f"the core is {core} lines"
    assert sizes["model"] <= MODEL_BUDGET, f"model.py is {sizes['model']} lines"
    for name, n in sizes.items():
        assert n <= FILE_BUDGET, f"{name}.py is {n} lines"


def test_the_checker_sees_imports():
    """The import scan itself: a face import inside a function of a core-looking file is found."""
    sample = PACKAGE.parent / "tests" / "_layout_sample.py"
    sample.write_text("def f():\n    from .cli import main\n    from jina_v4.jobs import Job\n"
                      "    import jina_v4.serve\n")
    try:
        assert imported(sample) >= {"cli", "jobs"}
    finally:
        sample.unlink()
