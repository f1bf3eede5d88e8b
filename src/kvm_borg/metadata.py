"""The archive's layout and its `meta.json`: pure functions, plus writing the staged files.

Layout of every archive (borg and restic alike; paths are relative to the archive root, restic
shows them with a leading "/"):
- the disk images (and any backing files below them) at their host path, e.g.
  `var/lib/libvirt/images/web01.qcow2`, read in place from the frozen images;
- `<state_dir>/staging/<domain uuid>/meta.json`, `domain.xml` (persistent definition) and
  `domain-live.xml` (the running definition, absent for a shut-off domain).
`meta.json` maps each disk target to its image inside the archive; restore reads it first.

A disk backed up by the bitmap method (layout "segments") is a directory instead of an image: its
guest-visible content, flattened, cut into segment files named `%08d` by index, each `size` bytes (the
last one shorter) or empty when the whole segment reads as zeros, plus a `manifest.json`; its meta.json
entry carries `"layout": "segments"` and `"segments": {"size": S, "count": C}` (see README, "Archive layout").

A network disk (nbd, rbd, iscsi...: always segmented, read through the backup job) has no host path:
its entry carries `"source_type": "network"`, `"original_source": null` and `"network": {"protocol",
"name", "hosts": [{"name", "port", "transport", "socket"}]}`, informational (restore writes a file).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from kvm_borg import __version__
from kvm_borg.atomic import write_atomic
from kvm_borg.models import DiskPlan, DomainPlan, FreezeResult, FrozenDisk

META_NAME = "meta.json"
PERSISTENT_XML_NAME = "domain.xml"
LIVE_XML_NAME = "domain-live.xml"
META_FORMAT = 1


def utc_timestamp(now: datetime | None = None) -> str:
    """Return the run's UTC time in ISO 8601 basic format, e.g. 20261126T121638Z."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def archive_name(domain: str, timestamp: str) -> str:
    """Given a domain name and a timestamp, return the archive name `{domain}-{timestamp}`."""
    return f"{domain}-{timestamp}"


def relative_archive_path(host_path: str) -> str:
    """Given an absolute host path, return it relative to the archive root."""
    return host_path.lstrip("/")


def backing_layers(disk: FrozenDisk) -> list[dict]:
    """Given a FrozenDisk, return its meta.json backing chain: {path, archive_path, format} per layer, top first.

    Restore passes each recorded format to qemu-img with -f and never probes one from the data."""
    formats = list(disk.backing_formats) + [""] * (len(disk.backing_chain) - len(disk.backing_formats))
    layers = []
    for path, fmt in zip(disk.backing_chain, formats):
        layer = {"path": path, "archive_path": relative_archive_path(path)}
        if fmt:
            layer["format"] = fmt
        layers.append(layer)
    return layers


def segment_fields(disk: FrozenDisk) -> dict:
    """Given a FrozenDisk, return the meta.json keys of its layout: {} for an image, else `layout` and `segments`."""
    if disk.layout != "segments":
        return {}
    return {"layout": "segments", "segments": {"size": disk.segment_size, "count": disk.segment_count}}


def network_fields(disk: DiskPlan) -> dict:
    """Given a DiskPlan, return the meta.json keys of a network disk ({"network": {...}}), {} for any other."""
    if disk.network is None:
        return {}
    hosts = [{key: value for key, value in (("name", h.name), ("port", h.port), ("transport", h.transport),
                                            ("socket", h.socket)) if value is not None}
             for h in disk.network.hosts]
    return {"network": {"protocol": disk.network.protocol, "name": disk.network.name, "hosts": hosts}}


