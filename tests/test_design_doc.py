"""docs/DESIGN.md matches the code: every path and dotted name it gives exists, and its layout tree lists
every module of spiel/ and spielbench/ and every file of baselines/, workflow/, scripts/ and config/, so
that the page cannot drift from the code unnoticed."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

DOC = REPO / "docs" / "DESIGN.md"
_ROOTS = ("spiel/", "spielbench/", "baselines/", "workflow/", "scripts/", "config/", "tests/", "docs/")


def _layout_block(text: str) -> str:
    """The first code block of section 1 (the layout tree)."""
    section = text.split("## 1. Layout", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def parse_tree(block: str) -> list[str]:
    """Repository paths of a layout tree: each line is an indented name column (names separated by ", ",
    each a path relative to the folder line above it; a folder ends in "/") then two spaces and a text."""
    paths, stack = [], []  # stack of (indent, folder path)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        names = re.split(r" {2,}", line.strip(), maxsplit=1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        for name in names.split(", "):
            paths.append(parent + name)
        if names.endswith("/") and ", " not in names:
            stack.append((indent, parent + names))
    return paths


def _existing(pattern: str) -> list[Path]:
    return sorted(REPO.glob(pattern)) if "*" in pattern else ([REPO / pattern] if (REPO / pattern).exists() else [])


def test_parse_tree_reads_nesting_and_lists():
    block = "a/            x\n  b.py        y\n  c/          z\n    d.py, e/f.py  w\ng.py          v\n"
    assert parse_tree(block) == ["a/", "a/b.py", "a/c/", "a/c/d.py", "a/c/e/f.py", "g.py"]


def test_every_path_in_the_layout_exists():
    paths = parse_tree(_layout_block(DOC.read_text(encoding="utf-8")))
    assert len(paths) > 100
    missing = [p for p in paths if not _existing(p)]
    assert not missing, f"docs/DESIGN.md's layout names paths that do not exist: {missing}"


def test_every_module_and_file_is_in_the_layout():
    listed = set()
    for p in parse_tree(_layout_block(DOC.read_text(encoding="utf-8"))):
        listed.update(str(q.relative_to(REPO)) for q in _existing(p))
    wanted = [p for root in ("spiel", "spielbench") for p in (REPO / root).rglob("*.py")]
    wanted += [p for root in ("baselines", "workflow", "scripts", "config") for p in (REPO / root).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")]
    unlisted = []
    for p in wanted:
        rel = str(p.relative_to(REPO))
        if rel in listed:
            continue
        # a package's __init__/__main__ is covered when anything of its folder is listed (the folder is the package)
        if p.name in ("__init__.py", "__main__.py") and any(q.startswith(str(p.parent.relative_to(REPO)) + "/")
                                                             for q in listed):
            continue
        unlisted.append(rel)
    assert not unlisted, f"not in docs/DESIGN.md's layout: {sorted(unlisted)}"


def _names_something(path: str) -> bool:
    """A path (glob) that exists; ``file::test`` also needs the test function defined in the file."""
    file, _, test = path.partition("::")
    if not _existing(file):
        return False
    return not test or f"def {test}(" in (REPO / file).read_text(encoding="utf-8")


def test_every_backticked_path_exists():
    text = DOC.read_text(encoding="utf-8")
    named = {m.rstrip(".,:;") for m in re.findall(r"`([^`\s]+)`", text)}
    paths = sorted(n for n in named if n.startswith(_ROOTS) and "{" not in n and "<" not in n)
    assert "spielbench/fsio.py" in paths and "spiel/adapter_io.py" in paths  # the scan sees the paths
    missing = [p for p in paths if not _names_something(p)]
    assert not missing, f"docs/DESIGN.md names paths (or tests) that do not exist: {missing}"


def _module_file(parts: list[str]) -> Path | None:
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(tree: ast.Module) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    names[t.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def _class_member(cls: ast.ClassDef, name: str) -> bool:
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def _imported_member(node: ast.ImportFrom, cls_name: str, member: str) -> bool:
    src = _module_file((node.module or "").split("."))
    if src is None:
        return False
    cls = _top_level_names(ast.parse(src.read_text(encoding="utf-8"))).get(cls_name)
    return isinstance(cls, ast.ClassDef) and _class_member(cls, member)


def test_every_dotted_name_resolves():
    """`spielbench.x.y` and `spiel.X.m` in backticks: the module exists and defines (or imports) the name, and a
    class's member exists; read from the source, nothing is imported."""
    text = DOC.read_text(encoding="utf-8")
    dotted = sorted({m for m in re.findall(r"`((?:spiel|spielbench|baselines)(?:\.\w+)+)(?:\(\))?`", text)})
    assert "spielbench.errors.exit_status" in dotted  # the scan sees the names
    unresolved = []
    for name in dotted:
        parts = name.split(".")
        n = len(parts)
        while n > 0 and _module_file(parts[:n]) is None:
            n -= 1
        rest = parts[n:]
        if n == 0:
            unresolved.append(name)
            continue
        if not rest:
            continue
        defined = _top_level_names(ast.parse(_module_file(parts[:n]).read_text(encoding="utf-8")))
        node = defined.get(rest[0])
        if node is None:
            unresolved.append(name)
        elif len(rest) > 1 and not (isinstance(node, ast.ClassDef) and _class_member(node, rest[1])):
            # a name imported into a package's __init__: look the member up where the class is defined
            if not isinstance(node, ast.ImportFrom) or not _imported_member(node, rest[0], rest[1]):
                unresolved.append(name)
    assert not unresolved, f"docs/DESIGN.md names what the code does not define: {unresolved}"

