"""The rules that keep the house: only the engine imports libvirt, and the verbs (actions/) share code only
through actions/common.py. Read from the source with `ast` (imports inside functions count too)."""

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
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


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
