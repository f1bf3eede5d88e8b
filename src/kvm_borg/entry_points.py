"""The plugins installed as packages: entry points of one group, read from the installed distributions.

What pluggy's `load_setuptools_entrypoints` finds through importlib.metadata, read directly: for every
directory on the import path (sys.path order), every `*.dist-info` (and `*.egg-info`) directory in it
that holds an `entry_points.txt` (the INI file pip writes from a package's
`[project.entry-points.GROUP]`, see the PyPA entry points specification). Importing importlib.metadata
costs ~60 ms of a kvm-borg start-up (email, zipfile, csv); this reads only the few small files that
exist, in a few milliseconds; configparser itself is imported only for a file that names the group.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

METADATA_SUFFIXES = (".dist-info", ".egg-info")


@dataclass(frozen=True)
class EntryPoint:
    """One entry point: its name, its object reference ("module:attr") and the file that declares it."""

    name: str
    value: str
    source: str


def parse(text: str, group: str, source: str) -> list[EntryPoint]:
    """Given the text of an entry_points.txt, a group and the file's path, return the group's entry points
    in file order (an unreadable file declares none)."""
    if f"[{group}]" not in text:  # configparser reads a section only from a line `[GROUP]`
        return []
    import configparser

    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None, strict=False)
    parser.optionxform = str  # names are case-sensitive
    try:
        parser.read_string(text, source=source)
    except configparser.Error:
        return []
    if not parser.has_section(group):
        return []
    return [EntryPoint(name.strip(), value.split("[", 1)[0].strip(), source) for name, value in parser.items(group)]


def find(group: str, directories: list[str] | None = None) -> list[EntryPoint]:
    """Given a group and the import path (default: sys.path), return the entry points of that group that
    the distributions installed there declare; the first of a name wins, as in import order."""
    found: dict[str, EntryPoint] = {}
    for directory in sys.path if directories is None else directories:
        try:
            names = sorted(os.listdir(directory or "."))
        except OSError:  # not a directory (a zip file), or gone
            continue
        for name in names:
            if not name.endswith(METADATA_SUFFIXES):
                continue
            path = os.path.join(directory or ".", name, "entry_points.txt")
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except (OSError, UnicodeDecodeError):
                continue
            for entry in parse(text, group, path):
                found.setdefault(entry.name, entry)
    return list(found.values())


def load(entry: EntryPoint):
    """Given an entry point, import its module and return the object it names ("module" or "module:attr.attr")."""
    module, _, attributes = entry.value.partition(":")
    target = importlib.import_module(module.strip())
    for attribute in filter(None, attributes.strip().split(".")):
        target = getattr(target, attribute)
    return target
