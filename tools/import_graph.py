"""The module-level import graph of the installed edgemoe package (function-local and
TYPE_CHECKING imports included, as grimp reads every import statement): its cycles and
the edges between the package's layers. Fails on a cycle, and on a submodule importing the
package's __init__ for anything but the native core.

    python tools/import_graph.py            # exits 1 on a cycle
    python tools/import_graph.py --edges    # also every edge between top-level subpackages

Run it where `import edgemoe` finds an installed (non-editable) copy: the wheel maps the
top-level converters/ and devices/ folders to edgemoe.converters and edgemoe.devices.
"""

from __future__ import annotations

import argparse
import sys

import grimp


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over the module graph: components of more than one module are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(root: str) -> None:
        nonlocal counter
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return out


def with_native_core(graph: grimp.ImportGraph, package: str) -> list[str]:
    """grimp reads .py files only, so `from .. import _core` looks like an import of the package
    itself (its __init__); point those edges at a node for the compiled core instead. Returns
    the modules that import the package's __init__ for anything else (none should: the
    layers contract ignores these edges on the strength of this check)."""
    core = f"{package}._core"
    graph.add_module(core)
    others = []
    for importer in sorted(graph.find_modules_that_directly_import(package)):
        details = graph.get_import_details(importer=importer, imported=package)
        if details and all("_core" in d["line_contents"] for d in details):
            graph.remove_import(importer=importer, imported=package)
            graph.add_import(importer=importer, imported=core)
        else:
            others.append(importer)
    return others


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    ap.add_argument("--package", default="edgemoe")
    ap.add_argument("--edges", action="store_true", help="print the edges between top-level subpackages")
    args = ap.parse_args(argv)
    graph = grimp.build_graph(args.package)
    root_importers = with_native_core(graph, args.package)
    modules = sorted(graph.modules)
    edges = sum(len(graph.find_modules_directly_imported_by(m)) for m in modules)
    cycles = strongly_connected(graph)
    print(f"{len(modules)} modules, {edges} imports; {len(cycles)} cycle(s)")
    for comp in cycles:
        print(f"  cycle of {len(comp)}: {', '.join(comp)}")
    for m in root_importers:
        print(f"  {m} imports the {args.package} package itself for more than _core: import the module it needs")
    if args.edges:

        def top(m: str) -> str:
            parts = m.split(".")
            return ".".join(parts[:2])

        pairs = sorted(
            {(top(a), top(b)) for a in modules for b in graph.find_modules_directly_imported_by(a) if top(a) != top(b)}
        )
        for a, b in pairs:
            print(f"  {a} -> {b}")
    return 1 if cycles or root_importers else 0


if __name__ == "__main__":
    sys.exit(main())
