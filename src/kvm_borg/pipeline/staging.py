"""Capture + stage: what the archive holds besides the images (meta.json, the XMLs, host state),
written to a directory; shared by `kvm-borg backup` (staging_dir/<uuid>) and `kvm-borg freeze`
(DIR/<domain>)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvm_borg import metadata
from kvm_borg.engine import host_state
from kvm_borg.engine.capture import capture_domain, capture_host_state
from kvm_borg.models import ArchiveRequest, DomainPlan, FreezeResult


@dataclass
class Staged:
    """What capture_and_stage wrote: meta.json's content and the pieces of host state it could not capture."""

    meta: dict
    missing: list[str]


def capture_and_stage(handle, plan: DomainPlan, freeze: FreezeResult, settings, directory: Path, *, archive: str,
                      timestamp: str, exposed: dict[str, str] | None = None) -> Staged:
    """Given a frozen domain (its handle, plan and FreezeResult), the Settings, the directory to write
    and the archive's name and timestamp, capture the domain's XMLs, versions and host state and write
    them with meta.json into `directory` (replaced); with `exposed` ({host path: exposed path}), meta.json
    names the exposed paths as the images' places in the archive. Return the Staged meta."""
    captured = capture_domain(handle, plan.running)
    meta = metadata.build_meta(
        plan, freeze, archive=archive, timestamp=timestamp, host=settings.hostname,
        libvirt_version=captured.libvirt_version, qemu_version=captured.qemu_version,
        persistent=captured.persistent, staging_dir=str(directory), has_live_xml=captured.live_xml is not None,
    )
    state = capture_host_state(handle, captured, [d.source for d in plan.disks], str(directory))
    host_state.add_to_meta(meta, state, {d.target: host_state.file_owner(d.source) for d in plan.disks})
    if exposed is not None:
        point_meta_at_exposure(meta, exposed)
    metadata.write_staging(directory, meta, captured.persistent_xml, captured.live_xml, state.staged)
    return Staged(meta=meta, missing=list(state.missing))


def point_meta_at_exposure(meta: dict, exposed: dict[str, str]) -> None:
    """Given meta.json and {host path: exposed path}, make its images' archive paths the exposed ones."""
    for disk in meta["disks"]:
        disk["archive_path"] = metadata.relative_archive_path(exposed[disk["read_from"]])
        for backing in disk["backing_chain"]:
            backing["archive_path"] = metadata.relative_archive_path(exposed[backing["path"]])
    meta["exposed"] = True


def archive_request(domain: str, archive: str, timestamp: str, meta: dict, freeze: FreezeResult,
                    directory: Path) -> ArchiveRequest:
    """Given a domain, its archive's name and timestamp, the staged meta.json, the FreezeResult and the
    staging directory, return the ArchiveRequest every repository stores."""
    return ArchiveRequest(
        domain=domain,
        archive_name=archive,
        timestamp=timestamp,
        files=tuple(metadata.archive_files(meta, str(directory))),
        block_devices=tuple(d.path for d in freeze.disks if d.is_block_device),
        comment=metadata.archive_comment(meta),
        total_bytes=bytes_to_read(freeze),
        bytes_served=freeze.bytes_served,
        plain_files=any(d.layout == "segments" for d in freeze.disks),
    )


def bytes_to_read(freeze: FreezeResult) -> int:
    """Given the FreezeResult, return the bytes the repositories are expected to read, for progress: when the
    source counts what it serves (the bitmap method), what it expects to serve (the changed segments of a
    segmented disk, every other disk whole); else every disk's virtual size."""
    if freeze.bytes_served is None:
        return sum(d.virtual_size for d in freeze.disks)
    expected = {s.target: s.bytes_read for s in freeze.read_stats}
    return sum(expected.get(d.target, d.virtual_size) for d in freeze.disks)
