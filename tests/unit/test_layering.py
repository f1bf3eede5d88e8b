"""The rules that keep the house: only the engine imports libvirt, the verbs (actions/) share code only
through actions/common.py and only the CLI imports a verb, and no module imports itself back in a cycle. Read from the source with `ast` (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import kvm_borg

PACKAGE = Path(kvm_borg.__file__).parent
LIBVIRT_MODULES = {"libvirt", "libvirt_qemu", "libvirt_lxc"}


def imported_modules(source: str, package: str) -> set[str]:
    """Given a module's source and the package it is in, return every module (and `from` name) it imports,
    as absolute names (`from . import x` resolved)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def from_base(node: ast.ImportFrom, package: str) -> str:
    """Given a `from X import ...` node and the package of its module, return X as an absolute name."""
    base = node.module or ""
    if node.level:
        parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{parent}.{base}" if base else parent
    return base


def imports_of(path: Path) -> set[str]:
    """Given a module of kvm_borg, return what it imports (see imported_modules)."""
    package = ".".join(("kvm_borg",) + path.relative_to(PACKAGE).parent.parts)
    return imported_modules(path.read_text(encoding="utf-8"), package)


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones():
    source = "def f():\n    import libvirt_qemu\nfrom . import restore\nfrom ..engine import lifecycle\n"
    assert {"libvirt_qemu", "kvm_borg.actions.restore", "kvm_borg.engine.lifecycle"} <= \
        imported_modules(source, "kvm_borg.actions")


def test_only_the_engine_imports_libvirt():
    outside = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "engine"]
    offenders = {str(p.relative_to(PACKAGE)): sorted(imports_of(p) & LIBVIRT_MODULES) for p in sorted(outside)}
    offenders = {name: mods for name, mods in offenders.items() if mods}
    assert not offenders, f"libvirt imported outside engine/: {offenders}"


def test_verbs_share_code_only_through_actions_common():
    offenders = {}
    for path in sorted((PACKAGE / "actions").glob("*.py")):
        other_verbs = {m for m in imports_of(path)
                       if m.startswith("kvm_borg.actions.") and m.count(".") == 2
                       and m not in ("kvm_borg.actions.common", f"kvm_borg.actions.{path.stem}")}
        if other_verbs:
            offenders[path.name] = sorted(other_verbs)
    assert not offenders, f"a verb imports another verb: {offenders}"


def module_name(path: Path) -> str:
    """Given a file of kvm_borg, return its module name (a package's __init__ is the package)."""
    parts = ("kvm_borg",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Return {module: the kvm_borg modules it imports} over every module of kvm_borg (`from a import b`
    counts as importing a.b when that is a module, else a)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = from_base(node, package)
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {m for m in targets if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Given a graph {node: successors}, return one cycle as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_there_is_no_import_cycle_in_kvm_borg():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 150  # the reader sees the package's imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_nothing_outside_the_cli_imports_a_verb():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name.startswith("kvm_borg.actions") or name in ("kvm_borg.cli", "kvm_borg.cli_args"):
            continue
        verbs = sorted(m for m in imports_of(path) if m.startswith("kvm_borg.actions"))
        if verbs:
            offenders[name] = verbs
    assert not offenders, f"imports a verb (only the CLI may): {offenders}"


def test_backends_and_the_engine_meet_only_in_the_pipeline():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] not in ("engine", "backends"):
            continue
        other = "kvm_borg.backends" if parts[0] == "engine" else "kvm_borg.engine"
        upward = ("kvm_borg.pipeline", "kvm_borg.actions", "kvm_borg.cli", other)
        found = sorted(m for m in imports_of(path) if m.startswith(upward))
        if found:
            offenders[module_name(path)] = found
    assert not offenders, f"engine/backends import each other or upwards: {offenders}"
