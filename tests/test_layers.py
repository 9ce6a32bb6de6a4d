"""Imports point one way: every module of the package imports only from its own layer
or the layers below it, and no modules import each other in a circle.

The layers, lowest first, follow the data flow (README, "Where things are"):
settings; text (chat template, behaviour detectors); storage (tables, votes,
arena results); model (loading, 4-bit layers, kernels, decoder, heads); generation
(the model worker, sampling, modes); learning (reward model, PPO, guards, the
training loop); serving (what a person meets); runtime (builds the services of a
role); evaluation (labelers, the simulation); the command line on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_chat"
LAYERS = ("config", "text", "storage", "model", "generation", "learning", "serving", "runtime", "evaluation", "cli")
TOP = {"__main__": "cli", "__init__": "config"}  # top-level modules that are not a layer of their own


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``rlhf_chat.learning.ppo`` for ``.../rlhf_chat/learning/ppo.py`` (a package's ``__init__`` is the package)."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The rank of ``module``'s layer in :data:`LAYERS` (0 is the lowest)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS.index(TOP.get(name, name))


def imported_modules(source: str, module: str, modules: set[str]) -> set[str]:
    """The package's modules that ``source`` (of ``module``) imports, anywhere in it
    (a function-level import counts as much as one at the top)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import, resolved against the importing module's package
                anchor = module.split(".")[: -node.level] if not module_is_package(module, modules) else module.split(".")
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `from pkg import function` names the module pkg
                name = name.rpartition(".")[0]
            if name and name != "rlhf_chat" and name != module:
                found.add(name)
    return found


def module_is_package(module: str, modules: set[str]) -> bool:
    """Whether ``module`` is a package (other modules live under it)."""
    return any(other.startswith(module + ".") for other in modules)


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, for ``sources`` (module -> its text)."""
    modules = set(sources)
    return {module: imported_modules(text, module, modules) for module, text in sources.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module from a layer above its own, as 'a (layer) imports b (layer)'."""
    return sorted(
        f"{module} ({LAYERS[layer_of(module)]}) imports {target} ({LAYERS[layer_of(target)]})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the modules on it (Tarjan's strongly connected components
    of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_sources() -> dict[str, str]:
    """Every module of the package, by name, with its text."""
    return {module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_sits_in_a_known_layer():
    for module in package_sources():
        assert layer_of(module) >= 0, module


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(import_graph(package_sources())) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph(package_sources())) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    """One added upward import (storage reaching into serving, as store.py once imported
    the sampler's Candidate), and a circle inside one layer, are both reported."""
    sources = package_sources()
    sources["rlhf_chat.storage.store"] += "\nfrom rlhf_chat.generation.candidates import sample\n"
    graph = import_graph(sources)
    assert upward_imports(graph) == [
        "rlhf_chat.storage.store (storage) imports rlhf_chat.generation.candidates (generation)"
    ]
    sources = package_sources()
    sources["rlhf_chat.learning.ppo_math"] += "\ndef later():\n    from rlhf_chat.learning import ppo\n"
    found = circles(import_graph(sources))
    assert len(found) == 1 and {"rlhf_chat.learning.ppo", "rlhf_chat.learning.ppo_math"} <= set(found[0])
