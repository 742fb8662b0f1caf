"""The house rules of docs/ARCHITECTURE.md, checked on the syntax tree so they cannot rot."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "scalesparse"
TREES = {str(p.relative_to(PKG)): ast.parse(p.read_text()) for p in sorted(PKG.rglob("*.py"))}


def imported_modules(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def users(prefix: str) -> set[str]:
    return {f for f, t in TREES.items() if any(m == prefix or m.startswith(prefix + ".") for m in imported_modules(t))}


def test_sources_found():
    assert len(TREES) > 10


@pytest.mark.parametrize(
    "module, owners",
    [("ray", {"launch.py"}), ("deepspeed", {"train/engine.py"}), ("torch.distributed", {"comm.py"})],
)
def test_one_module_owns_each_dependency(module, owners):
    assert users(module) <= owners


def test_no_unpickling_and_no_evaluation():
    bad = []
    for f, tree in TREES.items():
        if users("pickle") & {f}:
            bad.append(f"{f}: imports pickle")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func)
            if name in {"eval", "exec", "yaml.load", "yaml.unsafe_load", "yaml.full_load"}:
                bad.append(f"{f}:{node.lineno}: {name}()")
            for kw in node.keywords:
                if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                    bad.append(f"{f}:{node.lineno}: weights_only not True")
            if name == "torch.load" and not any(kw.arg == "weights_only" for kw in node.keywords):
                bad.append(f"{f}:{node.lineno}: torch.load without weights_only=True")
    assert bad == []