def build_meta(
    plan: DomainPlan,
    freeze: FreezeResult,
    *,
    archive: str,
    timestamp: str,
    host: str,
    libvirt_version: str,
    qemu_version: str,
    persistent: bool,
    staging_dir: str,
    has_live_xml: bool,
) -> dict:
    """Given what a backup planned and froze, return the `meta.json` document."""
    disks = []
    for disk in freeze.disks:
        planned = next(d for d in plan.disks if d.target == disk.target)
        disks.append(
            {
                "target": disk.target,
                "format": disk.driver_type,
                "virtual_size": disk.virtual_size,
                "original_source": None if planned.network is not None else disk.original_source,
                "source_type": planned.source_type,
                "read_from": disk.path,
                "archive_path": relative_archive_path(disk.path),
                "block_device": disk.is_block_device,
                "backing_chain": backing_layers(disk),
                **segment_fields(disk),
                **network_fields(planned),
            }
        )
    files = {"domain_xml": relative_archive_path(os.path.join(staging_dir, PERSISTENT_XML_NAME))}
    if has_live_xml:
        files["domain_live_xml"] = relative_archive_path(os.path.join(staging_dir, LIVE_XML_NAME))
    return {
        "kvm_borg": META_FORMAT,
        "tool_version": __version__,
        "archive": archive,
        "created": timestamp,
        "host": host,
        "libvirt_version": libvirt_version,
        "qemu_version": qemu_version,
        "domain": {"name": plan.name, "uuid": plan.uuid, "running": plan.running, "persistent": persistent},
        "quiesced": freeze.quiesced,
        "consistency": freeze.consistency,
        "method": freeze.method,
        "disks": disks,
        "skipped_disks": [{"target": s.target, "reason": s.reason} for s in plan.skipped],
        "files": files,
    }


def archive_comment(meta: dict) -> str:
    """Given meta.json, return the one-line JSON comment that marks an archive as kvm-borg's."""
    return json.dumps(
        {
            "kvm_borg": META_FORMAT,
            "domain": meta["domain"]["name"],
            "uuid": meta["domain"]["uuid"],
            "disks": [d["target"] for d in meta["disks"]],
            "host": meta["host"],
            "consistency": meta["consistency"],
            "method": meta.get("method", "snapshot"),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def parse_archive_comment(comment: str | None) -> dict | None:
    """Given an archive's comment, return its kvm-borg JSON object, or None if the archive is not kvm-borg's."""
    if not comment:
        return None
    try:
        data = json.loads(comment)
    except ValueError:
        return None
    if not isinstance(data, dict) or not data.get("kvm_borg") or not isinstance(data.get("domain"), str):
        return None
    return data


METHODS = ("snapshot", "bitmap")


def archive_method(comment: dict) -> str | None:
    """Given a parsed archive comment (untrusted), return the method that made the archive: "snapshot" when
    none is recorded (older archives), the recorded one when it is known, else None."""
    method = comment.get("method", "snapshot")
    return method if method in METHODS else None


def archive_files(meta: dict, staging_dir: str) -> list[str]:
    """Given meta.json and the staging dir, return the absolute host paths to store, metadata first."""
    files = [os.path.join(staging_dir, META_NAME), os.path.join(staging_dir, PERSISTENT_XML_NAME)]
    if "domain_live_xml" in meta["files"]:
        files.append(os.path.join(staging_dir, LIVE_XML_NAME))
    files.extend("/" + path for path in staged_host_state(meta))
    for disk in meta["disks"]:
        for path in [disk["read_from"]] + [b["path"] for b in disk["backing_chain"]]:
            if path not in files:
                files.append(path)
    return files


def staged_host_state(meta: dict) -> list[str]:
    """Given meta.json, return the archive paths of the host state staged beside it (NVRAM, TPM, networks, pools)."""
    found = meta["files"]
    paths = [found["nvram"]] if found.get("nvram") else []
    paths += [entry["archive_path"] for entry in found.get("tpm_state") or []]
    paths += list((found.get("networks") or {}).values()) + list((found.get("storage_pools") or {}).values())
    return paths


def _write_private(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"), 0o600, durable=False)


def write_staging(staging_dir: Path, meta: dict, persistent_xml: str, live_xml: str | None,
                  host_files: dict[str, bytes] | None = None) -> None:
    """Write meta.json, the domain XMLs and the captured host files ({name in staging: bytes}) into a
    fresh root-only staging directory.

    Not fsync'd (two fsyncs a file, ~9 ms on a busy disk, per domain): the files are read while the domain is
    frozen and removed after it; a crash ends the freeze (`kvm-borg recover`), and the next run stages afresh."""
    shutil.rmtree(staging_dir, ignore_errors=True)
    staging_dir.mkdir(parents=True, mode=0o700)
    for name, data in (host_files or {}).items():
        path = staging_dir / name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, data, 0o600, durable=False)
    _write_private(staging_dir / META_NAME, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    _write_private(staging_dir / PERSISTENT_XML_NAME, persistent_xml)
    if live_xml is not None:
        _write_private(staging_dir / LIVE_XML_NAME, live_xml)
