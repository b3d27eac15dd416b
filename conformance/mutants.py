"""Operator-level mutants of the reference driver, derived automatically with a small AST mutator.

The reference driver's semantics live in two files: `jaxlora/reference.py` (the oracle's
functions the driver calls) and `conformance/drivers/reference.py` (its state, validation and
errors). `mutants()` walks the functions of both in source order and yields one `Mutant` per
applicable operator at each point:

| operator | example |
|---|---|
| arithmetic swap | `alpha / r` -> `alpha * r`, `+` <-> `-`, `**` -> `*` |
| dropped term | `y + delta` -> `y`, `d * s` -> `d` |
| comparison swap | `<` <-> `<=`, `==` <-> `!=`, `in` <-> `not in`, `is` <-> `is not` |
| boolean | `and` <-> `or`, `not x` -> `x`, `-x` -> `x`, `True` <-> `False` |
| off-by-one | an integer or float constant `k` -> `k + 1` |
| regex anchors | drop `$` / `^`, `\\.` -> `.`, drop the `?` of `(.*\\.)?` |
| strings | a short string constant (`"."`, `"all-linear"`) -> `""` |
| swapped calls | `fullmatch` -> `match` -> `search`, `endswith` <-> `startswith`, |
| | `max` <-> `min`, `any` <-> `all` |
| dropped calls | `sqrt(r)` -> `r`, `tanh(h)` -> `h`, `abs(c)` -> `c`, `copysign(a, b)` -> `a` |
| ordering | `for k in xs` -> `for k in reversed(list(xs))` (loops that return, break or append) |
| dropped statements | `raise ...` -> `pass`, a call statement (`seen.append(p)`) -> `pass` |

Docstrings, f-strings (messages) and module-level code are not mutated; nor are the oracle's
functions the driver never calls (`unmerge`, `tolerance`, `allclose`: the suite's own).

Example:
    >>> ms = mutants()
    >>> len(ms) > 100, ms[0].id
    (True, 'jaxlora/reference.py::scale#0:If-drop')
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ROOT", "TARGETS", "Mutant", "apply", "mutants", "source"]

ROOT = Path(__file__).resolve().parent.parent
#: file -> the top-level functions / classes whose code is mutated (None: all but `versions`).
TARGETS: dict[str, tuple[str, ...] | None] = {
    "jaxlora/reference.py": (
        "scale",
        "resolve",
        "targets",
        "RefAdapter",
        "layer_forward",
        "chain_forward",
        "mixed_forward",
        "merge",
        "_paths_in_order",
        "_as_scale_one",
        "combine_cat",
        "combine_linear",
        "combine_svd",
    ),
    "conformance/drivers/reference.py": None,
}
_SKIP_METHODS = {"versions"}
_BINOP = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.Pow: ast.Mult,
}
_CMP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_ATTR = {
    "fullmatch": "match",
    "match": "search",
    "search": "match",
    "endswith": "startswith",
    "startswith": "endswith",
}
_NAME = {"max": "min", "min": "max", "any": "all", "all": "any"}
_DROP_CALL = {"sqrt", "tanh", "abs", "copysign"}
_REGEX_CALLS = {"match", "fullmatch", "search", "compile"}


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One mutation: the `index`-th mutation point of `function` in `file`, operator `op`."""

    file: str
    function: str
    index: int
    op: str
    line: int

    @property
    def id(self) -> str:
        """Stable while the function's code is unchanged: `file::function#index:op`."""
        return f"{self.file}::{self.function}#{self.index}:{self.op}"


def source(file: str) -> str:
    """The current text of a target file."""
    return (ROOT / file).read_text(encoding="utf-8")


def _name(node: ast.AST) -> str:
    return type(node).__name__


