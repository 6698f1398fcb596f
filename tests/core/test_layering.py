"""STYLE habit 1: the core and the kernels never import SGLang; imports only point downward."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[2] / "kvcomm_sglang"


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_and_kernels_never_import_sglang():
    files = list(PKG.glob("*.py")) + list((PKG / "kernels").glob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imported_modules(path) if m == "sglang" or m.startswith("sglang.")}
        assert not bad, f"{path.name} imports {bad}"


def test_core_does_not_import_upper_layers():
    upper = ("kvcomm_sglang.runtime_patch", "kvcomm_sglang.frontend")
    for path in list(PKG.glob("*.py")) + list((PKG / "kernels").glob("*.py")):
        bad = {m for m in imported_modules(path) if m.startswith(upper)}
        assert not bad, f"{path.name} imports {bad}"
    for path in PKG.glob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith("kvcomm_sglang.kernels")}
        assert not bad, f"core module {path.name} imports the kernels: {bad}"
