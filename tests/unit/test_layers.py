"""The package's imports go one way, down the layers, with no cycle and no function-level
import of our own modules (read from the source with `ast`, nothing is imported); the
package's top level loads what a name needs only when it is used."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import asyncpp

REPO = Path(__file__).resolve().parents[2]
# Lowest first: a module may import its own layer and the ones before it.
LAYERS = [
    ("core", ("asyncpp.core",)),
    ("model", ("asyncpp.model",)),
    ("worker", ("asyncpp.worker",)),
    ("executor", ("asyncpp.executor",)),
    ("engine", ("asyncpp.engine",)),
    ("api", ("asyncpp.template_renderer", "asyncpp.template_sandbox", "asyncpp.chat_template", "asyncpp.prompts",
             "asyncpp.engine_args", "asyncpp.async_llm", "asyncpp.llm", "asyncpp.client", "asyncpp")),
    ("server", ("asyncpp.server",)),
    ("cli", ("asyncpp.cli", "asyncpp.__main__", "asyncpp.bench", "asyncpp.testing")),
]


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def our_modules() -> dict[str, Path]:
    """Module name -> file, for asyncpp/ and server/ (installed as asyncpp.server)."""
    found = {}
    for root, package in ((REPO / "asyncpp", "asyncpp"), (REPO / "server", "asyncpp.server")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def normalise(name: str) -> str | None:
    """Our module named by an import, or None for third-party ones."""
    if name == "server" or name.startswith("server."):
        return "asyncpp." + name
    return name if name == "asyncpp" or name.startswith("asyncpp.") else None


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(our modules imported at module level, our imports made inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    top, nested = set(), []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            for name in filter(None, map(normalise, names)):
                (nested.append(f"{path.name}:{child.lineno} {name}") if in_function else top.add(name))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, nested


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    edges = {}
    for name, path in modules.items():
        top, _ = imports(path)
        edges[name] = {m for m in top if m in modules and m != name}  # `from pkg import submodule` too
    return edges


def test_imports_go_down_the_layers():
    upward = [f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
              for src, targets in graph().items() for dst in targets
              if layer_of(dst) > layer_of(src)]
    assert upward == []


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if nxt == "asyncpp" or (node == "asyncpp" or node.endswith(".__init__")):
                continue  # a package's __init__ re-exporting its own modules is not a cycle
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_no_function_level_imports_of_our_modules():
    nested = [entry for path in our_modules().values() for entry in imports(path)[1]]
    assert nested == []


def test_core_imports_nothing_else_of_ours():
    for name, targets in graph().items():
        if layer_of(name) == 0:
            assert all(layer_of(t) == 0 for t in targets), (name, targets)


def test_our_modules_import_names_from_their_defining_module():
    """`from asyncpp import X` inside the package would load every export (`__version__` is the package's own)."""
    through_package = []
    for path in our_modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "asyncpp" and node.level == 0:
                names = [a.name for a in node.names if a.name != "__version__"]
                through_package += [f"{path.name}:{node.lineno} {name}" for name in names]
    assert through_package == []


def test_the_http_client_loads_neither_torch_nor_transformers():
    code = ("import sys; from asyncpp import Client, SamplingParams, EngineDeadError; "
            "print(sorted(m for m in ('torch', 'transformers', 'asyncpp.async_llm') if m in sys.modules)); "
            "import asyncpp; print(asyncpp.AsyncLLM.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["[]", "asyncpp.async_llm"], result.stderr


def test_every_export_loads():
    assert set(asyncpp.__all__) == {*asyncpp._EXPORTS, "__version__"}
    assert all(getattr(asyncpp, name) is not None for name in asyncpp.__all__)
