"""Plain data passed between the steps and the plugins, and the two ports' contracts (FrozenSource,
RepositoryBackend). No I/O except BackendBase's default `stream_file` and `read_files` (through the backend) and RecoveryReport's log lines."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvm_borg.errors import UsageError, exit_code


@dataclass(frozen=True)
class NetworkHost:
    """One `<host>` of a network disk's `<source>`: a server name and port, or a unix socket."""

    name: str | None = None
    port: str | None = None
    transport: str | None = None  # "tcp" (libvirt's default), "unix", "rdma"
    socket: str | None = None  # transport "unix"


@dataclass(frozen=True)
class NetworkSource:
    """Where a disk of type `network` lives: `<source protocol='nbd|rbd|iscsi|gluster|...' name='...'>` and
    its hosts. Recorded in meta.json (informational: restore never connects to it)."""

    protocol: str
    name: str | None
    hosts: tuple[NetworkHost, ...] = ()

    def label(self) -> str:
        """Return a one-line description for logs and warnings, e.g. "nbd://127.0.0.1:10809/exp"."""
        hosts = ",".join(h.socket or (h.name or "") + (f":{h.port}" if h.port else "") for h in self.hosts)
        return f"{self.protocol}://{hosts}/{self.name or ''}"


@dataclass(frozen=True)
class DiskPlan:
    """One disk of a domain chosen for backup, as its XML describes it."""

    target: str  # guest device name, e.g. "vda"
    source: str  # host path of the active image (file or block device); a network disk: its label()
    source_type: str  # "file", "block" or "network"
    driver_type: str  # image format: "qcow2", "raw", ...
    backing_chain: tuple[str, ...] = ()  # backing files below `source`, top first
    network: NetworkSource | None = None  # a disk of type network: where it lives (source is then no path)


@dataclass(frozen=True)
class SkippedDisk:
    """A disk left out of the backup and the reason, for the log and meta.json."""

    target: str
    reason: str


@dataclass(frozen=True)
class DomainPlan:
    """What a backup of one domain will do: which disks, which overlays, how to quiesce."""

    name: str
    uuid: str
    running: bool
    disks: tuple[DiskPlan, ...]
    skipped: tuple[SkippedDisk, ...]
    overlays: dict[str, str]  # target -> overlay path (empty for a shut-off domain or the bitmap method)
    quiesce: str  # "auto" | "required" | "off"
    method: str = "snapshot"  # how the disks are frozen and read: "snapshot" | "bitmap" (changed blocks)
    full_read: bool = False  # `backup --full`: the bitmap method reads every segment this run
    warnings: tuple[str, ...] = ()  # what the run must report about the plan (a network disk left out)


@dataclass(frozen=True)
class FrozenDisk:
    """A disk whose content no longer changes while the backup reads `path`."""

    target: str
    path: str  # host path the backend reads (the frozen base image or block device)
    driver_type: str
    virtual_size: int
    original_source: str
    backing_chain: tuple[str, ...] = ()
    is_block_device: bool = False
    backing_formats: tuple[str, ...] = ()  # format of each backing_chain layer, as qemu-img reports it
    layout: str = "image"  # "image": `path` is the image file; "segments": `path` is a directory of segment files
    segment_size: int = 0  # layout "segments": bytes per segment file (the last one may be shorter)
    segment_count: int = 0  # layout "segments": number of segment files


@dataclass
class DiskReadStats:
    """What a backup read of one disk: bytes, and with the bitmap method the segments and why a disk was read in full."""

    target: str
    bytes_read: int = 0  # expected at freeze time; the bytes actually served once released
    segments_dirty: int | None = None  # bitmap method: segments changed since the previous run (None: not segmented)
    segments_total: int | None = None
    full_read_reason: str | None = None  # why every segment is read this run (None: only the changed ones)


@dataclass
class FreezeResult:
    """What a FrozenSource reports after freezing: the disks and how consistent they are."""

    disks: list[FrozenDisk]
    quiesced: bool
    consistency: str  # "quiesced" | "crash-consistent" | "offline"
    freeze_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    method: str = "snapshot"  # the DomainPlan's method, as this source carried it out
    read_stats: list[DiskReadStats] = field(default_factory=list)  # per disk (empty: every disk read whole)
    bytes_served: Callable[[], int] | None = None  # the bytes readers got from the disks so far, where counted


