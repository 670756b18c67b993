"""The project's structure, checked on its source: no private name crosses a module boundary, `interop` uses
only `miss_jax`'s public API, the PEFT folder format sits one floor below the adapter lifecycle (the
lifecycle imports it at the top of its modules; it never reaches a model class), and docs/DESIGN.md's
dependency diagram is exactly the import graph."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("miss_jax", "interop")
SOURCES = PACKAGES + ("tests", "benchmarks", "examples")


def sources() -> dict[str, ast.Module]:
    """`{relative path: parsed module}` of every Python file of the project."""
    out = {}
    for top in SOURCES:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        out[os.path.relpath(path, ROOT)] = ast.parse(f.read(), path)
    return out


def module_name(relpath: str) -> str:
    return relpath[:-3].replace(os.sep, ".").removesuffix(".__init__")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(tree: ast.Module) -> list[str]:
    """`from m import _x` and `obj._x` (other than `self._x` / `cls._x`) in one file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names if is_private(a.name)]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_name_crosses_a_module_boundary() -> None:
    bad = {path: uses for path, tree in sources().items() if (uses := private_uses(tree))}
    assert bad == {}


def test_the_private_name_check_sees_both_forms() -> None:
    tree = ast.parse("from miss_jax.linen import _get\nx = model._specs\nself._ok = 1\ny = obj.__class__")
    assert private_uses(tree) == ["line 1: from miss_jax.linen import _get", "line 2: model._specs"]


def project_imports(tree: ast.Module, package: str) -> set[tuple[str, str]]:
    """`(module, name)` pairs this file imports from the project (`name` "" for `import module`)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {(a.name, "") for a in node.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside `package`
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] in PACKAGES:
                out |= {(mod, a.name) for a in node.names}
    return out


def import_graph() -> dict[str, set[str]]:
    """`{module: project modules it imports}` for miss_jax and interop (package `__init__`s left out); a
    name imported from a package itself (`from miss_jax import MissModel`) counts as the package."""
    def resolve(mod: str, name: str) -> str:
        candidate = f"{mod}.{name}"
        return candidate if os.path.isfile(os.path.join(ROOT, *candidate.split(".")) + ".py") else mod

    graph = {}
    for path, tree in sources().items():
        if path.startswith(PACKAGES) and not path.endswith("__init__.py"):
            name = module_name(path)
            graph[name] = {resolve(m, n) for m, n in project_imports(tree, name.rsplit(".", 1)[0])} - {name}
    return graph


def documented_graph() -> dict[str, set[str]]:
    """The dependency lines of docs/DESIGN.md's diagram: `module -> dep, dep` (`-> nothing` for none)."""
    with open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"<!-- imports -->\n```text\n(.*?)```", text, re.S)
    assert block, "docs/DESIGN.md lost its import diagram (the ```text block after <!-- imports -->)"
    graph = {}
    for line in block.group(1).splitlines():
        if "->" in line:
            name, deps = (part.strip() for part in line.split("->", 1))
            graph[name] = set() if deps == "nothing" else {d.strip() for d in deps.split(",")}
    return graph


def test_design_diagram_matches_the_imports() -> None:
    documented, actual = documented_graph(), import_graph()
    fix = [f"{m:24s} -> {', '.join(sorted(actual[m])) or 'nothing'}" for m in sorted(actual)
           if documented.get(m) != actual[m]]
    stale = sorted(set(documented) - set(actual))
    assert not fix and not stale, "update docs/DESIGN.md §4:\n" + "\n".join(fix) + f"\nno such modules: {stale}"


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph.get(start, ()))
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return seen

    assert [m for m in graph if m in reachable(m)] == []


def test_interop_uses_only_public_miss_jax_names() -> None:
    """`from miss_jax import X` with X in `miss_jax.__all__`, or `from miss_jax.<m> import y` with `m` a public
    module (in `__all__`; `y` public by the private-name test)."""
    import miss_jax

    used = {(m, n) for path, tree in sources().items() if path.startswith("interop")
            for m, n in project_imports(tree, "interop") if m.startswith("miss_jax")}
    bad = {(m, n) for m, n in used if (n if m == "miss_jax" else m.split(".")[1]) not in miss_jax.__all__}
    assert used and bad == set()


# The PEFT folder format: reads and writes adapter pytrees, NNX layers and adapter_config.json; below the lifecycle.
FOLDER_FORMAT = {"interop.peft_io", "interop.nnx_io", "interop.state_dict", "interop.names", "interop.lora",
                 "interop.safetensors_io", "interop.folder_write"}
# The lifecycle and what builds on the model classes.
LIFECYCLE = {"miss_jax.lifecycle", "miss_jax.model", "miss_jax.nnx", "miss_jax.nnx_generation", "miss_jax.train",
             "miss_jax.sharding"}


def reachable_from(graph: dict[str, set[str]], starts: set[str]) -> set[str]:
    """Every module some module of `starts` imports, directly or not."""
    seen: set[str] = set()
    todo = [d for s in starts for d in graph.get(s, ())]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return seen


def test_the_folder_format_sits_below_the_lifecycle() -> None:
    graph = import_graph()
    assert FOLDER_FORMAT <= set(graph) and LIFECYCLE <= set(graph)
    below = reachable_from(graph, FOLDER_FORMAT)
    # `miss_jax` itself (its __init__) imports the model classes: the folder format names its modules instead
    assert below & (LIFECYCLE | {"miss_jax"}) == set(), below & (LIFECYCLE | {"miss_jax"})
    used = {d for m, deps in graph.items() if m.startswith("miss_jax") for d in deps if d.startswith("interop")}
    assert used and used <= FOLDER_FORMAT, used - FOLDER_FORMAT
    assert {"interop.peft_io", "interop.nnx_io"} <= reachable_from(graph, {"miss_jax.model", "miss_jax.nnx"})


def lazy_imports(tree: ast.Module) -> list[str]:
    """The imports of project modules made inside functions (`def f(): from interop import x`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                names = ([inner.module or ""] if isinstance(inner, ast.ImportFrom) and not inner.level else
                         [a.name for a in inner.names] if isinstance(inner, ast.Import) else [])
                found += [f"line {inner.lineno}: {n}" for n in names if n.split(".")[0] in PACKAGES]
    return found


def test_miss_jax_imports_interop_at_the_top_of_its_modules() -> None:
    lazy = {path: found for path, tree in sources().items() if path.startswith("miss_jax")
            and (found := [f for f in lazy_imports(tree) if "interop" in f])}
    assert lazy == {}
    assert lazy_imports(ast.parse("def f():\n    from interop import peft_io\n")) == ["line 2: interop"]
