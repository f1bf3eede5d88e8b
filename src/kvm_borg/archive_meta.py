"""What an archive may say: validation of meta.json and of the names in it. Pure functions, no I/O.

Everything read from a repository is untrusted. The checkers here take a value from an archive
and return it (normalized) when it is well formed, or raise a UsageError naming the value.
`check_meta` walks a whole meta.json: a key of the wrong type, a missing key, a huge number,
a path that leaves the archive, a UUID that is not one, a format qemu-img does not know, a
domain name libvirt would refuse: one line, before anything is written.

Paths the archive records about the host it came from (`original_source`, backing `path`,
`firmware.nvram`) are informational only: they must be well formed (absolute, normalized) but
are never used as destinations (see restore_plan). So is a network disk's `network` (protocol, name,
hosts: short printable text, shown in a warning): restore never connects to a host an archive names.
"""

from __future__ import annotations

import posixpath
import re
import uuid as uuid_module

from kvm_borg.errors import UsageError

#: Image formats restore accepts and passes to qemu-img with -f: the formats of qemu-img's block
#: drivers that hold a disk image in one file. Nothing else ("host_device", "nbd", "raw/../x")
#: may become part of an argv or a file name.
IMAGE_FORMATS = frozenset({
    "raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "luks", "parallels", "dmg", "bochs", "cloop",
})
#: Largest virtual size accepted (qcow2's own limit is 2^61 bytes).
MAX_VIRTUAL_SIZE = 1 << 62
#: libvirt keeps `<name>.xml` and `<name>_VARS.fd` files: names stay well below NAME_MAX (255 bytes).
MAX_DOMAIN_NAME_BYTES = 200
MAX_DISKS = 1024
MAX_FILES = 4096
#: Disk layouts an archive may name: a stored image file ("image", the default) or a directory of
#: fixed-size segment files with a manifest ("segments", the bitmap method; see kvm_borg.pipeline.segments_read).
LAYOUTS = frozenset({"image", "segments"})
#: Segment sizes accepted from an archive: multiples of 64 KiB from 64 KiB to 1 GiB (the config's range).
SEGMENT_ALIGN = 64 << 10
MAX_SEGMENT_SIZE = 1 << 30
#: Most segments one disk may have (names have 8 digits up to 10**8; more widen the name): 2**32.
MAX_SEGMENT_COUNT = 1 << 32
#: The formats a segmented disk is restored in (its content is raw; qcow2 is converted at restore).
SEGMENT_FORMATS = frozenset({"raw", "qcow2"})
#: A network disk's protocol as libvirt names it (nbd, rbd, iscsi, gluster, http...), and its hosts' count.
NETWORK_PROTOCOL_RE = re.compile(r"^[a-z][a-z0-9+]{0,15}$")
MAX_NETWORK_HOSTS = 16
_TARGET_RE = re.compile(r"^[a-z][a-z0-9]{0,31}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# --- single values -----------------------------------------------------------------------------


def check_archive_path(path: object, what: str = "archive path") -> str:
    """Given a path an archive names, return it normalized; absolute or escaping ("..") ones are a UsageError."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UsageError(f"archive names an invalid {what}: {path!r}")
    if path.startswith("/"):
        raise UsageError(f"archive names an absolute {what}, refused: {path!r}")
    normalized = posixpath.normpath(path)
    if normalized in (".", "..") or normalized.startswith("../") or ".." in path.split("/"):
        raise UsageError(f"archive names a {what} outside the archive, refused: {path!r}")
    return normalized


def check_host_path(path: object, what: str = "host path") -> str:
    """Given a host path an archive records (informational), return it; relative, ".." or redundant ones are a UsageError."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UsageError(f"archive names an invalid {what}: {path!r}")
    if not path.startswith("/"):
        raise UsageError(f"archive names a relative {what}, refused: {path!r}")
    if ".." in path.split("/") or posixpath.normpath(path) != path:
        raise UsageError(f"archive names a {what} with '..' or redundant parts, refused: {path!r}")
    if path == "/" or path.endswith("/"):
        raise UsageError(f"archive names a directory as {what}, refused: {path!r}")
    return path


def check_relative_path(path: object, what: str) -> str:
    """Given a path below a directory (a TPM state file), return it; absolute, empty, "." or ".." parts are a UsageError."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UsageError(f"archive names an invalid {what}: {path!r}")
    if path.startswith("/"):
        raise UsageError(f"archive names an absolute {what}, refused: {path!r}")
    parts = path.split("/")
    if ".." in parts:
        raise UsageError(f"archive names a {what} outside its directory, refused: {path!r}")
    if any(part in ("", ".") for part in parts):
        raise UsageError(f"archive names a {what} with empty or '.' parts, refused: {path!r}")
    return path


def check_file_name(name: object, what: str = "file name") -> str:
    """Given one file name, return it; empty, ".", "..", or one holding "/" or control characters is a UsageError."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or _CONTROL_RE.search(name):
        raise UsageError(f"invalid {what}: {name!r}")
    return name


def check_target(target: object) -> str:
    """Given a disk target from an archive (e.g. "vda"), return it; anything but a plain device name is a UsageError."""
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise UsageError(f"archive names an invalid disk target: {target!r}")
    return target


def check_format(fmt: object, what: str = "image format") -> str:
    """Given an image format from an archive, return it if qemu-img knows it (IMAGE_FORMATS); else a UsageError."""
    if not isinstance(fmt, str) or fmt not in IMAGE_FORMATS:
        raise UsageError(f"archive names an invalid {what}: {fmt!r} (known: {', '.join(sorted(IMAGE_FORMATS))})")
    return fmt


def check_uuid(value: object, what: str = "domain UUID") -> str:
    """Given a UUID from an archive, return it (lower case) if it survives a uuid.UUID round trip; else a UsageError."""
    try:
        parsed = uuid_module.UUID(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != value.lower():
        raise UsageError(f"archive names an invalid {what}: {value!r}")
    return str(parsed)


def domain_name_problem(name: object) -> str | None:
    """Given a domain name, return why libvirt (or a file named after it) would refuse it, or None if it is fine."""
    if not isinstance(name, str) or not name.strip():
        return "it is empty"
    if "/" in name:
        return "it contains '/'"
    if _CONTROL_RE.search(name):
        return "it contains control characters"
    if name in (".", ".."):
        return "it is '.' or '..'"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_DOMAIN_NAME_BYTES:
        return f"it is longer than {MAX_DOMAIN_NAME_BYTES} bytes"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    return None


def check_domain_name(name: object, what: str = "archive names an invalid domain name") -> str:
    """Given a domain name, return it if libvirt would take it (domain_name_problem); else a UsageError."""
    problem = domain_name_problem(name)
    if problem is not None:
        raise UsageError(f"{what} {name!r}: {problem}")
    return name  # type: ignore[return-value]


def check_size(value: object, what: str) -> int:
    """Given a byte count from an archive, return it; a non-integer, negative or huge one is a UsageError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VIRTUAL_SIZE:
        raise UsageError(f"archive meta.json: {what}: expected a size in bytes, got {value!r}")
    return value


def check_segments(disk: dict, where: str) -> dict | None:
    """Given one disk entry of meta.json (target, virtual_size already checked) and where it is ("disks[0]"),
    return its `segments` object ({"size", "count"}) when its `layout` is "segments", None for an image
    (`layout` absent or "image"); a layout that is not known, a segment size that is not a multiple of
    64 KiB within 64 KiB..1 GiB, a count that does not cover the virtual size exactly, or a segmented disk
    with backing files is a UsageError."""
    layout = disk.get("layout", "image")
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise UsageError(f"archive meta.json: {where}.layout: expected one of {', '.join(sorted(LAYOUTS))}, "
                         f"got {layout!r}")
    if layout == "image":
        if disk.get("segments") is not None:
            raise UsageError(f"archive meta.json: {where}.segments: given for a disk whose layout is not segments")
        return None
    segments = _type(disk.get("segments"), dict, f"{where}.segments", "an object")
    size, count = segments.get("size"), segments.get("count")
    if (isinstance(size, bool) or not isinstance(size, int) or not SEGMENT_ALIGN <= size <= MAX_SEGMENT_SIZE
            or size % SEGMENT_ALIGN):
        raise UsageError(f"archive meta.json: {where}.segments.size: expected a multiple of 64 KiB from 64 KiB "
                         f"to 1 GiB, got {size!r}")
    expected = -(-disk["virtual_size"] // size)
    if isinstance(count, bool) or not isinstance(count, int) or count != expected or count > MAX_SEGMENT_COUNT:
        raise UsageError(f"archive meta.json: {where}.segments.count: expected {expected} segments of {size} bytes "
                         f"for {disk['virtual_size']} bytes, got {count!r}")
    if disk.get("backing_chain"):
        raise UsageError(f"archive meta.json: {where}.backing_chain: a segmented disk has no backing files")
    if disk.get("format") not in SEGMENT_FORMATS:
        raise UsageError(f"archive meta.json: {where}.format: a segmented disk is restored as "
                         f"{' or '.join(sorted(SEGMENT_FORMATS))}, not {disk.get('format')!r}")
    return segments


# --- the whole meta.json -----------------------------------------------------------------------


def _type(value: object, types, where: str, expected: str, optional: bool = False):
    if value is None and optional:
        return value
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise UsageError(f"archive meta.json: {where}: expected {expected}, got {value!r}")
    if not isinstance(value, types):
        shown = repr(value) if len(repr(value)) <= 80 else type(value).__name__
        raise UsageError(f"archive meta.json: {where}: expected {expected}, got {shown}")
    return value


def _text(value: object, where: str, limit: int, optional: bool = True) -> str | None:
    """A string of at most `limit` characters and no control character (it is printed in warnings)."""
    text = _type(value, str, where, "a string", optional=optional)
    if text is not None and (len(text) > limit or _CONTROL_RE.search(text)):
        raise UsageError(f"archive meta.json: {where}: longer than {limit} characters or with a control character")
    return text


def check_network(network: object, where: str) -> dict | None:
    """Given a disk's `network` entry (a network disk at backup time: protocol, name, hosts), return it when
    well formed, None when absent; else a UsageError. Informational only: restore prints it in a warning
    and never connects to these hosts, so it needs only to be short, printable text."""
    if network is None:
        return None
    where = f"{where}.network"
    network = _type(network, dict, where, "an object")
    protocol = _text(network.get("protocol"), f"{where}.protocol", 16, optional=False)
    if not NETWORK_PROTOCOL_RE.match(protocol):
        raise UsageError(f"archive meta.json: {where}.protocol: not a disk protocol: {protocol!r}")
    _text(network.get("name"), f"{where}.name", 1024)
    for index, host in enumerate(_list(network.get("hosts"), f"{where}.hosts", MAX_NETWORK_HOSTS)):
        host_where = f"{where}.hosts[{index}]"
        _type(host, dict, host_where, "an object")
        _text(host.get("name"), f"{host_where}.name", 255)
        port = _text(host.get("port"), f"{host_where}.port", 5)
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise UsageError(f"archive meta.json: {host_where}.port: not a port: {port!r}")
        transport = _text(host.get("transport"), f"{host_where}.transport", 8)
        if transport is not None and transport not in ("tcp", "unix", "rdma"):
            raise UsageError(f"archive meta.json: {host_where}.transport: not tcp, unix or rdma: {transport!r}")
        if host.get("socket") is not None:
            check_host_path(host.get("socket"), f"socket of {host_where}")
    return network


def _list(value: object, where: str, limit: int, optional: bool = True) -> list:
    if value is None and optional:
        return []
    items = _type(value, list, where, "a list")
    if len(items) > limit:
        raise UsageError(f"archive meta.json: {where}: more than {limit} entries")
    return items


def check_meta(meta: object) -> dict:
    """Given a parsed meta.json, return it if every key restore reads is there with the right type and a sane
    value; otherwise raise a UsageError naming the key ("archive meta.json: disks[0].format: ...")."""
    meta = _type(meta, dict, "top level", "an object")
    if meta.get("kvm_borg") != 1 or isinstance(meta.get("kvm_borg"), bool):
        raise UsageError(f"archive meta.json: kvm_borg: expected format 1, got {meta.get('kvm_borg')!r}")
    domain = _type(meta.get("domain"), dict, "domain", "an object")
    check_domain_name(domain.get("name"), "archive meta.json: domain.name: invalid domain name")
    check_uuid(domain.get("uuid"))
    for key in ("host", "archive", "created", "consistency"):
        _type(meta.get(key), str, key, "a string", optional=True)
    disks = _list(meta.get("disks"), "disks", MAX_DISKS, optional=False)
    seen = set()
    for index, disk in enumerate(disks):
        where = f"disks[{index}]"
        _type(disk, dict, where, "an object")
        target = check_target(disk.get("target"))
        if target in seen:
            raise UsageError(f"archive meta.json: {where}: disk {target} appears twice")
        seen.add(target)
        check_format(disk.get("format"), f"image format of disk {target}")
        check_size(disk.get("virtual_size"), f"{where}.virtual_size")
        check_archive_path(disk.get("archive_path"), f"image of disk {target}")
        check_segments(disk, where)
        network = check_network(disk.get("network"), where)
        if network is None or disk.get("original_source") is not None:
            check_host_path(disk.get("original_source"), f"original source of disk {target}")
        _type(disk.get("block_device"), bool, f"{where}.block_device", "true or false", optional=True)
        for key in ("source_type", "read_from"):
            _type(disk.get(key), str, f"{where}.{key}", "a string", optional=True)
        _type(disk.get("owner"), dict, f"{where}.owner", "an object", optional=True)
        for layer_index, layer in enumerate(_list(disk.get("backing_chain"), f"{where}.backing_chain", 64)):
            layer_where = f"{where}.backing_chain[{layer_index}]"
            _type(layer, dict, layer_where, "an object")
            check_host_path(layer.get("path"), f"backing file of disk {target}")
            check_archive_path(layer.get("archive_path"), f"backing file of disk {target}")
            if layer.get("format") is not None:
                check_format(layer.get("format"), f"format of a backing file of disk {target}")
    for index, skipped in enumerate(_list(meta.get("skipped_disks"), "skipped_disks", MAX_DISKS)):
        _type(skipped, dict, f"skipped_disks[{index}]", "an object")
        _type(skipped.get("target"), str, f"skipped_disks[{index}].target", "a string")
        _type(skipped.get("reason"), str, f"skipped_disks[{index}].reason", "a string", optional=True)
    files = _type(meta.get("files"), dict, "files", "an object")
    check_archive_path(files.get("domain_xml"), "domain XML")
    for key in ("domain_live_xml", "nvram"):
        if files.get(key) is not None:
            check_archive_path(files.get(key), f"files.{key}")
    for index, item in enumerate(_list(files.get("tpm_state"), "files.tpm_state", MAX_FILES)):
        _type(item, dict, f"files.tpm_state[{index}]", "an object")
        check_relative_path(item.get("relative"), "TPM state file")
        check_archive_path(item.get("archive_path"), "TPM state file")
    for key in ("networks", "storage_pools"):
        for name, path in (_type(files.get(key), dict, f"files.{key}", "an object", optional=True) or {}).items():
            check_archive_path(path, f"files.{key}.{name}")
    firmware = _type(meta.get("firmware"), dict, "firmware", "an object", optional=True)
    if firmware:
        for key in ("loader", "loader_type", "nvram_template", "nvram_missing"):
            _type(firmware.get(key), str, f"firmware.{key}", "a string", optional=True)
        if firmware.get("nvram") is not None:
            check_host_path(firmware.get("nvram"), "NVRAM path")
    tpm = _type(meta.get("tpm"), dict, "tpm", "an object", optional=True)
    if tpm:
        _type(tpm.get("missing"), str, "tpm.missing", "a string", optional=True)
    return meta
