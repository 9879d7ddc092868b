"""The layout shows the architecture: the README's table names the worker's sub-packages, and
imports flow one way (cli → ui → worker → schemas; inside the worker, jobs → views → ml →
store → io)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

LAYERS = ["jobs", "views", "ml", "store", "io"]  # each may import those after it


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("tuneq.")}


def test_the_readme_layout_table_lists_the_worker_packages() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Layout") :]
    listed = set(re.findall(r"^\| `worker/([a-z_]+)/` \| `tuneq\.worker\.\1` \|", table, re.M))
    packages = {p.parent.name for p in (REPO / "worker").glob("*/__init__.py")}
    assert listed == packages == set(LAYERS)
    assert sorted(p.name for p in (REPO / "worker").glob("*.py")) == ["__init__.py"]


def test_imports_flow_one_way() -> None:
    wrong = []
    for path in (REPO / "schemas").rglob("*.py"):
        wrong += [(path, m) for m in imported_modules(path) if not m.startswith("tuneq.schemas")]
    for path in (REPO / "ui").rglob("*.py"):
        wrong += [(path, m) for m in imported_modules(path) if m.startswith("tuneq.cli")]
    for path in (REPO / "worker").rglob("*.py"):
        wrong += [
            (path, m) for m in imported_modules(path) if m.startswith(("tuneq.cli", "tuneq.ui"))
        ]
        layer = path.relative_to(REPO / "worker").parts[0]
        if layer not in LAYERS:
            continue
        above = LAYERS[: LAYERS.index(layer)]
        wrong += [
            (path, m) for m in imported_modules(path) for up in above
            if m.startswith(f"tuneq.worker.{up}")
        ]  # fmt: skip
    assert wrong == []
