"""The package layout is the architecture: floors, one-way imports, no cycles, short functions.

Each module of ``mnapps`` sits on a floor (docs/development.md, "The house"); it may import
modules of its own floor or below, never above. The whole import graph (imports at module level
and inside functions alike) must be free of cycles, and no function imports an ``mnapps`` module
inside its body (the usual way to hide a cycle). These are checked on the source with ``ast``, so
a new module is covered as soon as it exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mnapps"

# Longest prefix wins.
FLOORS = {
    "mnapps": 0,
    "mnapps.config": 0,
    "mnapps.checkpoint": 0,
    "mnapps.files": 0,
    "mnapps.stats": 0,
    "mnapps.data": 1,
    "mnapps.eval": 1,
    "mnapps.engine": 1,
    "mnapps.backbones": 1,
    "mnapps.heads": 2,
    "mnapps.importers": 2,
    "mnapps.tasks": 3,
    "mnapps.export": 4,
    "mnapps.cli": 5,
}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> int:
    best = max((prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")), key=len)
    return FLOORS[best]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # "from mnapps.x import y" may name a submodule y or an attribute of x: keep both candidates.
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def mnapps_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every mnapps import of ``path``."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("mnapps"))
            elif isinstance(child, ast.ImportFrom):
                names = _resolve(module, path.name == "__init__.py", child)
                if names[0].startswith("mnapps"):
                    found.extend((n, child.lineno, in_function) for n in names)
            visit(child, nested)

    visit(tree, False)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str) -> str | None:
    """The mnapps module an import refers to (an attribute import resolves to its module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = {_known(name) for name, _, _ in mnapps_imports(path)}
        # A package's __init__ is imported by every submodule import; it is a node of its own.
        graph[module] = {t for t in targets if t and t != module}
    return graph


def test_every_module_has_a_floor():
    assert all(floor_of(m) >= 0 for m in MODULES)


def test_no_module_imports_a_floor_above_it():
    bad = []
    for module, path in MODULES.items():
        for name, line, _ in mnapps_imports(path):
            target = _known(name)
            if target and floor_of(target) > floor_of(module):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} {module} (floor {floor_of(module)}) "
                           f"imports {target} (floor {floor_of(target)})")
    assert not bad, "imports that point up a floor:\n" + "\n".join(sorted(set(bad)))


# The one exemption: command-line modules import torch and the tasks after parsing their
# arguments, so that `--help` answers at once (tests/test_cli_main.py checks it imports no torch).
# They sit on the top floor, so a late import there cannot hide a cycle.
LATE_IMPORTS_ALLOWED = "mnapps.cli"


def test_no_mnapps_import_inside_a_function():
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
           for module, path in MODULES.items() for name, line, inside in mnapps_imports(path)
           if inside and not module.startswith(LATE_IMPORTS_ALLOWED + ".")]
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(sorted(set(bad)))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    # A package __init__ re-exporting its own submodules is not a cycle through the package.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_fit_on_a_screen(path):
    tree = ast.parse(path.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


# The lab: scripts that measure mnapps against its peers or reproduce the paper's tables. They
# and their helpers (tools/lab/) sit beside the package, as detectron2 keeps tools/ apart.
LAB_SCRIPTS = {"benchmark", "bench_data", "bench_distill_step", "face_pipeline_bench", "model_stats"}


def test_each_product_verb_has_one_script_and_the_lab_stays_out_of_the_package():
    tools = {tool.stem: tool for tool in (PACKAGE.parent / "tools").glob("*.py")}
    assert LAB_SCRIPTS <= set(tools)
    for stem, tool in tools.items():
        text = tool.read_text()
        assert "sys.path" not in text, tool
        if stem in LAB_SCRIPTS:
            assert "from lab" in text, tool
        else:
            assert f"from mnapps.cli.{stem} import main" in text, tool
            assert len(text.splitlines()) <= 10, tool
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n == "lab" or n.startswith("lab.") for n in names), f"{path}:{node.lineno} imports the lab"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_hold_one_thing(path):
    name = str(path.relative_to(PACKAGE))
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (over {MAX_MODULE_LINES}): split it by what it owns"


# Keys only a checkpoint file has: code outside mnapps/checkpoint.py reads them as attributes of
# the typed Checkpoint / TrainingState record, never as strings.
CHECKPOINT_ONLY_KEYS = {
    "optimizer", "scheduler", "scaler", "rng", "rng_per_rank", "evaluation_pending",
    "best_mode", "train_config", "steps_per_epoch", "world_size",
}
# Functions that hand out the raw checkpoint dict; only mnapps/checkpoint.py calls them
# (teacher weights are a bare state dict read with safe_load, not a checkpoint).
RAW_READERS = {"load_checkpoint", "save_checkpoint"}


