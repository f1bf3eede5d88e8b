"""What a domain needs from its host besides its disks, captured at backup time for restore.

- the per-VM UEFI variable store (`<os><nvram>`) and the loader path and type;
- the emulated TPM's state directory (/var/lib/libvirt/swtpm/<uuid>/) for a swtpm TPM;
- the XML of the libvirt networks its interfaces use and of the storage pools holding its images;
- the owner and mode of every image, so a restore can give them back.

`capture` reads all that and returns it as data (file contents in memory, to be written into
the staging directory next to meta.json). A piece the domain refers to but that cannot be read
is not skipped silently: it becomes a warning and a `missing` entry in meta.json.
"""

from __future__ import annotations

import grp
import logging
import os
import posixpath
import pwd
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

log = logging.getLogger(__name__)

TPM_STATE_ROOT = "/var/lib/libvirt/swtpm"
NVRAM_NAME = "nvram.fd"
TPM_DIR_NAME = "tpm"
NETWORK_PREFIX = "network-"
POOL_PREFIX = "pool-"
# An NVRAM file is a few MiB; TPM state a few KiB. Anything far larger is not what we think it is.
MAX_STATE_FILE_BYTES = 256 << 20


@dataclass
class HostState:
    """What `capture` found: meta.json fields, files to stage (name in staging -> bytes), warnings."""

    firmware: dict | None = None
    tpm: dict | None = None
    files: dict = field(default_factory=dict)  # goes into meta["files"]
    staged: dict[str, bytes] = field(default_factory=dict)
    networks: list[str] = field(default_factory=list)
    storage_pools: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


# --- pure: what the XML refers to ---------------------------------------------------------------


def firmware_record(persistent_xml: str, live_xml: str | None) -> dict | None:
    """Given a domain's persistent and live XML, return its loader/NVRAM facts, or None for BIOS without NVRAM.

    libvirt may fill in `<loader>`/`<nvram>` only in the live XML (firmware auto-selection), so
    each value falls back to the live one."""
    records = []
    for text in (persistent_xml, live_xml):
        if not text:
            continue
        os_node = ET.fromstring(text).find("os")
        if os_node is None:
            continue
        loader = os_node.find("loader")
        nvram = os_node.find("nvram")
        records.append({
            "firmware": os_node.get("firmware"),
            "loader": loader.text.strip() if loader is not None and loader.text else None,
            "loader_type": loader.get("type") if loader is not None else None,
            "loader_readonly": loader.get("readonly") if loader is not None else None,
            "loader_secure": loader.get("secure") if loader is not None else None,
            "nvram": nvram.text.strip() if nvram is not None and nvram.text else None,
            "nvram_template": nvram.get("template") if nvram is not None else None,
        })
    if not records:
        return None
    merged = {key: next((r[key] for r in records if r[key]), None) for key in records[0]}
    if not merged["nvram"] and merged["loader_type"] != "pflash" and merged["firmware"] != "efi":
        return None
    return merged


def tpm_emulator(domain_xml: str) -> dict | None:
    """Given a domain XML, return {model, version, encrypted} of its emulated (swtpm) TPM, or None."""
    root = ET.fromstring(domain_xml)
    for tpm in root.findall("./devices/tpm"):
        backend = tpm.find("backend")
        if backend is not None and backend.get("type") == "emulator":
            return {
                "model": tpm.get("model"),
                "version": backend.get("version"),
                "encrypted": backend.find("encryption") is not None,
            }
    return None


def _source_names(domain_xml: str, device: str, kind: str, attribute: str) -> list[str]:
    """Given a domain XML, a device tag, its `type` and an attribute of its <source>, return the values of that
    attribute over the devices of that type, once each, in document order."""
    names = []
    for node in ET.fromstring(domain_xml).findall(f"./devices/{device}"):
        source = node.find("source")
        if node.get("type") == kind and source is not None and source.get(attribute):
            names.append(source.get(attribute))
    return list(dict.fromkeys(names))


def interface_networks(domain_xml: str) -> list[str]:
    """Given a domain XML, return the libvirt networks its interfaces use, once each."""
    return _source_names(domain_xml, "interface", "network", "network")


def volume_pools(domain_xml: str) -> list[str]:
    """Given a domain XML, return the storage pools its `type='volume'` disks name, once each."""
    return _source_names(domain_xml, "disk", "volume", "pool")


def staging_archive_path(staging_dir: str, name: str) -> str:
    """Given the staging dir and a staged file's name, return its path inside the archive."""
    return posixpath.join(staging_dir, name).lstrip("/")


# --- I/O ----------------------------------------------------------------------------------------


