"""The team's layout rules for megatron_coord/: no module over 500 lines, no import circles.

Both are read from the source with ``ast`` (nothing is imported or run), so the checks are fast.
Every import statement counts, wherever it is: at module level, inside a function, or under
``if TYPE_CHECKING:`` (a circle there is still a circle in the design). What does not count is the
implicit import of a package's ``__init__`` when one of its submodules is imported: were it an
edge, every ``__init__`` that re-exports a name from its own submodule would close a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "megatron_coord"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 500


# ---- the checker --------------------------------------------------------------------------------


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file for every .py under ``package_dir`` (``__init__`` names its
    package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def oversized_modules(package_dir: Path, max_lines: int = MAX_LINES) -> dict[str, int]:
    """File (relative to the package's parent) -> line count, for each over ``max_lines``."""
    counts = {}
    for path in module_files(package_dir).values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > max_lines:
            counts[str(path.relative_to(package_dir.parent))] = lines
    return counts


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from X import ...`` reads from, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: max(len(parts) - (node.level - 1), 0)]  # past the top: nothing
    if node.module:
        parts.append(node.module)
    return ".".join(parts)


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module``'s import statements name explicitly.

    ``from pkg import name`` imports ``pkg.name`` when that is a module, else ``pkg``.
    """
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    targets.add(submodule)
                elif base in modules:
                    targets.add(base)
    targets.discard(module)
    return targets


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports explicitly."""
    modules = module_files(package_dir)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None; depth-first, in sorted order, so the
    answer is the same on every run."""
    on_path: dict[str, int] = {}  # node -> its index in path
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path = [root]
        on_path[root] = 0
        pending = [iter(sorted(graph[root]))]
        while pending:
            child = next(pending[-1], None)
            if child is None:
                node = path.pop()
                del on_path[node]
                done.add(node)
                pending.pop()
            elif child in on_path:
                return path[on_path[child] :] + [child]
            elif child not in done:
                on_path[child] = len(path)
                path.append(child)
                pending.append(iter(sorted(graph.get(child, ()))))
    return None


# ---- the rules, on megatron_coord ---------------------------------------------------------------


def test_no_module_is_over_500_lines() -> None:
    offenders = oversized_modules(PACKAGE_DIR)
    listing = "\n".join(f"  {path}: {n} lines" for path, n in sorted(offenders.items()))
    assert not offenders, f"modules over {MAX_LINES} lines:\n{listing}"


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_the_real_package() -> None:
    graph = import_graph(PACKAGE_DIR)
    assert "megatron_coord" in graph and "megatron_coord.models" in graph
    assert "megatron_coord.models.config" in graph["megatron_coord.models.checkpoint"]


# ---- the checker, on small trees ----------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (path relative to root -> text) and return the package dir ``root/pkg``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_a_cycle_through_a_type_checking_import_is_found(tmp_path: Path) -> None:
    pkg = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .b import B\n",
            "pkg/b.py": "from .a import A\n",
        },
    )
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.a"]


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    pkg = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "",
            "pkg/sub/a.py": "def f():\n    from ..c import g\n",
            "pkg/c.py": "import pkg.sub.a\n",
        },
    )
    assert find_cycle(import_graph(pkg)) == ["pkg.c", "pkg.sub.a", "pkg.c"]


def test_an_implicit_parent_import_is_not_a_cycle(tmp_path: Path) -> None:
    # pkg/__init__ re-exports from its submodules, and those import each other and their
    # siblings' packages' submodules: Python runs pkg/__init__ first, but no statement names it.
    pkg = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import A\nfrom .sub.b import B\n",
            "pkg/a.py": "from .sub.b import B\nA = B\n",
            "pkg/sub/__init__.py": "from .b import B\n",
            "pkg/sub/b.py": "import pkg.c\nB = 1\n",
            "pkg/c.py": "",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) is None


def test_from_imports_resolve_to_a_submodule_or_its_package(tmp_path: Path) -> None:
    pkg = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "X = 1\n",
            "pkg/a.py": "from . import b, X\nfrom pkg.sub import y\nfrom .sub.c import z\n",
            "pkg/b.py": "",
            "pkg/sub/__init__.py": "y = 2\n",
            "pkg/sub/c.py": "from ... import os\nfrom .. import b\nz = 3\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg", "pkg.b", "pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.b"}  # "from ... import" leaves the package: not ours


def test_a_package_importing_its_submodule_back_is_a_cycle(tmp_path: Path) -> None:
    pkg = _tree(
        tmp_path,
        {"pkg/__init__.py": "from .a import A\n", "pkg/a.py": "from pkg import helper\nA = 1\n"},
    )
    assert find_cycle(import_graph(pkg)) == ["pkg", "pkg.a", "pkg"]


def test_oversized_modules_names_each_offender_and_its_count(tmp_path: Path) -> None:
    pkg = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/ok.py": "x = 1\n" * MAX_LINES,
            "pkg/big.py": "x = 1\n" * (MAX_LINES + 1),
            "pkg/sub/huge.py": "x = 1\n" * 900,
        },
    )
    assert oversized_modules(pkg) == {
        str(Path("pkg/big.py")): MAX_LINES + 1,
        str(Path("pkg/sub/huge.py")): 900,
    }
