"""Which method backs up a domain: `snapshot` (external snapshot, whole images) or `bitmap` (a
libvirt pull-mode backup job, changed segments only). Pure."""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Callable, Iterable, Mapping

METHODS = ("auto", "snapshot", "bitmap")
# qcow2 "compat" 0.10 (version 2) cannot hold persistent bitmaps; 1.1 (version 3) can.
QCOW2_WITHOUT_BITMAPS = "0.10"
#: What the bitmap method needs in kvm-borg's own Python, and where it comes from.
BITMAP_MODULES = {"nbd": "install python3-libnbd and run scripts/setup.sh, with a Python 3.11 venv",
                  "pyfuse3": "pip install pyfuse3 (borgbackup[pyfuse3])"}


def configured_method(configured: str, domains_method: Mapping[str, str], name: str) -> str:
    """Given the config's `method`, its `domains_method` ({domain name or glob: method}) and a domain's
    name, return the method configured for that domain: its exact name's entry, else the first glob
    (in the mapping's order) that matches it, else `method`."""
    if name in domains_method:
        return domains_method[name]
    for pattern, method in domains_method.items():
        if fnmatch.fnmatchcase(name, pattern):
            return method
    return configured


def holds_bitmaps(fmt: str, qcow2_compat: str | None) -> bool:
    """Given a disk's format and its qcow2 compat level (None when not qcow2 or unknown), return whether
    its image can carry a persistent dirty bitmap (qcow2 version 3)."""
    return fmt == "qcow2" and qcow2_compat is not None and qcow2_compat != QCOW2_WITHOUT_BITMAPS


def choose_method(configured: str, domains_method: Mapping[str, str], name: str, running: bool,
                  disk_formats: Iterable[tuple[str, str | None]], network: bool = False) -> str:
    """Given the config's `method` and `domains_method`, a domain's name, whether it runs, its chosen
    disks' [(format, qcow2 compat or None)] and whether one of them is a network disk, return "snapshot"
    or "bitmap": the configured method, where `auto` means bitmap for a running domain with at least one
    qcow2 v3 disk or a network disk (only the bitmap method's backup job reads one), else snapshot."""
    method = configured_method(configured, domains_method, name)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if method != "auto":
        return method
    wants_bitmap = network or any(holds_bitmaps(fmt, compat) for fmt, compat in disk_formats)
    return "bitmap" if running and wants_bitmap else "snapshot"


def network_disk_reason(method: str, running: bool, configured: str, why_not_bitmap: str | None = None) -> str | None:
    """Given the method chosen for a domain, whether it runs, the method configured for it and (when `auto`
    fell back to snapshot) why the bitmap method cannot run here, return why its network disks are left
    out of this backup (a skip reason starting "network disk"), or None when they are read: only a running
    domain's pull-mode backup job (the bitmap method) reads a network disk; an external snapshot would
    have to create an overlay on the network storage, and a shut-off domain has no QEMU to read through."""
    if method == "bitmap" and running:
        return None
    if not running:
        return "network disk of a shut-off domain: only a running domain's backup job reads it; back it up running"
    if configured == "snapshot":
        return "network disk: method snapshot cannot read it; set method auto or bitmap for this domain"
    return f"network disk: the bitmap method cannot run here ({why_not_bitmap or 'see kvm-borg doctor'})"


def missing_bitmap_modules(find_spec: Callable[[str], object] = importlib.util.find_spec) -> list[str]:
    """Return, per module of BITMAP_MODULES that `find_spec` does not find (nothing is imported), one line
    saying so and where it comes from; empty when all are there."""
    return [f"no module {name} ({source})" for name, source in BITMAP_MODULES.items() if find_spec(name) is None]
