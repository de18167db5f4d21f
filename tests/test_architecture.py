"""Package boundaries of jaxstack/ and pallas_kernels/, checked on the source with `ast` (no
imports, no devices; see ARCHITECTURE.md):

(a) no module imports a `_private` name (or `_private` module) from another package;
(b) no import cycle between jaxstack's top-level packages (module-level and in-function
    imports both count; pallas_kernels is a node too);
(c) every path written in a docstring or comment (`jaxstack/...py`, `pallas_kernels/...py`,
    `configs/...yaml`, `experiments/...py`, `tests/...py`) exists in the repository.

Each checker is a function of source text, unit-tested below on planted violations.
"""

from __future__ import annotations

import ast
import io
import pathlib
import re
import tokenize
from collections.abc import Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP = ("jaxstack", "pallas_kernels")

# (module name, is a package __init__, source)
Source = tuple[str, bool, str]


# -- reading the tree --------------------------------------------------------------------------


def tree_sources(root: pathlib.Path = ROOT, tops: tuple[str, ...] = TOP) -> dict[str, Source]:
    """{repo-relative path: (module name, is_package, source)} of every .py under `tops`."""
    out = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[rel.as_posix()] = (".".join(parts), is_pkg, path.read_text())
    return out


def package_of(module: str) -> str | None:
    """The package a module belongs to: its first two components ("jaxstack.train",
    "jaxstack.cli", "pallas_kernels.flash_attention"); None outside jaxstack/pallas_kernels."""
    parts = module.split(".")
    if parts[0] not in TOP:
        return None
    return ".".join(parts[:2])


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(module: str, is_pkg: bool, source: str) -> Iterator[tuple[str, list[str], int, bool]]:
    """(imported module, imported names, line, inside a function) of every import statement,
    relative imports resolved. `import a.b` yields ("a.b", [], ...)."""

    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, [], child.lineno, in_function
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                yield target, [a.name for a in child.names], child.lineno, in_function
            inner = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            yield from walk(child, inner)

    yield from walk(ast.parse(source), False)


# -- (a) private names across packages ---------------------------------------------------------


def private_import_violations(sources: dict[str, Source]) -> list[str]:
    """`path:line: module imports _name from other.package` for every import of a private
    name, or of a name through a private module, from a package other than the importer's."""
    bad = []
    for path, (module, is_pkg, source) in sources.items():
        own = package_of(module)
        for target, names, line, _ in imports(module, is_pkg, source):
            other = package_of(target)
            if other is None or other == own:
                continue
            private = [p for p in target.split(".")[2:] if _is_private(p)]
            private += [n for n in names if _is_private(n)]
            for name in private:
                bad.append(f"{path}:{line}: {module} imports {name} from {other}")
    return bad


# -- (b) import cycles between packages --------------------------------------------------------


def package_graph(sources: dict[str, Source]) -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: ["path:line", ...]}} over jaxstack's top-level packages
    (and pallas_kernels), counting module-level and in-function imports."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path, (module, is_pkg, source) in sources.items():
        own = _node(module)
        if own is None:  # jaxstack/__init__.py
            continue
        graph.setdefault(own, {})
        for target, names, line, in_function in imports(module, is_pkg, source):
            # `from jaxstack import hf` imports the package jaxstack.hf
            targets = [f"{target}.{n}" for n in names] if target in TOP else [target]
            for other in {_node(t) for t in targets} - {None, own}:
                where = f"{path}:{line}" + (" (in function)" if in_function else "")
                graph[own].setdefault(other, []).append(where)
    return graph


def _node(module: str) -> str | None:
    """Graph node of a module: the jaxstack top-level package or module it is in ("train",
    "cli"), "pallas_kernels" for every kernel; None for jaxstack itself, its dunders and
    modules outside both trees."""
    parts = module.split(".")
    if parts[0] == "pallas_kernels":
        return "pallas_kernels"
    if parts[0] != "jaxstack" or len(parts) == 1 or parts[1].startswith("__"):
        return None
    return parts[1]


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one node (each one contains a cycle),
    as sorted node lists; [] when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _describe_cycle(graph, component: list[str]) -> str:
    edges = [
        f"  {a} -> {b}: {', '.join(graph[a][b])}"
        for a in component
        for b in sorted(graph.get(a, {}))
        if b in component
    ]
    return f"cycle between {component}:\n" + "\n".join(edges)


# -- (c) paths written in docstrings and comments ----------------------------------------------

PATH_REF = re.compile(
    r"(?<![\w./-])"
    r"((?:jaxstack|pallas_kernels|experiments|tests)/[\w./-]*\.py|configs/[\w./-]*\.yaml)"
    r"(?![\w/-])"
)


