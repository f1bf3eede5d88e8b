"""The restic repository class: one restic repository of the configuration, as a RepositoryBackend.

Every call builds an argv (`commands`), runs it through `kvm_borg.execute` with the repository
and password in the environment (RESTIC_REPOSITORY, RESTIC_PASSWORD_FILE /
RESTIC_PASSWORD_COMMAND), and reads restic's `--json` output with `output`. One archive is
several snapshots tied by tags (`archives`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import shlex
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from kvm_borg import retention
from kvm_borg.backends.restic import archives
from kvm_borg.backends.restic import commands as rc
from kvm_borg.backends.restic.archives import ArchiveParts, archive_info_from, group_archives
from kvm_borg.backends.restic.output import (
    APPEND_ONLY_REFUSAL, NO_REPOSITORY, WRONG_PASSWORD, BackupOutput, ResticLog, parse_ls_nodes, refused_delete,
)
from kvm_borg.backends.ssh_options import DEFAULT_SSH_COMMAND, with_default_options
from kvm_borg.config_formats import rate_kib_per_second
from kvm_borg.errors import KvmBorgError
from kvm_borg.execute import (
    CommandError,
    CommandResult,
    one_line,
    run_command,
    start_detached,
)
from kvm_borg.models import ArchiveInfo, ArchiveRequest, CheckResult, PruneResult, StoreResult, read_files_one_by_one
from kvm_borg.progress import progress_of, transfer_progress
from kvm_borg.redact import redact_url
from kvm_borg.sizes import content_size
from kvm_borg.sparse import SparseWriter
from kvm_borg.tools import first_line, run_tool

logger = logging.getLogger(__name__)

# Progress updates per second asked of restic while a progress bar is shown.
PROGRESS_FPS = 4
MOUNT_TIMEOUT = 60  # seconds for `restic mount` to show the snapshot


class ResticError(KvmBorgError):
    """A restic command of a repository failed; the message is one line naming the repository."""


class _DeleteRefused(Exception):
    """Raised from restic's stderr reader when the server refused a delete (stops restic; see ResticRepository._run)."""


def find_restic_binary(configured: str | None) -> str:
    """Given the configured restic_binary (None: not set), return the restic to run (the one on PATH)."""
    return configured or shutil.which("restic") or "restic"


@functools.lru_cache(maxsize=8)
def restic_features(binary: str) -> rc.Features:
    """Given a restic binary, run `restic version` once and return what that version can do."""
    try:
        result = run_command(rc.make_version_command(binary), env={**os.environ, "TZ": "UTC"})
    except CommandError as exc:
        raise ResticError(exc.message) from None
    version = rc.parse_version(result.stdout)
    if result.returncode != 0 or version is None:
        raise ResticError(f"cannot tell the version of {binary}: {one_line(result.stdout or 'no output')}")
    logger.debug("%s is restic %s", binary, ".".join(map(str, version)))
    return rc.Features(version)


