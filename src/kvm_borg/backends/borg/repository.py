"""The borg repository class: one borg 1.4 repository of the configuration, as a RepositoryBackend.

Borg has no public Python API, so every call builds an argv (`commands`), runs it through
`kvm_borg.execute` with the environment of `environment`, and reads borg's JSON output and
``--log-json`` stderr records with `output`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvm_borg import retention
from kvm_borg.backends.borg import commands
from kvm_borg.backends.borg.defaults import (
    DEFAULT_CHUNKER_PARAMS,
    DEFAULT_COMPRESSION,
    DEFAULT_ENCRYPTION,
    DEFAULT_LOCK_WAIT,
)
from kvm_borg.backends.borg.environment import (
    PASSPHRASE_FD_VARIABLE,
    files_cache_suffix,
    find_borg_binary,
    make_environment,
)
from kvm_borg.backends.borg.output import (
    NO_REPOSITORY_MSGIDS,
    BorgLog,
    archive_info_from,
    entry_kind,
    failed,
    is_foreign,
    parse_create_stats,
    parse_files_tar,
    parse_items,
    parse_prune_line,
    parse_version,
)
from kvm_borg.config_formats import rate_kib_per_second
from kvm_borg.errors import KvmBorgError, UsageError
from kvm_borg.execute import CommandError, CommandResult, run_command
from kvm_borg.models import ArchiveInfo, ArchiveRequest, BackendBase, BoundedBytes, CheckResult, PruneResult, StoreResult
from kvm_borg.progress import progress_of, transfer_progress
from kvm_borg.redact import redact_url

logger = logging.getLogger(__name__)


class BorgError(KvmBorgError):
    """A borg command of a repository failed; the message is one line naming the repository."""


@functools.lru_cache(maxsize=8)
def borg_version(binary: str) -> str:
    """Given a borg binary, run `borg --version` once and return its version, e.g. "1.4.0" (BorgError if unreadable)."""
    try:
        result = run_command(commands.make_version_command(binary), env={**os.environ, "TZ": "UTC"})
    except CommandError as exc:
        raise BorgError(exc.message) from None
    version = parse_version(result.stdout)
    if result.returncode != 0 or version is None:
        raise BorgError(f"cannot tell the version of {binary}: exit code {result.returncode}")
    return version


class BorgRepository(BackendBase):
    """One borg repository of the configuration, as a RepositoryBackend.

    In: the repository's config dict (`type: borg`, defaults filled in by the config) and the
    Settings (borg_binary, progress, hostname). The attributes callers read: `name`, `repository`
    (the config dict), `settings`, `location` (the repository path or ssh:// URL; repositories at
    one location are written one after the other), `host` (the host name this host's archives
    carry in their comment), `list_hosts`, and for `kvm-borg borg` / `key export`: `binary`,
    `lock_wait`."""

    exclusive_writes = True  # borg's create holds the repository's exclusive lock: one domain at a time

    def __init__(self, repository: Mapping[str, Any], settings: Any):
        self.repository = dict(repository)
        self.settings = settings
        self.name: str = repository["name"]
        self.location: str = repository["path"]
        self.host: str = getattr(settings, "hostname", None) or os.uname().nodename
        # Borg keeps no host index: list_archives returns every host's archives whatever this says (each
        # ArchiveInfo carries its host from the archive comment and kvm_borg.archive_choice picks by it).
        self.list_hosts: list[str] | None = None
        self.encryption: str = repository.get("encryption") or DEFAULT_ENCRYPTION
        self.compression: str = repository.get("compression") or DEFAULT_COMPRESSION
        self.chunker_params: str = repository.get("chunker_params") or DEFAULT_CHUNKER_PARAMS
        lock_wait = repository.get("lock_wait")
        self.lock_wait: int = DEFAULT_LOCK_WAIT if lock_wait is None else int(lock_wait)
        self.binary = find_borg_binary(getattr(settings, "borg_binary", None))
        self.progress = bool(getattr(settings, "progress", False))
        rate = repository.get("upload_ratelimit")  # bytes per second, checked by the schema
        self.upload_ratelimit_kib: int | None = rate_kib_per_second(rate) if rate else None

    def __repr__(self) -> str:
        return f"BorgRepository({self.name!r}, {redact_url(self.location)!r})"

    # --- RepositoryBackend ------------------------------------------------------------------

    def preflight(self) -> None:
        """Raise BorgError when the borg binary to run is missing or not executable."""
        path = self.binary if os.sep in self.binary else shutil.which(self.binary)
        if not path or not os.access(path, os.X_OK):
            raise BorgError(f"repository {self.name!r}: borg binary {self.binary} not found (borg_binary)")

    def version(self) -> str:
        """Return the version of the borg this repository runs, e.g. "1.4.0" (for `doctor`); BorgError if unknown."""
        try:
            return borg_version(self.binary)
        except BorgError as exc:
            raise BorgError(f"repository {self.name!r}: {exc}") from None

    def init(self) -> bool:
        """Create the repository (and its parent directories) unless it exists; return True if it was created."""
        argv = commands.make_init_command(self.binary, self.location, self.encryption)
        result, log = self._run(argv)
        if "Repository.AlreadyExists" in log.msgids:
            return False
        if failed(result.returncode):
            raise self._error("init", log, result)
        logger.info("created borg repository %s at %s (%s)", self.name, redact_url(self.location), self.encryption)
        return True

    def exists(self) -> bool:
        """Return whether a borg repository is at the configured location (a wrong passphrase still means yes)."""
        argv = commands.make_list_command(self.binary, self.location, last=1, lock_wait=self.lock_wait)
        result, log = self._run(argv)
        if not failed(result.returncode) or "PassphraseWrong" in log.msgids:
            return True
        if NO_REPOSITORY_MSGIDS.intersection(log.msgids):
            return False
        raise self._error("list", log, result)

    def store(self, request: ArchiveRequest) -> StoreResult:
        """Given an ArchiveRequest, write its archive with `borg create` and return the StoreResult.

        A borg failure is `ok=False` with a one-line error, never an exception; an interrupt
        (KeyboardInterrupt, Interrupted) stops borg and propagates."""
        started = time.monotonic()
        argv = commands.make_create_command(
            self.binary,
            self.location,
            request.archive_name,
            request.files,
            compression=self.compression,
            chunker_params=self.chunker_params,
            read_special=bool(request.block_devices),
            # No --sparse: borg's fixed chunker then cuts each data/hole range from its own start,
            # so a hole moving at an unaligned offset (QEMU, the host file system, a guest discard)
            # shifts every later chunk and the rest of the image is stored again. Without it the
            # chunks stay at fixed offsets; all-zero chunks are still never stored.
            sparse=False,
            plain_files=request.plain_files,
            comment=request.comment,
            upload_ratelimit_kib=self.upload_ratelimit_kib,
            progress=self.progress,
            lock_wait=self.lock_wait,
        )
        logger.info(
            "borg create %s::%s (%d files, %d bytes)",
            self.name, request.archive_name, len(request.files), request.total_bytes,
        )
        try:
            with transfer_progress(
                f"{request.domain} → {self.name}", request.total_bytes, enabled=self.progress
            ) as update:
                result, log = self._run(
                    argv, cache_suffix=files_cache_suffix(request.domain), on_progress=progress_of(request, update)
                )
        except (BorgError, CommandError) as exc:
            return StoreResult(self.name, ok=False, seconds=time.monotonic() - started, error=str(exc))
        seconds = time.monotonic() - started
        if failed(result.returncode):
            error = f"borg create failed: {log.error_message(result.returncode)}"
            return StoreResult(self.name, ok=False, seconds=seconds, error=error)

        if log.unread_files:  # the archive lacks the data of these files: it is no backup of the domain
            error = (f"borg could not read {len(log.unread_files)} file(s), the first: {log.unread_files[0]}; "
                     f"the incomplete archive {request.archive_name} was deleted")
            deleted = self._delete_quietly(request.archive_name)
            if not deleted:
                error = error.replace("was deleted", "could not be deleted: delete it with `borg delete`")
            return StoreResult(self.name, ok=False, seconds=seconds, error=error)
        warnings = []
        if result.returncode == 1:
            warnings = log.warnings or ["borg create finished with warnings (exit code 1)"]
        stats = parse_create_stats(result.stdout)
        if stats is None:
            warnings.append("borg create printed no readable statistics")
        original, deduplicated = stats or (0, 0)
        logger.info(
            "stored %s::%s: %d bytes, %d new after deduplication, %.1fs",
            self.name, request.archive_name, original, deduplicated, seconds,
        )
        return StoreResult(
            self.name,
            ok=True,
            archive=request.archive_name,
            original_size=original,
            deduplicated_size=deduplicated,
            seconds=seconds,
            warnings=warnings,
        )

    def _delete_quietly(self, archive: str) -> bool:
        """Given the name of an archive this run just wrote, delete it (`borg delete`); return whether it went."""
        try:
            result, _log = self._run(commands.make_delete_command(self.binary, self.location, archive,
                                                                  lock_wait=self.lock_wait))
        except (BorgError, CommandError) as exc:
            logger.warning("could not delete the incomplete archive %s: %s", archive, exc)
            return False
        return not failed(result.returncode)

    def list_archives(self, domain: str | None = None) -> list[ArchiveInfo]:
        """Given a domain name (None: all), return kvm-borg's archives in time order, from one `borg info --json`.

        Archives without a kvm-borg comment are someone else's and are left out."""
        argv = commands.make_info_command(
            self.binary, self.location, glob=commands.archive_glob(domain), lock_wait=self.lock_wait
        )
        data = self._run_json(argv, "info")
        infos = (archive_info_from(entry, self.name, domain) for entry in data.get("archives", []))
        return [info for info in infos if info is not None]

    def list_paths(self, archive: str) -> list[str]:
        """Given an archive name, return the paths stored in it as borg names them (no leading "/")."""
        return [item["path"] for item in self._items(archive)]

    def list_entries(self, archive: str) -> dict[str, str]:
        """Given an archive name, return {stored path (no leading "/"): kind} with kind one of file, dir,
        symlink, hardlink, device, fifo, socket, other (from `borg list --json-lines`' `type`)."""
        return {str(item["path"]).lstrip("/"): entry_kind(item) for item in self._items(archive)}

    def _items(self, archive: str) -> list[dict]:
        """Given an archive name, return its items as `borg list --json-lines` prints them (BorgError if unreadable)."""
        argv = commands.make_list_archive_paths_command(self.binary, self.location, archive, lock_wait=self.lock_wait)
        result = self._run_checked(argv, "list")
        try:
            return parse_items(result.stdout)
        except ValueError:
            raise BorgError(f"repository {self.name!r}: borg list printed an unreadable line") from None

    def extract_file(self, archive: str, archive_path: str, destination: Path) -> None:
        """Given an archive, one stored path and a destination file, extract it sparse and rename it into place.

        Borg writes into a temporary directory beside `destination` (same file system), so the
        destination appears only when complete."""
        destination = Path(destination)
        argv = commands.make_extract_command(
            self.binary, self.location, archive, [archive_path], sparse=True, lock_wait=self.lock_wait
        )
        import tempfile  # only a restore extracts: not imported on a backup's start-up

        try:
            workdir = tempfile.mkdtemp(prefix=".kvm-borg-extract-", dir=destination.parent)
        except OSError as exc:
            raise BorgError(f"cannot extract to {destination}: {exc.strerror or exc}") from None
        try:
            result, log = self._run(argv, cwd=workdir)
            if failed(result.returncode):
                raise self._error("extract", log, result)
            extracted = Path(workdir, archive_path)
            if not extracted.is_file():
                reason = log.warnings[-1] if log.warnings else "no such file"
                raise BorgError(f"repository {self.name!r}: {archive_path} not extracted from {archive}: {reason}")
            os.replace(extracted, destination)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def extract_into(self, archive: str, archive_path: str, workdir: str) -> bool:
        """Given an archive, one stored regular file and an empty private directory, let borg write the file at
        `workdir/archive_path` (`borg extract --sparse`: all-zero chunks are holes; no flags, ACLs or xattrs
        from the archive); return True. Borg refuses paths that are absolute or climb with `..`, and never
        follows a symlink on the way; the caller checks what was written. A borg failure, or a path the
        archive does not hold, is a BorgError."""
        argv = commands.make_extract_command(self.binary, self.location, archive, [archive_path], sparse=True,
                                             lock_wait=self.lock_wait, plain=True)
        result, log = self._run(argv, cwd=workdir)
        if failed(result.returncode):
            raise self._error("extract", log, result)
        if any("never matched" in w for w in log.warnings):
            raise BorgError(f"repository {self.name!r}: {archive_path} is not in {archive}")
        return True

    def read_files(self, archive: str, archive_paths: Sequence[str], limit: int) -> dict[str, bytes]:
        """Given an archive, stored regular files and a size limit per file, return {path: bytes} of those the
        archive holds as regular files, read in ONE borg run (`borg export-tar - pf:...`, every chunk
        authenticated); a path it lacks, or holds as anything else, is left out. A file larger than `limit`
        is a UsageError; a borg failure or an unreadable tar a BorgError."""
        if not archive_paths:
            return {}
        budget = len(archive_paths) * (limit + 1024) + 10240  # the files, their tar headers and the end blocks
        collect = BoundedBytes(budget, f"the small files asked for in {archive} are larger than {limit} bytes each")
        argv = commands.make_export_files_command(self.binary, self.location, archive, archive_paths,
                                                  lock_wait=self.lock_wait)
        result, log = self._run(argv, on_stdout=collect)
        if failed(result.returncode):
            raise self._error("export-tar", log, result)
        data = collect.value()
        try:
            return parse_files_tar(data, archive_paths, limit, archive)
        except ValueError as exc:
            if "larger than" in str(exc):
                raise UsageError(str(exc)) from None
            raise BorgError(f"repository {self.name!r}: {exc}") from None

    def archive_path(self, host_path: str) -> str:
        """Given an absolute host path, return the path borg stores it under (without the leading "/")."""
        return posixpath.normpath(host_path).lstrip("/")

    def stream_file(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Given an archive and one stored path, pass the file's bytes as stored to `write`, in order.

        `borg extract --stdout`: every chunk is authenticated by borg as it is read."""
        argv = commands.make_extract_command(
            self.binary, self.location, archive, [archive_path], stdout=True, lock_wait=self.lock_wait
        )
        result, log = self._run(argv, on_stdout=write)
        if failed(result.returncode):
            raise self._error("extract", log, result)
        if any("never matched" in w for w in log.warnings):
            raise BorgError(f"repository {self.name!r}: {archive_path} is not in {archive}")

    def stream_tar(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Given an archive and one stored directory, pass an uncompressed tar stream of it (and what lies
        below it) to `write`, in order (`borg export-tar ... -`: every chunk authenticated as it is read).
        A path the archive does not hold is a BorgError."""
        argv = commands.make_export_tar_command(self.binary, self.location, archive, archive_path,
                                                lock_wait=self.lock_wait)
        result, log = self._run(argv, on_stdout=write)
        if failed(result.returncode):
            raise self._error("export-tar", log, result)
        if any("never matched" in w for w in log.warnings):
            raise BorgError(f"repository {self.name!r}: {archive_path} is not in {archive}")

    def mount(self, archive: str, mountpoint: str, *, shared: bool = False) -> str:
        """Given an archive and an empty directory, mount the archive there read-only (FUSE, in the
        background; `shared`: readable by other users too); return the directory that holds the archive's root."""
        result, log = self._run(commands.make_mount_command(self.binary, self.location, archive, mountpoint,
                                                            lock_wait=self.lock_wait, shared=shared), fuse=True)
        if failed(result.returncode):
            raise self._error("mount", log, result)
        return mountpoint

    def unmount(self, mountpoint: str) -> None:
        """Given a directory `mount` mounted, unmount it (borg's FUSE process then exits)."""
        result, log = self._run(commands.make_umount_command(self.binary, mountpoint))
        if failed(result.returncode):
            raise self._error("umount", log, result)

    def foreign_archives(self, domain: str) -> list[str]:
        """Given a domain, return archives whose names match its archive glob but that kvm-borg did not make for it."""
        argv = commands.make_list_command(
            self.binary, self.location, glob=commands.archive_glob(domain), lock_wait=self.lock_wait,
            format="{comment}",
        )
        entries = self._run_json(argv, "list").get("archives", [])
        return [entry["name"] for entry in entries if is_foreign(entry, domain)]

    def prune(self, domain: str, policy: dict, dry_run: bool = False) -> PruneResult:
        """Given a domain and a complete retention policy, prune that domain's archives only and return the PruneResult.

        `borg prune --glob-archives` with the domain's exact archive glob; refused (ok=False,
        nothing deleted) when an archive kvm-borg did not make for this domain matches the glob.
        Space is freed only by `compact`."""
        result = PruneResult(self.name, domain, ok=False, dry_run=dry_run)
        result.error = retention.empty_policy_refusal(domain, policy)
        if result.error:
            return result
        try:
            foreign = self.foreign_archives(domain)
            if foreign:
                result.error = (f"archive {foreign[0]} matches the archive names of domain '{domain}' but was not "
                                f"made by kvm-borg for it: not pruning '{domain}' in {self.name}")
                return result
            argv = commands.make_prune_command(
                self.binary, self.location, commands.archive_glob(domain), commands.make_keep_flags(policy),
                dry_run=dry_run, lock_wait=self.lock_wait,
            )
            run, log = self._run(argv)
        except BorgError as exc:
            result.error = str(exc)
            return result
        if failed(run.returncode):
            result.error = self._error("prune", log, run).args[0]
            return result
        for line in log.list_lines:
            parsed = parse_prune_line(line)
            if parsed is None:
                continue
            action, name, rule = parsed
            if action == "kept":
                result.kept[name] = rule
            else:
                result.pruned.append(name)
        result.ok = True
        return result

    def compact(self) -> None:
        """Free the space of deleted archives (`borg compact`); a failure is a BorgError."""
        self._run_checked(commands.make_compact_command(self.binary, self.location, lock_wait=self.lock_wait),
                          "compact")

    def check(self, verify_data: bool = False, read_data_subset: str | None = None) -> CheckResult:
        """Run `borg check` (with `verify_data`, `--verify-data`) and return the CheckResult; failures are ok=False.

        Borg cannot read a subset of the data: with `read_data_subset` it runs the plain check,
        which already reads every segment and checks its CRC, and says so in the result's mode."""
        started = time.monotonic()
        mode = "verify-data" if verify_data else "metadata"
        if read_data_subset and not verify_data:
            logger.info("repository %s: borg cannot check a subset of the data; running borg check", self.name)
        argv = commands.make_check_command(
            self.binary, self.location, verify_data=verify_data, lock_wait=self.lock_wait, progress=self.progress,
        )
        try:
            run, log = self._run(argv)
        except BorgError as exc:
            return CheckResult(self.name, ok=False, mode=mode, seconds=time.monotonic() - started, error=str(exc))
        seconds = time.monotonic() - started
        if run.returncode != 0:  # borg check reports what it found wrong with exit code 1
            return CheckResult(self.name, ok=False, mode=mode, seconds=seconds,
                               error=self._error("check", log, run).args[0])
        return CheckResult(self.name, ok=True, mode=mode, seconds=seconds)

    # --- running borg -----------------------------------------------------------------------

    def _passphrase(self) -> bytes | None:
        """Return the passphrase_file's bytes (None without one); an unreadable file is a BorgError."""
        path = self.repository.get("passphrase_file")
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise BorgError(
                f"repository {self.name!r}: cannot read passphrase_file {path}: {exc.strerror or exc}"
            ) from None

    def command_environment(self) -> dict[str, Any]:
        """Return what a borg run of this repository gets besides its argv, as run_command's keywords:
        {env, secret, secret_env} (for `kvm-borg key export` and `kvm-borg borg`)."""
        secret = self._passphrase()
        return {"env": make_environment(self.repository, os.environ, fuse=True), "secret": secret,
                "secret_env": PASSPHRASE_FD_VARIABLE if secret is not None else None}

    def _run(
        self,
        argv: Sequence[str],
        *,
        cache_suffix: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        cwd: str | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        fuse: bool = False,
    ) -> tuple[CommandResult, BorgLog]:
        """Given a borg argv (`fuse`: it is `borg mount`), run it with our environment and passphrase; return the
        result and its BorgLog."""
        secret = self._passphrase()
        log = BorgLog(on_progress)
        try:
            result = run_command(
                argv,
                env=make_environment(self.repository, os.environ, cache_suffix=cache_suffix, fuse=fuse),
                secret=secret,
                secret_env=PASSPHRASE_FD_VARIABLE if secret is not None else None,
                on_stderr_line=log.feed,
                cwd=cwd,
                on_stdout=on_stdout,
            )
        except CommandError as exc:
            raise BorgError(f"repository {self.name!r}: {exc.message}") from None
        return result, log

    def _run_checked(self, argv: Sequence[str], subcommand: str) -> CommandResult:
        """Given a borg argv, run it and return its result; a failure (exit code >= 2) is a BorgError."""
        result, log = self._run(argv)
        if failed(result.returncode):
            raise self._error(subcommand, log, result)
        return result

    def _run_json(self, argv: Sequence[str], subcommand: str) -> dict:
        """Given a borg argv with --json, run it and return the parsed object."""
        result = self._run_checked(argv, subcommand)
        try:
            data = json.loads(result.stdout)
        except ValueError:
            raise BorgError(f"repository {self.name!r}: borg {subcommand} printed unreadable JSON") from None
        if not isinstance(data, dict):
            raise BorgError(f"repository {self.name!r}: borg {subcommand} printed unexpected JSON")
        return data

    def _error(self, subcommand: str, log: BorgLog, result: CommandResult) -> BorgError:
        return BorgError(
            f"repository {self.name!r}: borg {subcommand} failed: {log.error_message(result.returncode)}"
        )
