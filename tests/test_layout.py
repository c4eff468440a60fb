"""The package's shape: the model (jina_v4/model) reads alone, never imports an application (jina_v4/apps) and
stays within its line budget; no module imports itself back through others, at any depth of a file."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "jina_v4"
MODEL_BUDGET = 2000  # lines of jina_v4/model, one statement per line (ruff's E701/E702 hold that)


def modules() -> dict[str, Path]:
    """'model.text', 'apps.cli', '__init__', ... -> file."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The package modules a module imports, at any depth of the file (function-level imports included)."""
    known, package = modules(), name.split(".")[:-1]

    def resolve(parts: list[str]) -> set[str]:  # a module, or a package's __init__
        return {n for n in (".".join(parts), ".".join(parts + ["__init__"])) if n in known}

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "jina_v4":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from .x import y`: y is a module of x, or a name defined in x
                found |= resolve(target + [alias.name]) or resolve(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jina_v4."):
                    found |= resolve(alias.name.split(".")[1:])
    return found - {name}


def graph() -> dict[str, set[str]]:
    return {name: imported(name, path) for name, path in modules().items()}


def test_the_model_never_imports_an_application():
    for name, targets in graph().items():
        if name.startswith("model."):
            apps = sorted(t for t in targets if t.startswith("apps."))
            assert not apps, f"jina_v4/{name.replace('.', '/')}.py imports {apps}"


def test_no_import_cycles():
    g = graph()
    done, path = set(), []

    def visit(n):
        if n in path:
            cycle = path[path.index(n) :] + [n]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if n in done:
            return
        path.append(n)
        for m in sorted(g.get(n, ())):
            if not m.endswith("__init__"):  # a package's __init__ re-exports; importing it is not a cycle of code
                visit(m)
        path.pop()
        done.add(n)

    for n in g:
        visit(n)


def test_model_line_budget():
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (PACKAGE / "model").glob("*.py"))
    assert lines < MODEL_BUDGET, f"jina_v4/model is {lines} lines"


def test_the_checker_sees_imports(tmp_path):
    """The import scan itself: relative, absolute and function-level imports of both kinds are found."""
    sample = PACKAGE / "model" / "_layout_sample.py"
    sample.write_text(
        "def f():\n    from ..apps.cli import main\n    from jina_v4.apps import jobs\n"
        "    import jina_v4.apps.serve\n    from .text import TextModel\n"
    )
    try:
        assert imported("model._layout_sample", sample) >= {"apps.cli", "apps.jobs", "apps.serve", "model.text"}
    finally:
        sample.unlink()


def test_loading_a_model_leaves_torch_dynamo_unimported(checkpoints):
    """A CLI run starts in about a second: neither `import jina_v4` nor building a model on the meta device pulls
    in torch._dynamo (the varlen kernel is imported on first use, and nn.init is skipped on meta tensors), which
    costs about a second more at every start. Checked by what is imported, not by a clock."""
    import subprocess
    import sys

    code = (
        "import sys; from jina_v4 import JinaV4; import jina_v4.apps.cli; "
        f"m = JinaV4.from_pretrained({str(checkpoints['gqa2-sharded'])!r}); "
        "m.encode_text(['a text'], task='retrieval'); "
        "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout[:400]
