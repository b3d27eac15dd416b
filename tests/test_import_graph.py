"""The import graph of `jaxlora` and `conformance` is a DAG with the design's layers (SW-PKG-1).

The layers are data, in one place: `LAYERS` below, highest first as in the design's "Layers".
The checker parses the whole AST of every module (imports inside functions and under
`if TYPE_CHECKING:` count; so does `importlib.import_module("constant")`), resolves relative
imports, and reports each violation as `file:line: what, and why`. A small AST checker rather
than import-linter: no new dependency or contract language, the rules that are not layer
contracts (every module has a layer, the oracle is JAX-free through its imports, external
frameworks pinned to the layer that integrates them, conformance's allow-list) are a few lines
each, and the tests below run it on synthetic packages to show that each rule can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: jaxlora's layers, highest first (the design's "Layers"). Each entry names top-level modules or
#: sub-packages of `jaxlora` ("__init__" is the package's public facade). A module imports its
#: own layer and the layers below it, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli", "__main__", "commands"),  # `jaxlora ...`, `python -m jaxlora ...`
    ("serve",),  # HTTP; talks to the engine
    ("engine", "generate", "train"),
    ("models",),  # decoder families
    ("flax",),  # Linen and NNX integration by layer path
    # ---- core: below this line nothing knows a framework integration, model, server or CLI.
    ("__init__",),  # the public API, re-exported
    ("io",),  # PEFT on-disk format
    ("slots", "merge", "params", "sharding", "chain"),
    ("bank",),  # above lora: a bank validates adapters with lora's one validator
    ("numerics",),  # below bank: a bank refuses non-finite adapters (SW-NUM-2)
    ("lora",),  # THE seam: one per-layer function + one validator
    ("routing",),  # mixed-batch kernels
    ("weights",),  # LoraConfig, scaling rules, init
    ("types",),  # leaf values; imports only errors
    ("errors",),  # one exception hierarchy
    ("reference",),  # the NumPy oracle
)
#: the first layer that is not core
FIRST_INTEGRATION = "flax"
#: external packages -> the lowest layer allowed to import them
EXTERNAL_FROM: Mapping[str, str] = {"flax": "flax", "starlette": "serve", "uvicorn": "serve"}
#: jaxlora layers that import no JAX, directly or through other jaxlora modules
JAX_FREE = ("reference",)
JAX_PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex")
#: top-level names jaxlora never imports
NEVER_FROM_JAXLORA = ("benchmarks", "tests", "conformance")
#: what conformance may import of jaxlora; its jaxlora driver may import any of it
CONFORMANCE_USES = ("jaxlora.reference", "jaxlora.errors")
CONFORMANCE_DRIVER = "conformance.drivers.jaxlora_driver"
CHECKED = ("jaxlora", "conformance")


@dataclasses.dataclass(frozen=True)
class Import:
    """One import: `source` imports `target` at `where` (`file:line`). `target` is the most
    specific module of a checked package that the statement names, else the external top-level
    package; `lazy` when the statement sits inside a function."""

    source: str
    target: str
    where: str
    lazy: bool

    def describe(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}" + (
            " (inside a function)" if self.lazy else ""
        )


def find_modules(root: pathlib.Path, packages: Iterable[str] = CHECKED) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every `.py` file of `packages` under `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: Mapping[str, pathlib.Path]) -> str:
    """The longest prefix of `name` that is a checked module; else its top-level package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return parts[0]


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, where: str, modules: Mapping) -> None:
        self.module, self.where, self.modules = module, where, modules
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt | ast.expr) -> None:
        resolved = _resolve(target, self.modules)
        lazy = self.depth > 0
        self.found.append(Import(self.module, resolved, f"{self.where}:{node.lineno}", lazy))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.package.split(".")
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.modules else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else 0
        # a name relative to a `package=` argument is not resolved
        if name in ("import_module", "__import__") and isinstance(first, str) and first[:1] != ".":
            self._add(first, node)
        self.generic_visit(node)


def find_imports(root: pathlib.Path, modules: Mapping[str, pathlib.Path]) -> list[Import]:
    """Every import of every module, anywhere in its AST."""
    found = []
    for module, path in modules.items():
        where = str(path.relative_to(root))
        collector = _Collector(module, path.name == "__init__.py", where, modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=where))
        found += collector.found
    return found


def layer_of(module: str) -> str | None:
    """The `LAYERS` entry a jaxlora module belongs to (by its top-level name), else None."""
    parts = module.split(".")
    if parts[0] != "jaxlora":
        return None
    unit = parts[1] if len(parts) > 1 else "__init__"
    return unit if any(unit in layer for layer in LAYERS) else None