def doc_texts(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every docstring (any string-expression statement) and comment."""
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            yield node.lineno, node.value.value
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def missing_path_refs(
    sources: dict[str, Source], exists: Callable[[str], bool] | None = None
) -> list[str]:
    """`path:line: ref` for every docstring/comment path reference that does not exist."""
    exists = exists or (lambda ref: (ROOT / ref).exists())
    bad = []
    for path, (_, _, source) in sources.items():
        for start, text in doc_texts(source):
            for match in PATH_REF.finditer(text):
                if not exists(match.group(1)):
                    line = start + text.count("\n", 0, match.start())
                    bad.append(f"{path}:{line}: {match.group(1)}")
    return sorted(set(bad))


# -- the real tree -----------------------------------------------------------------------------


def test_no_private_imports_across_packages():
    bad = private_import_violations(tree_sources())
    assert not bad, "private names imported across packages (give them a public name):\n" + (
        "\n".join(bad)
    )


def test_no_import_cycle_between_packages():
    graph = package_graph(tree_sources())
    assert {"train", "rl", "parallel", "models", "pallas_kernels"} <= set(graph)
    assert "train" in graph["rl"]  # the graph is really built (rl's job runs on the loop)
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(_describe_cycle(graph, c) for c in cycles)


def test_doc_path_references_exist():
    bad = missing_path_refs(tree_sources())
    assert not bad, "docstrings/comments name files that do not exist:\n" + "\n".join(bad)


# -- the checkers catch what they should -------------------------------------------------------


def _fake(**modules: str) -> dict[str, Source]:
    """Sources keyed by a fake path, from module-name keywords ("jaxstack__train__a" ->
    jaxstack.train.a; a trailing "__init" marks a package __init__)."""
    out = {}
    for key, source in modules.items():
        parts = key.split("__")
        is_pkg = parts[-1] == "init"
        parts = parts[:-1] if is_pkg else parts
        path = "/".join(parts) + ("/__init__.py" if is_pkg else ".py")
        out[path] = (".".join(parts), is_pkg, source)
    return out


def test_private_import_checker():
    sources = _fake(
        jaxstack__rl__a="from jaxstack.train.step import _decay, public\n",
        jaxstack__rl__b="def f():\n    from jaxstack.parallel._impl import thing\n",
        jaxstack__rl__c="from jaxstack.rl.losses import _same_package\n",
        jaxstack__rl__d="from .losses import _relative_same_package\nfrom ..train import _up\n",
        jaxstack__rl__e="from jaxstack.train import __version__, step as _step_alias\n",
        jaxstack__parallel__f="from pallas_kernels.flash_attention import _flash\n",
    )
    bad = private_import_violations(sources)
    assert bad == [
        "jaxstack/rl/a.py:1: jaxstack.rl.a imports _decay from jaxstack.train",
        "jaxstack/rl/b.py:2: jaxstack.rl.b imports _impl from jaxstack.parallel",
        "jaxstack/rl/d.py:2: jaxstack.rl.d imports _up from jaxstack.train",
        "jaxstack/parallel/f.py:1: jaxstack.parallel.f imports _flash from "
        "pallas_kernels.flash_attention",
    ]


def test_cycle_checker():
    acyclic = _fake(
        jaxstack__rl__a="from jaxstack.train.loop import run_loop\n",
        jaxstack__train__loop="from jaxstack import parallel\nimport jaxstack\n",
        jaxstack__parallel__init="from pallas_kernels.flash_attention import get_block_fns\n",
        pallas_kernels__flash_attention__init="import jax\n",
    )
    graph = package_graph(acyclic)
    assert {k: sorted(v) for k, v in graph.items()} == {
        "rl": ["train"],
        "train": ["parallel"],
        "parallel": ["pallas_kernels"],
        "pallas_kernels": [],
    }
    assert find_cycles(graph) == []
    # a function-level import back from train to rl closes a cycle
    cyclic = dict(acyclic)
    cyclic.update(_fake(jaxstack__train__job="def f():\n    from jaxstack.rl import losses\n"))
    graph = package_graph(cyclic)
    assert graph["train"]["rl"] == ["jaxstack/train/job.py:2 (in function)"]
    assert find_cycles(graph) == [["rl", "train"]]
    # a kernel importing the library closes a longer one
    cyclic = dict(acyclic)
    cyclic.update(_fake(pallas_kernels__x="from jaxstack.rl.a import f\n"))
    assert find_cycles(package_graph(cyclic)) == [["pallas_kernels", "parallel", "rl", "train"]]


def test_path_reference_checker():
    source = '''"""See jaxstack/train/loop.py and `configs/gone.yaml`; VILA's llava/mm_utils.py."""
x = "jaxstack/not/a/docstring.py"  # experiments/missing_bench.py
def f():
    """tests/test_loop.py,
    pallas_kernels/none.py, configs/<name>.yaml, experiments/*.py"""
'''
    present = {"jaxstack/train/loop.py", "tests/test_loop.py"}
    bad = missing_path_refs(_fake(jaxstack__m=source), exists=present.__contains__)
    assert bad == [
        "jaxstack/m.py:1: configs/gone.yaml",
        "jaxstack/m.py:2: experiments/missing_bench.py",
        "jaxstack/m.py:5: pallas_kernels/none.py",
    ]


def test_tests_import_no_private_library_names():
    """Tests reach the library through public names too (a building block gets a public name;
    an internal is tested through its public caller)."""
    bad = private_import_violations(tree_sources(tops=("tests",)))
    assert not bad, "tests import private names of jaxstack / pallas_kernels:\n" + "\n".join(bad)