def _string_key(node: ast.AST) -> str | None:
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop")
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


def checkpoint_key_access(path: Path) -> list[str]:
    """String-keyed reads of checkpoint fields, raw checkpoint reads/writes, and hand-built payloads."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        key = _string_key(node)
        if key in CHECKPOINT_ONLY_KEYS:
            found.append(f"line {node.lineno}: [{key!r}]")
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in RAW_READERS or (name == "load" and getattr(node.func, "value", None) is not None
                                       and getattr(node.func.value, "id", None) == "torch"):
                found.append(f"line {node.lineno}: {name}()")
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if {"task", "model"} <= keys:
                found.append(f"line {node.lineno}: a dict with 'task' and 'model' (a checkpoint by hand)")
    return found


def test_only_the_checkpoint_module_knows_the_checkpoint_keys():
    bad = [f"{path.relative_to(PACKAGE.parent)} {hit}" for path in sorted(PACKAGE.rglob("*.py"))
           if path.name != "checkpoint.py" or path.parent != PACKAGE for hit in checkpoint_key_access(path)]
    assert not bad, "use mnapps.checkpoint.read_checkpoint / Checkpoint instead of:\n" + "\n".join(bad)


def test_the_checkpoint_key_check_finds_what_it_forbids(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(ckpt):\n    a = ckpt['optimizer']\n    b = ckpt.get('rng')\n"
                      "    c = load_checkpoint('x')\n    return {'task': 'd', 'model': {}}\n")
    assert len(checkpoint_key_access(sample)) == 4


def _model_classes(tree: ast.AST) -> set[str]:
    """Names a module imports from where model classes live (torchvision models, mnapps heads/backbones)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
            node.module.startswith(("torchvision.models", "mnapps.heads", "mnapps.backbones"))
        ):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def model_class_dispatch(path: Path) -> list[str]:
    """``isinstance(x, <model class>)`` anywhere but a guard that raises (``if not isinstance: raise``)."""
    tree = ast.parse(path.read_text())
    classes = _model_classes(tree)
    guards = {id(test.operand) for node in ast.walk(tree) if isinstance(node, ast.If)
              for test in [node.test] if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
              and len(node.body) == 1 and isinstance(node.body[0], ast.Raise)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            named = {getattr(kind, "id", getattr(kind, "attr", None)) for kind in kinds}
            if named & classes and id(node) not in guards:
                found.append(f"line {node.lineno}: isinstance(..., {', '.join(sorted(named & classes))})")
    return found


def test_export_dispatches_through_the_tables_not_on_model_classes():
    bad = [f"{path.relative_to(PACKAGE.parent)} {hit}" for path in sorted((PACKAGE / "export").rglob("*.py"))
           for hit in model_class_dispatch(path)]
    assert not bad, "export picks its path with isinstance on model classes (use TASKS / HEADS):\n" + "\n".join(bad)


def test_the_dispatch_check_finds_an_isinstance_chain(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from torchvision.models.detection.ssd import SSD\n"
                      "def f(m):\n    if not isinstance(m, SSD):\n        raise ValueError(m)\n"
                      "    return 1 if isinstance(m, SSD) else 2\n")
    assert model_class_dispatch(sample) == ["line 5: isinstance(..., SSD)"]


def graph_string_dispatch(path: Path) -> list[str]:
    """Comparisons of a ``.graph`` / ``.export_graph`` attribute with a string (``spec.graph == "detector"``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any(isinstance(side, ast.Attribute) and side.attr in ("graph", "export_graph") for side in sides)
            text = any(isinstance(side, ast.Constant) and isinstance(side.value, str) for side in sides)
            if named and text:
                found.append(f"line {node.lineno}")
    return found


def test_export_graph_kinds_are_objects_not_strings():
    bad = [f"{path.relative_to(PACKAGE.parent)} {hit}" for path in MODULES.values() for hit in graph_string_dispatch(path)]
    assert not bad, "a graph kind compared with a string (use GraphKind and mnapps.export.graphs):\n" + "\n".join(bad)


def test_the_graph_dispatch_check_finds_a_string_comparison(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(spec):\n    if spec.graph is GraphKind.SSD:\n        return 1\n"
                      "    return 2 if spec.graph == 'detector' else 3\n")
    assert graph_string_dispatch(sample) == ["line 4"]