class FrozenSource(Protocol):
    """Where a domain's frozen disk data comes from (snapshot+commit today, changed blocks later).

    Chosen per domain by the `kvm_borg_frozen_source` hook; a wrapping plugin (prefreeze) implements
    every member by delegating. The backup pipeline calls freeze → mark_stage("storing") → release;
    `kvm-borg freeze` calls hand_over(owner) → freeze → mark_stage("exposed"), and the frozen state
    outlives the process until `thaw`/`recover` complete the journal entry through the plugins."""

    def hand_over(self, owner: str) -> None:
        """Before freeze(): the frozen files will outlive this process, read by an outside reader; journal
        the domain (its entry's `owner` is `owner`) when it freezes, so `kvm-borg thaw` and `recover` find
        it and let that owner's plugin finish first. release() in this process still undoes everything."""
        ...

    def freeze(self) -> FreezeResult:
        """Freeze the planned disks; return them as paths a reader reads, and how consistent they are. A
        RefusedError before anything changed fails the domain with nothing to undo."""
        ...

    def mark_stage(self, stage: str) -> str | None:
        """Record how far the run got ("storing", "exposed") in the source's journal entry, best-effort;
        return a warning when that could not be written, else None (also: nothing journaled)."""
        ...

    def release(self) -> "ReleaseResult":
        """Merge back / clean up. Must be safe to call after a failed or partial freeze."""
        ...


@dataclass
class ReleaseResult:
    """What releasing a frozen domain did: warnings, and whether the data read may be inconsistent."""

    warnings: list[str] = field(default_factory=list)
    inconsistent: bool = False
    seconds: float = 0.0
    bytes_read: dict[str, int] = field(default_factory=dict)  # target -> bytes the readers were served, where counted


@dataclass(frozen=True)
class ArchiveRequest:
    """Everything a backend needs to write one archive for one domain."""

    domain: str
    archive_name: str
    timestamp: str  # UTC, ISO 8601 basic, e.g. 20261126T121638Z
    files: tuple[str, ...]  # absolute host paths, metadata files first, images after
    block_devices: tuple[str, ...]  # the subset of `files` that are block devices
    comment: str  # one-line JSON that identifies the archive as kvm-borg's
    total_bytes: int  # bytes to read, for progress
    bytes_served: Callable[[], int] | None = None  # when set, progress counts these bytes actually read instead of the tool's
    plain_files: bool = False  # every file is kvm-borg's own (segment view, staging): no flags, ACLs or xattrs to read