class ResticRepository:
    """One restic repository of the configuration, as a RepositoryBackend.

    In: the repository's config dict (`type: restic`) and the Settings (restic_binary, progress,
    hostname). The attributes callers read: `name`, `repository` (the config dict), `settings`,
    `location` (the URL; repositories at one location are written one after the other), `host`
    (the `--host` of new snapshots: the repository's `host:`, else the config's hostname),
    `list_hosts` (whose snapshots listings see, None: every host's; callers may narrow it), and
    for `kvm-borg restic`: `binary`, `options` (the extended options, e.g. `sftp.command`)."""

    exclusive_writes = False  # restic's backup takes a shared lock: several domains may write at once

    def __init__(self, repository: Mapping[str, Any], settings: Any):
        self.repository = dict(repository)
        self.settings = settings
        self.name: str = repository["name"]
        self.url: str = repository["url"]
        self.location: str = self.url  # repositories at one location are written one after the other
        self.host: str = repository.get("host") or getattr(settings, "hostname", None) or os.uname().nodename
        hosts = repository.get("hosts") or [self.host]
        self.list_hosts: list[str] | None = None if "*" in hosts else list(hosts)
        self.compression: str | None = repository.get("compression")  # checked by the schema (restic/schema.py)
        self.binary = find_restic_binary(getattr(settings, "restic_binary", None))
        self.progress = bool(getattr(settings, "progress", False))
        rate = repository.get("upload_ratelimit")  # bytes per second, checked by the schema
        self.limit_upload_kib: int | None = rate_kib_per_second(rate) if rate else None
        self.sftp_command = rc.sftp_command(
            self.url, with_default_options(repository.get("ssh_command") or DEFAULT_SSH_COMMAND))
        self.options: tuple[str, ...] = (f"sftp.command={self.sftp_command}",) if self.sftp_command else ()
        # {(archive, listed hosts): its parts}: one `restic snapshots` per archive read, however many of its
        # files are read (forgotten whenever this instance writes or forgets snapshots)
        self._parts: dict[tuple[str, tuple[str, ...] | None], ArchiveParts] = {}

    def __repr__(self) -> str:
        return f"ResticRepository({self.name!r}, {redact_url(self.url)!r})"

    @property
    def features(self) -> rc.Features:
        """What the restic this repository runs can do (its version is asked once per binary)."""
        return restic_features(self.binary)

    # --- RepositoryBackend ------------------------------------------------------------------

    def preflight(self) -> None:
        """Raise ResticError when the restic binary is missing or its version unreadable (no repository access)."""
        path = self.binary if os.sep in self.binary else shutil.which(self.binary)
        if not path or not os.access(path, os.X_OK):
            raise ResticError(f"repository {self.name!r}: restic binary {self.binary} not found (restic_binary)")
        try:
            self.features
        except ResticError as exc:
            raise ResticError(f"repository {self.name!r}: {exc}") from None

    def version(self) -> str:
        """Return the version of the restic this repository runs, e.g. "0.14.0" (for `doctor`)."""
        return self.features.describe()

    def init(self) -> bool:
        """Create the repository unless it exists; return True if it was created."""
        if self.exists():
            return False
        self._run_checked(rc.make_init_command(self.binary, options=self.options), "init")
        logger.info("created restic repository %s at %s", self.name, redact_url(self.url))
        return True

    def exists(self) -> bool:
        """Return whether a restic repository is at the url (a wrong password still means yes)."""
        result, log = self._run(rc.make_cat_config_command(self.binary, options=self.options))
        if result.returncode == 0:
            return True
        if (self.features.exit_codes and result.returncode == 12) or log.says(WRONG_PASSWORD):
            return True
        if (self.features.exit_codes and result.returncode == 10) or log.says(NO_REPOSITORY):
            return False
        raise self._error("cat config", log, result)

    def store(self, request: ArchiveRequest) -> StoreResult:
        """Given an ArchiveRequest, write its snapshots (device parts first, main last) and return the StoreResult.

        A restic failure is `ok=False` with a one-line error, never an exception; the parts it
        had written are forgotten again (best effort: an append-only server keeps them, unlisted).
        An interrupt stops restic (SIGINT, so it releases its lock) and propagates."""
        started = time.monotonic()
        self._parts.clear()
        devices = [path for path in request.files if path in request.block_devices]
        files = [path for path in request.files if path not in request.block_devices]
        written: list[str] = []
        original = deduplicated = 0
        warnings: list[str] = []
        try:
            sizes = {path: content_size(path) for path in request.files}
        except OSError as exc:
            return StoreResult(self.name, ok=False, seconds=time.monotonic() - started,
                               error=f"cannot read {exc.filename}: {exc.strerror}")
        total = sum(sizes.values())
        logger.info(
            "restic backup %s: %s (%d files, %d block devices, %d bytes)",
            self.name, request.archive_name, len(files), len(devices), total,
        )
        try:
            bar_total = request.total_bytes if request.bytes_served is not None else total
            with transfer_progress(f"{request.domain} → {self.name}", bar_total, enabled=self.progress) as update:
                done = 0
                parts = [(device, archives.PART_DEVICE) for device in devices] + [(None, archives.PART_MAIN)]
                for device, part in parts:
                    tags = archives.archive_tags(
                        request.domain, request.archive_name, request.comment, part,
                        size=total if part == archives.PART_MAIN else None,
                    )
                    offset = done
                    summary = self._backup_part(
                        request, tags, device=device, paths=files if device is None else (),
                        on_bytes=progress_of(request, lambda n, offset=offset: update(offset + n)),
                    )
                    written.append(summary["snapshot_id"])
                    original += int(summary.get("total_bytes_processed", 0))
                    deduplicated += int(summary.get("data_added", 0))
                    done += sizes[device] if device else sum(sizes[p] for p in files)
        except ResticError as exc:
            warnings += self._forget(written)
            return StoreResult(self.name, ok=False, seconds=time.monotonic() - started, error=str(exc),
                               warnings=warnings)
        # On an interrupt the device parts written so far stay: without their main snapshot no
        # listing shows them, and restic is not started again while the run is being stopped.
        seconds = time.monotonic() - started
        logger.info(
            "stored %s in %s: %d bytes, %d new after deduplication, %.1fs (snapshots %s)",
            request.archive_name, self.name, original, deduplicated, seconds, ", ".join(written),
        )
        return StoreResult(self.name, ok=True, archive=request.archive_name, original_size=original,
                           deduplicated_size=deduplicated, seconds=seconds, warnings=warnings)

    def list_archives(self, domain: str | None = None) -> list[ArchiveInfo]:
        """Given a domain name (None: all), return kvm-borg's complete archives of the listed hosts, oldest first."""
        infos = []
        for parts in self._groups(domain).values():
            info = archive_info_from(parts, self.name, domain)
            if info is not None:
                infos.append(info)
        return sorted(infos, key=lambda info: (info.time, info.host or "", info.name))

    def list_paths(self, archive: str) -> list[str]:
        """Given an archive name, return the paths stored in it as restic names them (absolute)."""
        paths: list[str] = []
        for snapshot in self._archive(archive).snapshots:
            for node in self._ls(snapshot["id"]):
                if node["path"] not in paths:
                    paths.append(node["path"])
        return paths

    def list_entries(self, archive: str) -> dict[str, str]:
        """Given an archive name, return {stored path (no leading "/"): kind} with kind one of file, dir,
        symlink, device, fifo, socket, other (from `restic ls --json`' `type`)."""
        kinds = {"file": "file", "dir": "dir", "symlink": "symlink", "dev": "device", "chardev": "device",
                 "fifo": "fifo", "socket": "socket"}
        entries: dict[str, str] = {}
        for snapshot in self._archive(archive).snapshots:
            for node in self._ls(snapshot["id"]):
                entries.setdefault(str(node["path"]).lstrip("/"), kinds.get(node.get("type"), "other"))
        return entries

    def extract_file(self, archive: str, archive_path: str, destination: Path) -> None:
        """Given an archive, one stored path and a destination file, write the file sparse and rename it into place.

        restic 0.15+ restores it with `--sparse`; 0.14 has no sparse restore, so its `dump` is
        written here with zero blocks left as holes. Either way the data lands in a temporary
        name beside `destination` (same file system) and appears only when complete."""
        destination = Path(destination)
        archive_path = self.archive_path(archive_path)
        snapshot = self._archive(archive).snapshot_holding(archive_path)
        try:
            workdir = tempfile.mkdtemp(prefix=".kvm-borg-extract-", dir=destination.parent)
        except OSError as exc:
            raise ResticError(f"cannot extract to {destination}: {exc.strerror or exc}") from None
        try:
            if self.features.restore_sparse:
                extracted = self._restore_sparse(snapshot["id"], archive_path, workdir)
            else:
                extracted = self._dump_sparse(snapshot["id"], archive_path, workdir)
            os.replace(extracted, destination)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def stream_file(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Given an archive and one stored path, pass the file's bytes to `write`, in order (`restic dump`;
        restic authenticates every blob it reads)."""
        archive_path = self.archive_path(archive_path)
        snapshot = self._archive(archive).snapshot_holding(archive_path)
        result, log = self._run(rc.make_dump_command(self.binary, snapshot["id"], archive_path, options=self.options),
                                on_stdout=write)
        if result.returncode != 0:
            raise self._error("dump", log, result)

    def extract_into(self, archive: str, archive_path: str, workdir: str) -> bool:
        """Return False: restore streams restic's files (`restic dump` into kvm-borg's sparse writer; restic 0.14
        has no sparse restore)."""
        return False

    def read_files(self, archive: str, archive_paths: Sequence[str], limit: int) -> dict[str, bytes]:
        """Given an archive, stored paths and a size limit per file, return {path: bytes}, one `restic dump`
        each (a file larger than `limit` is a UsageError)."""
        return read_files_one_by_one(self, archive, archive_paths, limit)

    def stream_tar(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Given an archive and one stored directory, pass a tar stream of it (and what lies below it) to
        `write`, in order: restic 0.14's `dump` of a directory is a tar, so this is `stream_file` of it."""
        self.stream_file(archive, archive_path, write)

    def mount(self, archive: str, mountpoint: str, *, shared: bool = False) -> str:
        """Given an archive and an empty directory, serve the repository there read-only with `restic mount`
        (a FUSE process left running in the background; `shared`: readable by other users too); return the
        directory of the archive's main snapshot.

        The password reaches restic through the environment only. Device parts (block-device disks
        streamed at backup) are separate snapshots: they appear under `ids/` beside the main one."""
        parts = self._archive(archive)
        snapshot_dir = os.path.join(mountpoint, "ids", parts.main["id"][:8])
        log_path = os.path.join(os.path.dirname(mountpoint), f".{os.path.basename(mountpoint)}.restic-mount.log")
        argv = rc.make_mount_command(self.binary, mountpoint, options=self.options, shared=shared)
        with open(log_path, "wb") as log_file:
            try:
                process = start_detached(argv, env=self._environment(), output=log_file)
            except CommandError as exc:
                raise ResticError(f"repository {self.name!r}: {exc.message}") from None
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.isdir(snapshot_dir):
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)
                    process.wait(timeout=10)
                with open(log_path, errors="replace") as handle:
                    lines = handle.read().strip().splitlines()
                reason = one_line(lines[-1]) if lines else f"no snapshot directory after {MOUNT_TIMEOUT}s"
                raise ResticError(f"repository {self.name!r}: restic mount failed: {reason}")
            time.sleep(0.2)
        os.unlink(log_path)
        return snapshot_dir

    def unmount(self, mountpoint: str) -> None:
        """Given a directory `mount` served, unmount it; the restic process then exits by itself."""
        proc = run_tool(("fusermount3", "-u", mountpoint), ok_codes=None)
        if proc.returncode != 0:
            proc = run_tool(("umount", mountpoint), ok_codes=None)
        if proc.returncode != 0:
            raise ResticError(f"cannot unmount {mountpoint}: {first_line(proc.stderr) or f'umount exited {proc.returncode}'}")

    def archive_path(self, host_path: str) -> str:
        """Given an absolute host path, return the path restic stores it under (the same absolute path)."""
        return posixpath.normpath("/" + host_path.lstrip("/"))

    # --- the parts of store ----------------------------------------------------------------

    def _backup_part(self, request: ArchiveRequest, tags: Sequence[str], *, device: str | None,
                     paths: Sequence[str], on_bytes: Callable[[int], None]) -> dict:
        """Write one snapshot (a block device's content through stdin, or files) and return restic's summary."""
        argv = rc.make_backup_command(
            self.binary, paths, host=self.host, tags=tags, time=rc.restic_time(request.timestamp),
            compression=self.compression, options=self.options, stdin_filename=device,
            limit_upload_kib=self.limit_upload_kib,
        )
        output = BackupOutput(on_bytes)
        what = f"restic backup of {device}" if device else "restic backup"
        stdin = None
        try:
            if device is not None:
                try:
                    # The device itself is restic's stdin: no pipe, no helper, a read error is restic's.
                    stdin = open(device, "rb", buffering=0)
                except OSError as exc:
                    raise ResticError(f"cannot read {device}: {exc.strerror}") from None
            result, log = self._run(argv, stdin=stdin, on_stdout=output.feed)
        finally:
            if stdin is not None:
                stdin.close()
        output.close()
        if result.returncode == 3 and output.summary and output.summary.get("snapshot_id"):
            # An incomplete snapshot: some file was unreadable. Not a backup of this domain.
            self._forget_quietly([output.summary["snapshot_id"]])
            reason = output.errors[-1] if output.errors else log.error_message(result.returncode)
            raise ResticError(f"{what} could not read every file: {reason}")
        if result.returncode != 0 or not output.summary or not output.summary.get("snapshot_id"):
            reason = self._reason(log, result) if result.returncode != 0 else "no summary printed"
            raise ResticError(f"{what} failed: {reason}")
        return output.summary

    def _forget(self, snapshot_ids: Sequence[str]) -> list[str]:
        """Given snapshot ids of a failed store, forget them; return warnings if that fails too."""
        if not snapshot_ids:
            return []
        self._parts.clear()
        try:
            self._run_checked(rc.make_forget_command(self.binary, snapshot_ids, options=self.options), "forget",
                              deletes=True)
            return []
        except ResticError as exc:
            return [f"parts of the failed archive stay in the repository (snapshots {', '.join(snapshot_ids)}): {exc}"]

    def _forget_quietly(self, snapshot_ids: Sequence[str]) -> None:
        for warning in self._forget(snapshot_ids):
            logger.warning("%s", warning)

    # --- reading -----------------------------------------------------------------------------

    def _groups(self, domain: str | None = None) -> dict[tuple[str, str], ArchiveParts]:
        tags = [archives.MARKER_TAG] + ([archives.tag("domain", domain)] if domain is not None else [])
        argv = rc.make_snapshots_command(self.binary, tags=tags, hosts=self.list_hosts, options=self.options)
        data = self._run_json(argv, "snapshots")
        if not isinstance(data, list):
            raise ResticError(f"repository {self.name!r}: restic snapshots printed unexpected JSON")
        return group_archives(data)

    def _archive(self, archive: str) -> ArchiveParts:
        """Given an archive name, return its complete ArchiveParts among the listed hosts (ResticError if none or
        ambiguous); asked of the repository once per archive and host filter (see `_parts`)."""
        key = (archive, None if self.list_hosts is None else tuple(self.list_hosts))
        if key not in self._parts:
            self._parts[key] = self._find_archive(archive)
        return self._parts[key]

    def _find_archive(self, archive: str) -> ArchiveParts:
        """Given an archive name, list its snapshots and return its complete ArchiveParts among the listed hosts
        (ResticError if none or ambiguous)."""
        argv = rc.make_snapshots_command(
            self.binary, tags=[archives.MARKER_TAG, archives.tag("archive", archive)], hosts=self.list_hosts,
            options=self.options,
        )
        data = self._run_json(argv, "snapshots")
        found = [parts for parts in group_archives(data if isinstance(data, list) else []).values()
                 if parts.main is not None]
        if not found:
            raise ResticError(f"repository {self.name!r}: no archive {archive!r}")
        if len(found) > 1:
            hosts = ", ".join(sorted(parts.host for parts in found))
            raise ResticError(
                f"repository {self.name!r}: archive {archive!r} exists for several hosts ({hosts}); "
                "set the repository's `hosts:` to one of them"
            )
        return found[0]

    def _ls(self, snapshot_id: str) -> list[dict]:
        """Given a snapshot id, return its nodes as `restic ls --json` lists them (ResticError if unreadable)."""
        result = self._run_checked(rc.make_ls_command(self.binary, snapshot_id, options=self.options), "ls")
        try:
            return parse_ls_nodes(result.stdout)
        except ValueError:
            raise ResticError(f"repository {self.name!r}: restic ls printed an unreadable line") from None

    def _restore_sparse(self, snapshot_id: str, archive_path: str, workdir: str) -> str:
        argv = rc.make_restore_command(self.binary, snapshot_id, workdir, archive_path, sparse=True,
                                       options=self.options)
        self._run_checked(argv, "restore")
        extracted = os.path.join(workdir, archive_path.lstrip("/"))
        if not os.path.isfile(extracted):
            raise ResticError(f"repository {self.name!r}: {archive_path} not restored from snapshot {snapshot_id}")
        return extracted

    def _dump_sparse(self, snapshot_id: str, archive_path: str, workdir: str) -> str:
        extracted = os.path.join(workdir, "file")
        fd = os.open(extracted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            writer = SparseWriter(fd)
            argv = rc.make_dump_command(self.binary, snapshot_id, archive_path, options=self.options)
            result, log = self._run(argv, on_stdout=writer.write)
            if result.returncode != 0:
                raise self._error("dump", log, result)
            writer.close()
            os.fsync(fd)
        finally:
            os.close(fd)
        return extracted

    # --- retention and checks ----------------------------------------------------------------

    def prune(self, domain: str, policy: dict, dry_run: bool = False) -> PruneResult:
        """Given a domain and a complete retention policy, forget the snapshots of that domain's archives the
        policy does not keep; return the PruneResult (data is freed by `compact`).

        An archive is several snapshots (main + one per block device) tied by tags, so restic's
        own `forget --keep-*` grouping could keep half an archive: the policy is applied per
        archive with kvm_borg.retention (borg's rules, the same for both backends), per host,
        and the parts of each archive not kept are forgotten together by id. Only complete
        kvm-borg archives of this domain are candidates."""
        result = PruneResult(self.name, domain, ok=False, dry_run=dry_run)
        result.error = retention.empty_policy_refusal(domain, policy)
        if result.error:
            return result
        try:
            groups = self._groups(domain)
        except ResticError as exc:
            result.error = str(exc)
            return result
        by_host: dict[str, dict[str, tuple[datetime, ArchiveParts]]] = {}
        for (host, name), parts in groups.items():
            info = archive_info_from(parts, self.name, domain)
            if info is not None:
                by_host.setdefault(host, {})[name] = (datetime.fromisoformat(info.time), parts)
        forget: list[str] = []
        for host_archives in by_host.values():
            kept = retention.kept_archives({name: when for name, (when, _) in host_archives.items()}, policy)
            result.kept.update(kept)
            for name, (_, parts) in sorted(host_archives.items()):
                if name not in kept:
                    result.pruned.append(name)
                    forget.extend(str(snapshot["id"]) for snapshot in parts.snapshots)
        if forget and not dry_run:
            self._parts.clear()
            try:
                self._run_checked(rc.make_forget_command(self.binary, forget, options=self.options), "forget",
                                  deletes=True)
            except ResticError as exc:
                result.error = str(exc)
                return result
        result.ok = True
        return result

    def compact(self) -> None:
        """Free the space of forgotten snapshots (`restic prune`); a failure is a ResticError."""
        self._parts.clear()
        self._run_checked(rc.make_prune_command(self.binary, options=self.options,
                                                limit_upload_kib=self.limit_upload_kib), "prune", deletes=True)

    def check(self, verify_data: bool = False, read_data_subset: str | None = None) -> CheckResult:
        """Run `restic check` (`--read-data` with verify_data, else `--read-data-subset` if given); failures are ok=False."""
        started = time.monotonic()
        subset = None if verify_data else read_data_subset
        mode = "verify-data" if verify_data else f"read-data-subset={subset}" if subset else "metadata"
        argv = rc.make_check_command(self.binary, read_data=verify_data, read_data_subset=subset,
                                     options=self.options)
        try:
            result, log = self._run(argv)
        except ResticError as exc:
            return CheckResult(self.name, ok=False, mode=mode, seconds=time.monotonic() - started, error=str(exc))
        seconds = time.monotonic() - started
        if result.returncode != 0:
            return CheckResult(self.name, ok=False, mode=mode, seconds=seconds,
                               error=self._error("check", log, result).args[0])
        return CheckResult(self.name, ok=True, mode=mode, seconds=seconds)

    # --- running restic ---------------------------------------------------------------------

    def command_environment(self) -> dict[str, Any]:
        """Return what a restic run of this repository gets besides its argv, as run_command's keywords:
        {env, secret, secret_env} (for `kvm-borg restic`). restic reads its password itself
        (RESTIC_PASSWORD_FILE / _COMMAND in env), so there is no secret to hand over."""
        return {"env": self._environment(), "secret": None, "secret_env": None}

    def _environment(self) -> dict[str, str]:
        return rc.make_environment(
            os.environ,
            url=self.url,
            passphrase_file=self.repository.get("passphrase_file"),
            passphrase_command=self.repository.get("passphrase_command"),
            progress_fps=PROGRESS_FPS if self.progress else None,
        )

    def _run(self, argv: Sequence[str], *, stdin=None, on_stdout: Callable[[bytes], None] | None = None,
             deletes: bool = False) -> tuple[CommandResult, ResticLog]:
        """Given a restic argv, run it with this repository's environment; return the result and its ResticLog.

        restic releases its repository lock on SIGINT only, so that is how it is stopped. With
        `deletes` (forget, prune), the server's first refusal to delete a file (an append-only
        server) stops restic at once, instead of its ~45 s of retries, and is a ResticError saying so."""
        log = ResticLog()
        on_line = log.feed
        if deletes:
            def on_line(line: str) -> None:
                log.feed(line)
                kind = refused_delete(line)
                if kind:
                    raise _DeleteRefused(kind)
        try:
            result = run_command(argv, env=self._environment(), on_stderr_line=on_line, stdin=stdin,
                                 on_stdout=on_stdout, stop_signal=signal.SIGINT)
        except CommandError as exc:
            raise ResticError(f"repository {self.name!r}: {exc.message}") from None
        except _DeleteRefused as exc:
            raise ResticError(f"repository {self.name!r}: restic {argv[1]} stopped: "
                              + APPEND_ONLY_REFUSAL.format(kind=exc.args[0])) from None
        return result, log

    def _run_checked(self, argv: Sequence[str], subcommand: str, *, deletes: bool = False) -> CommandResult:
        result, log = self._run(argv, deletes=deletes)
        if result.returncode != 0:
            raise self._error(subcommand, log, result)
        return result

    def _run_json(self, argv: Sequence[str], subcommand: str):
        result = self._run_checked(argv, subcommand)
        try:
            return json.loads(result.stdout or "null")
        except ValueError:
            raise ResticError(f"repository {self.name!r}: restic {subcommand} printed unreadable JSON") from None

    def _error(self, subcommand: str, log: ResticLog, result: CommandResult) -> ResticError:
        return ResticError(f"repository {self.name!r}: restic {subcommand} failed: {self._reason(log, result)}")

    def _reason(self, log: ResticLog, result: CommandResult) -> str:
        """Given a failed restic run, return why in one line, with ssh's reason when the sftp session failed."""
        message = log.error_message(result.returncode)
        if self.sftp_command and log.lost_ssh_reason():
            reason = self._ssh_reason()
            if reason:
                message = one_line(f"{message} ({reason})")
        return message

    def _ssh_reason(self) -> str | None:
        """Run restic's sftp ssh command once more, with nothing to send, and return ssh's complaint (None if none)."""
        argv = shlex.split(self.sftp_command)
        argv[1:1] = ["-o", "ConnectTimeout=20"]
        try:
            result = run_command(argv)
        except CommandError:
            return None
        lines = [line for line in result.stderr_tail if line.strip()]
        return f"ssh: {lines[-1]}" if result.returncode != 0 and lines else None