def _rank(unit: str) -> int:
    """Height of a layer: 0 is the lowest."""
    return next(len(LAYERS) - 1 - i for i, layer in enumerate(LAYERS) if unit in layer)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(edges: Mapping[str, Mapping[str, Import]]) -> Iterator[list[Import]]:
    """One import cycle per strongly connected component with a cycle (Tarjan), as the imports
    that close it, starting from the component's smallest module name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, {}):
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    for component in sorted(components, key=min):
        start = min(component)
        # breadth-first search inside the component for the shortest way back to `start`
        paths: dict[str, list[Import]] = {start: []}
        frontier = [start]
        while frontier and "" not in paths:
            nxt = []
            for v in frontier:
                for w, imp in sorted(edges.get(v, {}).items()):
                    if w == start:
                        paths[""] = [*paths[v], imp]
                        break
                    if w in component and w not in paths:
                        paths[w] = [*paths[v], imp]
                        nxt.append(w)
                if "" in paths:
                    break
            frontier = nxt
        yield paths[""]


def check(root: pathlib.Path = ROOT) -> list[str]:
    """Every violation of SW-PKG-1 in the tree at `root`, as `file:line: ...` lines."""
    modules = find_modules(root)
    imports = find_imports(root, modules)
    problems = []
    for module, path in modules.items():
        if module.startswith("jaxlora") and layer_of(module) is None:
            problems.append(
                f"{path.relative_to(root)}: {module} belongs to no layer: add "
                f"{_unit(module)!r} to LAYERS in tests/test_import_graph.py where the design "
                "puts it"
            )
    for imp in imports:
        src_top, dst_top = imp.source.split(".")[0], imp.target.split(".")[0]
        src_layer, dst_layer = layer_of(imp.source), layer_of(imp.target)
        if src_top == "jaxlora":
            if dst_top in NEVER_FROM_JAXLORA:
                problems.append(f"{imp.describe()}: jaxlora never imports {dst_top}")
            if src_layer and dst_layer and _rank(dst_layer) > _rank(src_layer):
                core = _rank(src_layer) < _rank(FIRST_INTEGRATION) <= _rank(dst_layer)
                problems.append(
                    f"{imp.describe()}: layer {dst_layer!r} is above {src_layer!r}"
                    + (" (the core knows no integration, model, server or CLI)" if core else "")
                )
            lowest = EXTERNAL_FROM.get(dst_top)
            if src_layer and lowest and _rank(src_layer) < _rank(lowest):
                problems.append(
                    f"{imp.describe()}: {dst_top} is imported only from layer {lowest!r} up"
                )
        if src_top == "conformance":
            if dst_top in ("benchmarks", "tests"):
                problems.append(f"{imp.describe()}: conformance never imports {dst_top}")
            driver = imp.source == CONFORMANCE_DRIVER
            if dst_top == "jaxlora" and not driver and imp.target not in CONFORMANCE_USES:
                problems.append(
                    f"{imp.describe()}: conformance uses only {', '.join(CONFORMANCE_USES)} "
                    f"(the jaxlora driver, {CONFORMANCE_DRIVER}, may import the rest)"
                )
    # JAX-free layers: no JAX import in them nor in any jaxlora module they reach.
    by_source: dict[str, list[Import]] = {}
    for imp in imports:
        by_source.setdefault(imp.source, []).append(imp)
    for module in modules:
        if layer_of(module) not in JAX_FREE:
            continue
        seen, todo = {module}, [module]
        while todo:
            for imp in by_source.get(todo.pop(), []):
                if imp.target.split(".")[0] in JAX_PACKAGES:
                    via = "" if imp.source == module else f" (reached from {module})"
                    problems.append(f"{imp.describe()}{via}: {module} imports no JAX")
                elif imp.target in modules and imp.target not in seen:
                    seen.add(imp.target)
                    todo.append(imp.target)
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target in modules:
            edges.setdefault(imp.source, {}).setdefault(imp.target, imp)
    for cycle in _cycles(edges):
        chain = " -> ".join([cycle[0].source, *(imp.target for imp in cycle)])
        problems.append(
            f"{cycle[0].where}: import cycle {chain} ({', '.join(i.where for i in cycle)})"
        )
    return problems


# ---------------------------------------------------------------------------------------------


@pytest.mark.clause("SW-PKG-1")
def test_the_import_graph_follows_the_layers():
    """SW-PKG-1: jaxlora and conformance have no import cycle, every jaxlora module has a
    layer and imports only downwards, the oracle is JAX-free, and jaxlora never imports
    benchmarks, tests or conformance."""
    modules = find_modules(ROOT)
    imports = find_imports(ROOT, modules)
    # the parser sees the graph, lazy and relative imports included (so an empty report means
    # something)
    assert len(modules) > 40 and len(imports) > 200 and any(i.lazy for i in imports)
    assert any(i.source == "jaxlora.__main__" and i.target == "jaxlora.cli" for i in imports)
    problems = check(ROOT)
    assert not problems, "import graph violations (SW-PKG-1):\n" + "\n".join(problems)


def _write(root: pathlib.Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


#: a tiny tree that follows every rule
CLEAN = {
    "jaxlora/__init__.py": "from .bank import select\nfrom . import errors as errors\n",
    "jaxlora/errors.py": "class JaxLoraError(Exception):\n    pass\n",
    "jaxlora/types.py": "from .errors import JaxLoraError\nimport jax\n",
    "jaxlora/lora.py": "from jaxlora.types import JaxLoraError\n",
    "jaxlora/bank.py": "from . import lora\n\ndef select():\n    from .types import JaxLoraError\n",
    "jaxlora/numerics.py": "from .types import JaxLoraError\n\ndef f():\n    pass\n",
    "jaxlora/reference.py": "import numpy as np\n",
    "jaxlora/flax/__init__.py": "from .nnx import apply\n",
    "jaxlora/flax/nnx.py": "import flax\nfrom ..bank import select\n\ndef apply():\n    pass\n",
    "jaxlora/cli.py": "import importlib\nimportlib.import_module('jaxlora.flax')\n",
    "jaxlora/__main__.py": "from .cli import main\n",
    "conformance/__init__.py": "",
    "conformance/driver.py": "from jaxlora.reference import np\nfrom jaxlora import errors\n",
    "conformance/drivers/__init__.py": "",
    "conformance/drivers/jaxlora_driver.py": "import jaxlora\nfrom jaxlora.flax import nnx\n",
}


@pytest.mark.clause("SW-PKG-1")
def test_the_checker_accepts_a_tree_that_follows_the_rules(tmp_path):
    """SW-PKG-1: a synthetic tree that only imports downwards (lazily, relatively, through
    `importlib`, from conformance's allowed modules) has no violation, and its imports are
    resolved to the modules they name."""
    _write(tmp_path, CLEAN)
    assert check(tmp_path) == []
    imports = find_imports(tmp_path, find_modules(tmp_path))
    seen = {(i.source, i.target, i.lazy) for i in imports}
    assert ("jaxlora.bank", "jaxlora.types", True) in seen
    assert ("jaxlora.bank", "jaxlora.lora", False) in seen
    assert ("jaxlora.flax.nnx", "jaxlora.bank", False) in seen
    assert ("jaxlora.cli", "jaxlora.flax", False) in seen
    assert ("jaxlora", "jaxlora.errors", False) in seen


@pytest.mark.clause("SW-PKG-1")
@pytest.mark.parametrize(
    "files, expected",
    [
        pytest.param(  # bank <-> numerics, one side lazy, as the tree had it
            {
                "jaxlora/bank.py": "from .numerics import f\n",
                "jaxlora/numerics.py": "def f():\n    from jaxlora.bank import select\n",
            },
            [
                "jaxlora/bank.py:1: import cycle jaxlora.bank -> jaxlora.numerics -> "
                "jaxlora.bank (jaxlora/bank.py:1, jaxlora/numerics.py:2)",
                "jaxlora/numerics.py:2: jaxlora.numerics imports jaxlora.bank (inside a function): "
                "layer 'bank' is above 'numerics'",
            ],
            id="bank-numerics",
        ),
        pytest.param(  # a cycle inside one layer breaks no layer rule
            {
                "jaxlora/slots.py": "from . import chain\n",
                "jaxlora/chain.py": "def f():\n    import jaxlora.merge\n",
                "jaxlora/merge.py": "from .slots import x\n",
            },
            [
                "jaxlora/chain.py:2: import cycle jaxlora.chain -> jaxlora.merge -> "
                "jaxlora.slots -> jaxlora.chain (jaxlora/chain.py:2, jaxlora/merge.py:1, "
                "jaxlora/slots.py:1)"
            ],
            id="cycle-in-a-layer",
        ),
        pytest.param(
            {"jaxlora/weights.py": "if True:\n    from .numerics import f\n"},
            [
                "jaxlora/weights.py:2: jaxlora.weights imports jaxlora.numerics: "
                "layer 'numerics' is above 'weights'"
            ],
            id="upward",
        ),
        pytest.param(
            {"jaxlora/numerics.py": "def f():\n    import jaxlora.flax.nnx\n"},
            [
                "jaxlora/numerics.py:2: jaxlora.numerics imports jaxlora.flax.nnx (inside a "
                "function): layer 'flax' is above 'numerics' (the core knows no integration"
            ],
            id="core-imports-integration-lazily",
        ),
        pytest.param(
            {"jaxlora/cli.py": "import importlib\nimportlib.import_module('benchmarks')\n"},
            ["jaxlora/cli.py:2: jaxlora.cli imports benchmarks: jaxlora never imports"],
            id="benchmarks",
        ),
        pytest.param(
            {"jaxlora/flax/nnx.py": "from tests.conftest import x\n"},
            ["jaxlora/flax/nnx.py:1: jaxlora.flax.nnx imports tests: jaxlora never imports"],
            id="tests",
        ),
        pytest.param(
            {"jaxlora/bank.py": "from conformance import driver\n"},
            ["jaxlora/bank.py:1: jaxlora.bank imports conformance.driver: jaxlora never"],
            id="conformance",
        ),
        pytest.param(
            {"jaxlora/reference.py": "from .errors import JaxLoraError\n"},
            ["jaxlora/reference.py:1: jaxlora.reference imports jaxlora.errors: layer 'errors'"],
            id="reference-above-nothing",
        ),
        pytest.param(
            {"jaxlora/reference.py": "def f():\n    import jax.numpy as jnp\n"},
            ["jaxlora/reference.py:2: jaxlora.reference imports jax (inside a function): "],
            id="reference-jax",
        ),
        pytest.param(
            {"jaxlora/merge.py": "from flax import nnx\n"},
            ["jaxlora/merge.py:1: jaxlora.merge imports flax: flax is imported only from"],
            id="core-imports-flax",
        ),
        pytest.param(
            {"jaxlora/models/__init__.py": "import starlette\n"},
            ["jaxlora/models/__init__.py:1: jaxlora.models imports starlette: starlette is"],
            id="models-import-a-server",
        ),
        pytest.param(
            {"jaxlora/wat.py": ""},
            ["jaxlora/wat.py: jaxlora.wat belongs to no layer: add 'wat' to LAYERS"],
            id="no-layer",
        ),
        pytest.param(
            {"conformance/driver.py": "from jaxlora.bank import select\n"},
            ["conformance/driver.py:1: conformance.driver imports jaxlora.bank: conformance uses"],
            id="conformance-uses-the-library",
        ),
    ],
)
def test_the_checker_reports_each_violation(tmp_path, files, expected):
    """SW-PKG-1: on a synthetic tree with one violation the checker reports exactly it, with
    its file and line: an import cycle (one side lazy), an upward import, a core module
    importing an integration inside a function, an import of benchmarks (via `importlib`),
    tests or conformance, a JAX import reached by the oracle, flax or a server library below
    its layer, a module without a layer, and conformance using the library beyond the oracle."""
    _write(tmp_path, {**CLEAN, **files})
    problems = check(tmp_path)
    assert len(problems) == len(expected), problems
    for problem, start in zip(sorted(problems), sorted(expected), strict=True):
        assert problem.startswith(start), (problem, start)


@pytest.mark.clause("SW-PKG-1")
def test_a_jax_import_reached_through_another_module_is_reported(tmp_path, monkeypatch):
    """SW-PKG-1: the oracle is JAX-free through its imports too: with `reference` given the
    right to import `errors` (a layer below it), a JAX import in `errors` is reported as
    reached from `jaxlora.reference`."""
    _write(
        tmp_path,
        {
            **CLEAN,
            "jaxlora/reference.py": "from .errors import JaxLoraError\n",
            "jaxlora/errors.py": "import jax\n\nclass JaxLoraError(Exception):\n    pass\n",
        },
    )
    layers = tuple(
        ("errors", "reference") if layer == ("errors",) else layer
        for layer in LAYERS
        if layer != ("reference",)
    )
    monkeypatch.setattr(sys.modules[__name__], "LAYERS", layers)
    assert check(tmp_path) == [
        "jaxlora/errors.py:1: jaxlora.errors imports jax (reached from jaxlora.reference): "
        "jaxlora.reference imports no JAX"
    ]