@dataclass
class StoreResult:
    """One repository's outcome for one domain."""

    repository: str
    ok: bool
    archive: str | None = None
    original_size: int = 0
    deduplicated_size: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class DomainResult:
    """One domain's outcome in a run."""

    domain: str
    ok: bool
    consistency: str | None = None
    stores: list[StoreResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    freeze_seconds: float = 0.0
    commit_seconds: float = 0.0
    method: str | None = None  # "snapshot" | "bitmap", once frozen
    disks: list[dict] = field(default_factory=list)  # per disk: target, bytes_read, segments_dirty, segments_total, full_read_reason


@dataclass
class RunSummary:
    """A whole run: every domain's result, plus the run's own warnings and errors (its explicit steps
    after the domains: recording the run state, the metrics file, prune after backup).

    `exit_code` follows the documented 0/1/2 rule: 2 if a domain failed or the run has an error, else
    1 if anything warned, else 0."""

    domains: list[DomainResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code(
            failed=bool(self.errors) or any(not d.ok for d in self.domains),
            warned=bool(self.warnings) or any(d.warnings or any(s.warnings for s in d.stores) for d in self.domains),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "domains": [dataclasses.asdict(d) for d in self.domains],
                "warnings": list(self.warnings), "errors": list(self.errors)}


@dataclass(frozen=True)
class ArchiveInfo:
    """One archive as `kvm-borg list` shows it."""

    name: str
    domain: str
    time: str  # ISO 8601
    repository: str
    original_size: int | None = None
    deduplicated_size: int | None = None
    disks: tuple[str, ...] = ()
    host: str | None = None
    method: str | None = None  # "snapshot" | "bitmap" (from the archive comment; None: not recorded)


@dataclass
class PruneResult:
    """One domain's prune in one repository: the archives kept (with the rule) and deleted (or, with dry_run, to delete)."""

    repository: str
    domain: str
    ok: bool
    dry_run: bool = False
    kept: dict[str, str] = field(default_factory=dict)  # archive -> rule that keeps it
    pruned: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class CheckResult:
    """One repository's consistency check."""

    repository: str
    ok: bool
    mode: str = "metadata"  # "metadata" | "verify-data" | "read-data-subset=PCT"
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


class RepositoryBackend(Protocol):
    """A repository kvm-borg writes to and reads from: every member a caller uses. Implemented by the
    borg and restic plugins; a third-party backend implements all of it, most simply by subclassing
    BackendBase (which supplies the optional members) and writing the rest."""

    name: str  # the repository's `name:` in the config
    repository: dict  # the repository's config entry, as validated
    settings: Any  # the Settings it was made with
    location: str  # where it lives (path or URL); repositories at one location are written one at a time
    exclusive_writes: bool  # True: one writer at a time (borg's lock): a parallel run's domains take turns
    host: str | None  # the host name its archives of this host carry, None: the config's `hostname`
    list_hosts: list[str] | None  # whose archives list_archives returns (None: every host's); settable

    def preflight(self) -> None:
        """Raise KvmBorgError when the repository cannot be used at all (e.g. its client binary is
        missing), so a backup refuses before any snapshot. Cheap: no repository access."""
        ...

    def version(self) -> str:
        """Return the version of the client this repository runs, for `doctor`."""
        ...

    def init(self) -> bool:
        """Create the repository if it does not exist; return True if it was created."""
        ...

    def exists(self) -> bool: ...

    def store(self, request: ArchiveRequest) -> StoreResult: ...

    def list_archives(self, domain: str | None = None) -> list[ArchiveInfo]: ...

    def list_paths(self, archive: str) -> list[str]:
        """Paths stored in an archive, as the backend names them."""
        ...

    def list_entries(self, archive: str) -> dict[str, str]:
        """Given an archive, return {stored path: kind} ("file", "dir", "symlink", "device"... or "unknown")."""
        ...

    def extract_file(self, archive: str, archive_path: str, destination: Path) -> None:
        """Write one stored file to `destination` (sparse where the backend can)."""
        ...

    def extract_into(self, archive: str, archive_path: str, workdir: str) -> bool:
        """Given an archive, one stored regular file and an empty private directory on the destination's file
        system, let the backend's own tool write the file at `workdir/archive_path` (sparse, none of the
        archive's flags, ACLs or xattrs applied) and return True; return False, writing nothing, when the
        backend has no such path (restore then streams the file through `stream_file`). The caller checks
        what was written (a regular file, no symlink on the way) before it renames it into place."""
        ...

    def read_files(self, archive: str, archive_paths: Sequence[str], limit: int) -> dict[str, bytes]:
        """Given an archive, stored regular files (meta.json, the domain XMLs) and a size limit per file, return
        {path: bytes} of those the archive holds as regular files, in as few runs of the tool as it can (borg:
        one); a file larger than `limit` is a UsageError."""
        ...

    def archive_path(self, host_path: str) -> str:
        """The path under which `host_path` is stored in this backend's archives."""
        ...

    def stream_file(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Pass one stored file's bytes, as stored and authenticated by the backend, to `write` in order."""
        ...

    def stream_tar(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Given an archive and a stored DIRECTORY (a segmented disk), pass an uncompressed tar stream of it
        and everything below it, as stored and authenticated by the backend, to `write` in order."""
        ...

    def mount(self, archive: str, mountpoint: str, *, shared: bool = False) -> str:
        """Mount an archive read-only at `mountpoint` (in the background; `shared`: every file readable by other
        users, such as QEMU's, the caller closing the parent directory to the rest); return the directory of its root."""
        ...

    def unmount(self, mountpoint: str) -> None:
        """Undo `mount`: the file system goes away and its process exits."""
        ...

    def prune(self, domain: str, policy: dict, dry_run: bool = False) -> PruneResult:
        """Apply a complete retention policy (kvm_borg.retention) to one domain's archives only; a
        failure is `ok=False`. Archives kvm-borg did not make are never deleted."""
        ...

    def compact(self) -> None:
        """Free the space of deleted archives (borg compact; a no-op where prune already does it)."""
        ...

    def check(self, verify_data: bool = False, read_data_subset: str | None = None) -> CheckResult:
        """Check the repository's consistency (and with `verify_data` / `read_data_subset`, its data)."""
        ...

    def command_environment(self) -> dict[str, Any]:
        """Return what a run of the repository's own tool gets besides its argv (`kvm-borg borg/restic`,
        `kvm-borg key export`)."""
        ...


class BackendBase:
    """Defaults for the optional RepositoryBackend members, for backends to subclass.

    Given the repository's config entry and the Settings, `__init__` sets name, repository,
    settings and location (the entry's `path`, else `url`, else its name). What a backend cannot do
    raises a UsageError naming the repository and its type; the rest (init, exists, store,
    list_archives, list_paths, extract_file, archive_path, prune, compact, check) it must write."""

    host: str | None = None
    list_hosts: list[str] | None = None
    exclusive_writes: bool = True  # the safe default: a parallel run writes it for one domain at a time

    def __init__(self, repository: dict, settings: Any):
        self.repository = dict(repository)
        self.settings = settings
        self.name = repository["name"]
        self.location = str(repository.get("path") or repository.get("url") or self.name)

    def _cannot(self, what: str) -> UsageError:
        return UsageError(f"repository {self.name!r} ({self.repository.get('type')}) cannot {what}")

    def preflight(self) -> None:
        """Nothing to check before a backup: return None."""

    def version(self) -> str:
        """Return "?": the client's version is not known."""
        return "?"

    def list_entries(self, archive: str) -> dict[str, str]:
        """Given an archive, return {path: "unknown"} for every path of list_paths (restore reads no
        entry of unknown kind)."""
        return {path: "unknown" for path in self.list_paths(archive)}

    def stream_file(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Given an archive and a stored path, extract the file into a private temporary directory and
        pass its bytes to `write` in order."""
        import tempfile  # only restores read this way: not imported on every start-up

        with tempfile.TemporaryDirectory(prefix="kvm-borg-read-") as workdir:
            path = Path(workdir, "file")
            self.extract_file(archive, archive_path, path)
            with open(path, "rb") as handle:
                while data := handle.read(4 << 20):
                    write(data)

    def extract_into(self, archive: str, archive_path: str, workdir: str) -> bool:
        """Return False: restore streams this backend's files (`stream_file`)."""
        return False

    def read_files(self, archive: str, archive_paths: Sequence[str], limit: int) -> dict[str, bytes]:
        """Given an archive, stored paths and a size limit per file, return {path: bytes}, one `stream_file`
        each (a file larger than `limit` is a UsageError)."""
        return read_files_one_by_one(self, archive, archive_paths, limit)

    def stream_tar(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Raise UsageError: this backend cannot read a stored directory as a tar stream (segmented disks)."""
        raise self._cannot("read segmented disks (a stored directory as a tar stream)")

    def mount(self, archive: str, mountpoint: str, *, shared: bool = False) -> str:
        """Raise UsageError: this backend cannot mount archives."""
        raise self._cannot("mount archives")

    def unmount(self, mountpoint: str) -> None:
        """Raise UsageError: this backend cannot mount archives."""
        raise self._cannot("mount archives")

    def command_environment(self) -> dict[str, Any]:
        """Raise UsageError: this backend's tool cannot be run by hand."""
        raise self._cannot(f"run {self.repository.get('type')} by hand")


log = logging.getLogger(__name__)


class RecoveryReport:
    """What completing one journal entry did (`did`) and what it could not (`warn`), each line logged as it is
    added; the `kvm_borg_recover_entry` hook returns one."""

    def __init__(self, domain: str):
        self.domain = domain
        self.actions: list[str] = []
        self.warnings: list[str] = []

    def did(self, text: str) -> None:
        log.info("domain '%s': %s", self.domain, text)
        self.actions.append(text)

    def warn(self, text: str) -> None:
        log.warning("domain '%s': %s", self.domain, text)
        self.warnings.append(text)


class BoundedBytes:
    """A `write` callable for streamed bytes that keeps at most `limit` of them: given the limit and the
    message of the UsageError raised once more arrive, collect the pieces; `value()` returns them joined.
    (Untrusted archives: a "small" file must not fill the memory.)"""

    def __init__(self, limit: int, too_large: str):
        self.limit, self.too_large = limit, too_large
        self.size = 0
        self.parts: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise UsageError(self.too_large)
        self.parts.append(bytes(data))

    def value(self) -> bytes:
        return b"".join(self.parts)


def read_small_file(backend, archive: str, archive_path: str, limit: int) -> bytes:
    """Given a backend, an archive, a stored path and a size limit, return the file's bytes, read with one
    `stream_file` (more than `limit` bytes is a UsageError naming it)."""
    collect = BoundedBytes(limit, f"{archive_path} in {archive} is larger than {limit} bytes")
    backend.stream_file(archive, archive_path, collect)
    return collect.value()


def read_files_one_by_one(backend, archive: str, archive_paths: Sequence[str], limit: int) -> dict[str, bytes]:
    """Given a backend, an archive, stored paths and a size limit per file, return {path: bytes}, read with one
    `stream_file` each (a file larger than `limit` is a UsageError naming it)."""
    return {path: read_small_file(backend, archive, path, limit) for path in archive_paths}
