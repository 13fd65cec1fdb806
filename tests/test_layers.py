"""The package's layers: every import in ``src/ats`` (module-level, inside functions, under TYPE_CHECKING) runs
downward or within its layer, and the imports between its modules form no cycle."""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ats"

#: Bottom to top; a module belongs to the first entry that is its name or a package above it.
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("algorithm", ("ats.sampling", "ats.packing", "ats.merging", "ats.evit", "ats.saint", "ats.flops",
                   "ats.profiling")),
    ("step", ("ats.method", "ats.stats", "ats.step")),
    ("methods", ("ats.methods", "ats.tubes")),
    ("data", ("ats.data",)),
    ("models", ("ats.models",)),
    ("adapters", ("ats.adapters",)),
    ("reference", ("ats.reference",)),
    ("api", ("ats", "ats.calibration", "ats.export")),
    ("commands", ("ats.commands", "ats.train", "ats.__main__")),
)
TOP_LEVEL_LIMIT = 16


def module_names(root: Path = PACKAGE) -> Dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its ``__init__``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def layer_of(module: str) -> int:
    for rank, (_, owners) in enumerate(LAYERS):
        if any(module == owner or module.startswith(owner + ".") for owner in owners if owner != "ats"):
            return rank
    if module == "ats":
        return next(rank for rank, (_, owners) in enumerate(LAYERS) if "ats" in owners)
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (tests/test_layers.py) or move it")


def imported_modules(module: str, path: Path, modules: Set[str]) -> List[Tuple[int, str]]:
    """(line, module of the package) for each import in ``path``; ``from X import name`` counts as X.name where
    that is a module of the package, else X."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                found.append((node.lineno, f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                              else source))
    return [(line, name) for line, name in found if name in modules]


def import_graph(root: Path = PACKAGE) -> Dict[str, List[Tuple[int, str]]]:
    names = module_names(root)
    return {module: imported_modules(module, path, set(names)) for module, path in names.items()}


def find_cycle(graph: Dict[str, List[Tuple[int, str]]]) -> List[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(module: str) -> List[str]:
        state[module] = 1
        stack.append(module)
        for _, target in graph[module]:
            if target == module:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return []

    for module in graph:
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def upward_imports(graph: Dict[str, List[Tuple[int, str]]]) -> List[str]:
    return [f"{module} (layer {LAYERS[layer_of(module)][0]}) imports {target} (layer {LAYERS[layer_of(target)][0]}) "
            f"at line {line}" for module, targets in graph.items() for line, target in targets
            if layer_of(target) > layer_of(module)]


def test_every_module_has_a_layer():
    for module in module_names():
        layer_of(module)


def test_imports_run_only_downward():
    assert upward_imports(import_graph()) == []


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) == []


def test_the_top_level_stays_small():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, top


def write_package(root: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "ats" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "ats"


@pytest.mark.parametrize("statement", ["from ..commands.cli import main\n", "import ats.commands.cli\n",
                                       "def f():\n    from ..commands import cli\n"])
def test_an_upward_import_is_caught(tmp_path, statement):
    root = write_package(tmp_path, {"__init__.py": "", "adapters/__init__.py": "", "adapters/timm.py": statement,
                                    "data/__init__.py": "", "data/build.py": "", "commands/__init__.py": "",
                                    "commands/cli.py": "main = None\n"})
    found = [line.split(" imports ")[0] for line in upward_imports(import_graph(root))]
    assert found == ["ats.adapters.timm (layer adapters)"]


def test_a_cycle_is_caught(tmp_path):
    root = write_package(tmp_path, {"__init__.py": "", "sampling.py": "from . import packing\n",
                                    "packing.py": "def f():\n    from .sampling import g\n"})
    assert find_cycle(import_graph(root)) in (["ats.sampling", "ats.packing", "ats.sampling"],
                                              ["ats.packing", "ats.sampling", "ats.packing"])