def _points(node: ast.AST, in_regex: bool) -> list[tuple[str, object]]:
    """`(op, replacement)` for each mutation of `node` itself (children are visited apart)."""
    out: list[tuple[str, object]] = []
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOP:
        swapped = ast.BinOp(node.left, _BINOP[type(node.op)](), node.right)
        out.append((f"{_name(node.op)}->{_BINOP[type(node.op)].__name__}", swapped))
        if not isinstance(node.op, ast.Pow):
            out.append((f"{_name(node.op)}-drop-right", node.left))
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP:
        new = _CMP[type(node.ops[0])]
        out.append(
            (
                f"{_name(node.ops[0])}->{new.__name__}",
                ast.Compare(node.left, [new()], node.comparators),
            )
        )
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{_name(node.op)}->{new.__name__}", ast.BoolOp(new(), node.values)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        out.append((f"{_name(node.op)}-drop", node.operand))
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            out.append((f"{value}->{not value}", ast.Constant(not value)))
        elif isinstance(value, int | float):
            out.append(("const+1", ast.Constant(value + 1)))
        elif isinstance(value, str) and in_regex:
            for old, new, op in (("$", "", "regex-drop-$"), ("^", "", "regex-drop-^")):
                if old in value:
                    out.append((op, ast.Constant(value.replace(old, new))))
            if "\\." in value:
                out.append(("regex-\\.->.", ast.Constant(value.replace("\\.", "."))))
            if ")?" in value:
                out.append(("regex-drop-?", ast.Constant(value.replace(")?", ")"))))
        elif isinstance(value, str) and 0 < len(value) <= 12:
            out.append(("str->empty", ast.Constant("")))
    elif isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _ATTR:
            new_func = ast.Attribute(func.value, _ATTR[func.attr], ast.Load())
            out.append(
                (f"{func.attr}->{_ATTR[func.attr]}", ast.Call(new_func, node.args, node.keywords))
            )
        elif isinstance(func, ast.Name) and func.id in _NAME:
            new_func = ast.Name(_NAME[func.id], ast.Load())
            out.append(
                (f"{func.id}->{_NAME[func.id]}", ast.Call(new_func, node.args, node.keywords))
            )
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called in _DROP_CALL and node.args:
            out.append((f"{called}-drop", node.args[0]))
    elif isinstance(node, ast.For) and _order_matters(node):
        rev = ast.Call(
            ast.Name("reversed", ast.Load()),
            [ast.Call(ast.Name("list", ast.Load()), [node.iter], [])],
            [],
        )
        out.append(("for-reversed", ast.For(node.target, rev, node.body, node.orelse)))
    elif isinstance(node, ast.Raise) or (
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
    ):
        out.append((f"{_name(node)}-drop", ast.Pass()))
    elif isinstance(node, ast.If) and not node.orelse and not isinstance(node.body[0], ast.Raise):
        out.append(("If-drop", ast.Pass()))
    return out


def _order_matters(loop: ast.For) -> bool:
    """A loop that returns, breaks or appends: its order is observable (a first match, an
    ordered result); other loops (sums, validation) are reversed only as equivalents."""
    for node in ast.walk(loop):
        if isinstance(node, ast.Return | ast.Break):
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "append":
            return True
    return False


def _is_regex_call(node: ast.AST) -> bool:
    func = getattr(node, "func", None)
    return (
        isinstance(func, ast.Attribute)
        and func.attr in _REGEX_CALLS
        and isinstance(func.value, ast.Name)
        and func.value.id == "re"
    )


class _Walker(ast.NodeTransformer):
    """Counts mutation points of one function in source order; replaces the `target`-th."""

    def __init__(self, target: int | None = None) -> None:
        self.target, self.count = target, 0
        self.found: list[tuple[str, int]] = []
        self.in_regex = False
        self.applied: str | None = None

    def visit(self, node: ast.AST):
        if isinstance(node, ast.keyword) and node.arg == "strict":
            return node  # zip(..., strict=...) only asserts equal lengths
        if isinstance(node, ast.JoinedStr) or (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node  # messages and docstrings
        for op, replacement in _points(node, self.in_regex):
            if self.count == self.target:
                self.applied = op
                self.count += 1
                return ast.copy_location(replacement, node)
            self.found.append((op, getattr(node, "lineno", 0)))
            self.count += 1
        if _is_regex_call(node):
            was, self.in_regex = self.in_regex, True
            result = self.generic_visit(node)
            self.in_regex = was
            return result
        return self.generic_visit(node)


def _functions(tree: ast.Module, names: tuple[str, ...] | None) -> Iterator[tuple[str, ast.AST]]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and (names is None or node.name in names):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and (names is None or node.name in names):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name not in _SKIP_METHODS:
                    yield f"{node.name}.{item.name}", item


def _body_walk(func: ast.FunctionDef, walker: _Walker) -> None:
    """Visit the body only (not the signature's defaults and annotations)."""
    func.body = [walker.visit(stmt) for stmt in func.body]


def mutants() -> list[Mutant]:
    """Every mutant of `TARGETS`, in file and source order."""
    out = []
    for file, names in TARGETS.items():
        tree = ast.parse(source(file))
        for qualname, func in _functions(tree, names):
            walker = _Walker()
            _body_walk(copy.deepcopy(func), walker)
            out += [
                Mutant(file, qualname, i, op, line) for i, (op, line) in enumerate(walker.found)
            ]
    return out


def apply(mutant: Mutant) -> str:
    """The source of `mutant.file` with the mutation applied.

    Raises:
        ValueError: the mutation point no longer exists (the file changed).
    """
    tree = ast.parse(source(mutant.file))
    for qualname, func in _functions(tree, TARGETS[mutant.file]):
        if qualname == mutant.function:
            walker = _Walker(mutant.index)
            _body_walk(func, walker)
            if walker.applied != mutant.op:
                raise ValueError(f"mutant {mutant.id} does not apply (found {walker.applied}).")
            return ast.unparse(ast.fix_missing_locations(tree))
    raise ValueError(f"mutant {mutant.id}: no function {mutant.function!r} in {mutant.file}.")
