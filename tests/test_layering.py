"""The import table of DESIGN.md, checked on the source: `pipeline/` imports none of the other
three folders, `proto/` only `pipeline/`, `node/` and `coordinator/` `pipeline/` and `proto/` and
never each other; and `pipeline/` uses no third-party package beyond its list, so that a node
can run it with nothing else installed."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "proto", "node", "coordinator")
# The caravan folders each folder may import (DESIGN.md's "may import" column).
MAY_IMPORT = {
    "pipeline": set(),
    "proto": {"pipeline"},
    "node": {"pipeline", "proto"},
    "coordinator": {"pipeline", "proto"},
}
# pipeline/'s third-party packages: DESIGN's list, then the three it uses beyond it (llvmlite, the
# code generator numba is built on, for the SIMD kernels' IR; tqdm for download and
# quantization progress; llguidance for the sampler's grammar masks).
PIPELINE_THIRD_PARTY = {"numpy", "numba", "gguf", "tokenizers", "jinja2", "llvmlite", "tqdm", "llguidance"}


def imports(path: Path, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth, relative ones
    resolved against `package` (the dotted package the file belongs to)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [node.module] if node.module else [alias.name for alias in node.names]
                found += [(node.lineno, ".".join([*base, name])) for name in names]
            else:
                found.append((node.lineno, node.module))
    return found


def sources(folder: str):
    """(path, its import package) of every .py file under the folder."""
    for path in sorted((REPO / folder).rglob("*.py")):
        yield path, ("caravan", folder, *path.relative_to(REPO / folder).parent.parts)


def crossings(folder: str, may_import: set[str]) -> list[str]:
    bad = []
    for path, package in sources(folder):
        for line, name in imports(path, package):
            parts = name.split(".")
            if parts[0] == "caravan" and len(parts) > 1 and parts[1] != folder and parts[1] not in may_import:
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {name} ({folder}/ may import "
                           f"{', '.join(sorted(may_import)) or 'no other caravan folder'})")
    return bad


@pytest.mark.parametrize("folder", PACKAGES)
def test_no_import_crosses_the_design_table(folder):
    bad = crossings(folder, MAY_IMPORT[folder])
    assert not bad, "imports that cross DESIGN.md's table:\n" + "\n".join(bad)


def test_pipeline_uses_only_its_third_party_packages():
    allowed = PIPELINE_THIRD_PARTY | set(sys.stdlib_module_names) | {"caravan"}
    bad = [f"{path.relative_to(REPO)}:{line}: imports {name} (pipeline/ may use {', '.join(sorted(PIPELINE_THIRD_PARTY))} "
           "and the standard library)"
           for path, package in sources("pipeline") for line, name in imports(path, package)
           if name.split(".")[0] not in allowed]
    assert not bad, "third-party imports pipeline/ may not use:\n" + "\n".join(bad)


def test_relative_imports_resolve_to_their_folder(tmp_path):
    """The check sees `from .x import y` and `from .. import z` as the modules they are."""
    source = tmp_path / "m.py"
    source.write_text("from . import a\nfrom .b import c\nfrom .. import d\nimport e.f\n")
    assert imports(source, ("caravan", "node", "sub")) == [
        (1, "caravan.node.sub.a"), (2, "caravan.node.sub.b"), (3, "caravan.node.d"), (4, "e.f")]


def test_no_test_module_imports_another():
    """Shared fixtures and helpers live in tests/support/, so a test file stands on its own."""
    test_modules = {path.stem for path in (REPO / "tests").glob("test_*.py")}
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}" for name in names
                      if name.split(".")[0] in test_modules]
    assert not found, found