def file_owner(path: str) -> dict | None:
    """Given a path, return {uid, gid, user, group, mode} of it (None if it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {
        "uid": st.st_uid,
        "gid": st.st_gid,
        "user": _user_name(st.st_uid),
        "group": _group_name(st.st_gid),
        "mode": stat.S_IMODE(st.st_mode),
    }


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _read_small(path: str) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_STATE_FILE_BYTES + 1)
    if len(data) > MAX_STATE_FILE_BYTES:
        raise OSError(f"larger than {MAX_STATE_FILE_BYTES} bytes")
    return data


def capture(conn: libvirt.virConnect, uuid: str, persistent_xml: str, live_xml: str | None,
            disk_sources: list[str], staging_dir: str) -> HostState:
    """Given a connection, the domain's UUID and XMLs, its images and the staging dir, return its HostState."""
    state = HostState()
    current_xml = live_xml or persistent_xml
    _capture_nvram(state, persistent_xml, live_xml, staging_dir)
    _capture_tpm(state, current_xml, uuid, staging_dir)
    _capture_networks(state, conn, current_xml, staging_dir)
    _capture_pools(state, conn, current_xml, disk_sources, staging_dir)
    return state


def _capture_nvram(state: HostState, persistent_xml: str, live_xml: str | None, staging_dir: str) -> None:
    firmware = firmware_record(persistent_xml, live_xml)
    state.firmware = firmware
    if not firmware:
        return
    if not firmware.get("nvram"):
        firmware["nvram_missing"] = "the domain XML names no NVRAM file (firmware='efi' not started yet?)"
        state.missing.append(f"NVRAM: {firmware['nvram_missing']}")
        return
    path = firmware["nvram"]
    try:
        state.staged[NVRAM_NAME] = _read_small(path)
    except OSError as exc:
        firmware["nvram_missing"] = f"cannot read {path}: {exc.strerror or exc}"
        state.missing.append(f"NVRAM: {firmware['nvram_missing']}")
        return
    firmware["owner"] = file_owner(path)
    state.files["nvram"] = staging_archive_path(staging_dir, NVRAM_NAME)


def _capture_tpm(state: HostState, domain_xml: str, uuid: str, staging_dir: str) -> None:
    tpm = tpm_emulator(domain_xml)
    if tpm is None:
        return
    tpm["state_dir"] = posixpath.join(TPM_STATE_ROOT, uuid)
    state.tpm = tpm
    root = Path(tpm["state_dir"])
    entries = []
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError as exc:
        files, tpm["missing"] = [], f"cannot read {root}: {exc.strerror or exc}"
    if not files and "missing" not in tpm:
        tpm["missing"] = f"{root} holds no TPM state (the domain never started?)"
    for path in files:
        relative = path.relative_to(root).as_posix()
        if path.name.endswith(".lock") or path.name.endswith(".pid"):
            continue
        try:
            data = _read_small(str(path))
        except OSError as exc:
            tpm["missing"] = f"cannot read {path}: {exc.strerror or exc}"
            continue
        staged_name = posixpath.join(TPM_DIR_NAME, relative)
        state.staged[staged_name] = data
        entries.append({"relative": relative, "archive_path": staging_archive_path(staging_dir, staged_name),
                        "owner": file_owner(str(path))})
    if tpm.get("missing"):
        state.missing.append(f"TPM state: {tpm['missing']}")
    if tpm["encrypted"]:
        state.missing.append("TPM state is encrypted with a libvirt secret that is not in the archive")
    state.files["tpm_state"] = entries


def _capture_networks(state: HostState, conn: libvirt.virConnect, domain_xml: str, staging_dir: str) -> None:
    networks = {}
    for name in interface_networks(domain_xml):
        try:
            xml = conn.networkLookupByName(name).XMLDesc(0)
        except libvirt.libvirtError as exc:
            state.missing.append(f"network {name!r}: {exc.get_error_message()}")
            continue
        staged_name = f"{NETWORK_PREFIX}{len(networks)}.xml"
        state.staged[staged_name] = xml.encode()
        networks[name] = staging_archive_path(staging_dir, staged_name)
        state.networks.append(name)
    if networks:
        state.files["networks"] = networks


def _capture_pools(state: HostState, conn: libvirt.virConnect, domain_xml: str, disk_sources: list[str],
                   staging_dir: str) -> None:
    pools: dict[str, str] = {}

    def add(pool: libvirt.virStoragePool) -> None:
        name = pool.name()
        if name in pools:
            return
        staged_name = f"{POOL_PREFIX}{len(pools)}.xml"
        state.staged[staged_name] = pool.XMLDesc(0).encode()
        pools[name] = staging_archive_path(staging_dir, staged_name)
        state.storage_pools.append(name)

    for name in volume_pools(domain_xml):
        try:
            add(conn.storagePoolLookupByName(name))
        except libvirt.libvirtError as exc:
            state.missing.append(f"storage pool {name!r}: {exc.get_error_message()}")
    for source in disk_sources:
        try:
            pool = conn.storageVolLookupByPath(source).storagePoolLookupByVolume()
        except libvirt.libvirtError:
            continue  # an image outside every pool: nothing to capture
        add(pool)
    if pools:
        state.files["storage_pools"] = pools


def add_to_meta(meta: dict, state: HostState, disk_owners: dict[str, dict | None]) -> None:
    """Given meta.json, a HostState and {target: owner of its image}, record them in meta.json."""
    meta["firmware"] = state.firmware
    meta["tpm"] = state.tpm
    meta["networks"] = state.networks
    meta["storage_pools"] = state.storage_pools
    meta["missing"] = state.missing
    meta["files"].update(state.files)
    for disk in meta["disks"]:
        owner = disk_owners.get(disk["target"])
        if owner:
            disk["owner"] = owner
