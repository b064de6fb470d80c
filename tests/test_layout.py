"""The package's layout rules, read from the source: imports go one way (core <- integrations <-
measure <- cli), only the CLI parses arguments or prints, and ``import lynx_moe`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lynx_moe"
LAYERS = {"core": 0, "integrations": 1, "measure": 2, "cli": 3}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(text: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """``(imported lynx_moe module, line)`` for every import in a module's source, lazy ones included."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "lynx_moe"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "lynx_moe":
                # ``from . import x`` names a submodule when x is one
                names = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
                out += [(n, node.lineno) for n in names] or [(target, node.lineno)]
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
    source = _module(path)
    if source == "lynx_moe":
        return   # the face re-exports the HF names lazily, inside __getattr__ (checked below)
    imports = _imports(path.read_text(), source, path.name == "__init__.py")
    upward = [(target, line) for target, line in imports if _layer(target) > _layer(source)]
    assert not upward, f"{source} imports from a higher layer: {upward}"


@pytest.mark.parametrize("path", [p for p in SOURCES if _layer(_module(p)) < LAYERS["cli"]],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_cli_parses_arguments_or_prints(path):
    tree = ast.parse(path.read_text())
    argparse = [n.lineno for n in ast.walk(tree)
                if isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                or isinstance(n, ast.ImportFrom) and n.module == "argparse"]
    prints = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
              and n.func.id == "print"]
    assert not argparse and not prints, f"argparse at lines {argparse}, print at lines {prints}"


def test_the_face_imports_core_modules_only_at_import_time():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.level]
    assert top and all((n.module or "").split(".")[0] in ("policies", "routing", "presets", "costmodel", "") for n in top)


def test_import_lynx_moe_loads_no_framework():
    code = ("import sys, lynx_moe, lynx_moe.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'vllm', 'lm_eval', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_layout_check_sees_upward_imports():
    """The checker itself: lazy and relative imports of a higher layer are found."""
    text = "def f():\n    from ..cli import main\n    from .. import measure\n    import lynx_moe.cli.eval\n"
    found = [t for t, _ in _imports(text, "lynx_moe.integrations.probe")]
    assert found == ["lynx_moe.cli", "lynx_moe.measure", "lynx_moe.cli.eval"]
    assert [_layer(t) for t in found] == [3, 2, 3]
    assert _layer("lynx_moe.routing") == 0 and _layer("lynx_moe.measure.speed") == 2
