"""The borg backend: stores each domain's archive in a borg 1.4 repository through the borg CLI.

A plugin like any other: `kvm_borg_repository_backend` answers for repositories of
``type: borg``. Borg has no public Python API, so every call builds an argv
(`borg_commands`), runs it through `kvm_borg.execute` and reads borg's JSON output and
``--log-json`` stderr records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvm_borg.metadata import parse_archive_comment
from kvm_borg.backends import borg_commands
from kvm_borg.backends.ssh_options import with_default_options
from kvm_borg.errors import KvmBorgError
from kvm_borg.execute import CommandError, CommandResult, one_line, run_command
from kvm_borg.hookspecs import hookimpl
from kvm_borg.models import ArchiveInfo, ArchiveRequest, BackendBase, CheckResult, PruneResult, StoreResult
from kvm_borg.progress import transfer_progress
from kvm_borg.redact import redact_url

logger = logging.getLogger(__name__)

DEFAULT_ENCRYPTION = "repokey-blake2"
DEFAULT_COMPRESSION = "lz4"
DEFAULT_CHUNKER_PARAMS = "fixed,4194304"
DEFAULT_LOCK_WAIT = 60
# Without a configured ssh_command: never ask for a password or a host key, fail instead.
DEFAULT_SSH_COMMAND = "ssh -o BatchMode=yes"

# Set for every borg run, whatever the caller's environment says: borg never prompts, never
# accepts a moved or unknown unencrypted repository, never deletes or repairs without asking,
# reports 0/1/2 exit codes and prints times in UTC.
FIXED_ENVIRONMENT = {
    "BORG_DISPLAY_PASSPHRASE": "no",
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "no",
    "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "NO",
    "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "NO",
    "BORG_EXIT_CODES": "legacy",
    "TZ": "UTC",
}
# Inherited variables that would change which secret, repository or ssh borg uses.
DROPPED_ENVIRONMENT = frozenset(
    {
        "BORG_PASSPHRASE",
        "BORG_PASSCOMMAND",
        "BORG_PASSPHRASE_FD",
        "BORG_NEW_PASSPHRASE",
        "BORG_DEBUG_PASSPHRASE",
        "BORG_REPO",
        "BORG_RSH",
        "BORG_REMOTE_PATH",
        "BORG_FILES_CACHE_SUFFIX",
    }
)
# msgids of `borg list` meaning "there is no repository here".
_NO_REPOSITORY_MSGIDS = frozenset({"Repository.DoesNotExist", "Repository.InvalidRepository"})
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b.*$", re.MULTILINE)


class BorgError(KvmBorgError):
    """A borg command of a repository failed; the message is one line naming the repository."""


@hookimpl
def kvm_borg_repository_backend(repository, settings):
    """Given a repository config dict and the Settings, return a BorgRepository for `type: borg`, else None."""
    if repository.get("type") != "borg":
        return None
    return BorgRepository(repository, settings)


def find_borg_binary(configured: str | None) -> str:
    """Given the configured borg_binary (None: not set), return the borg to run.

    Unset means the borg installed beside the running interpreter (our own venv's), else the
    one on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).parent / "borg"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("borg") or "borg"


def files_cache_suffix(domain: str) -> str:
    """Given a domain name, return a BORG_FILES_CACHE_SUFFIX that is safe as a file name and unique to it.

    One files cache per domain: borg forgets files not seen in its last 20 runs of a cache, so a
    shared cache would forget every image of a repository that holds more than 20 domains."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", domain)[:80]
    if safe != domain:
        safe += "-" + hashlib.sha256(domain.encode()).hexdigest()[:8]
    return f"kvm-borg-{safe}"


def make_environment(
    repository: Mapping[str, Any], inherited: Mapping[str, str], *, cache_suffix: str | None = None
) -> dict[str, str]:
    """Given a repository config and the inherited environment, return borg's environment.

    It never holds a passphrase: a `passphrase_file` goes through BORG_PASSPHRASE_FD at run
    time; a `passphrase_command` is a command, so it goes into BORG_PASSCOMMAND. BORG_RSH is the
    ssh_command with kvm-borg's keepalive and connect-timeout defaults (`ssh_options`)."""
    env = {key: value for key, value in inherited.items() if key not in DROPPED_ENVIRONMENT}
    env.update(FIXED_ENVIRONMENT)
    env["BORG_RSH"] = with_default_options(repository.get("ssh_command") or DEFAULT_SSH_COMMAND)
    if repository.get("remote_path"):
        env["BORG_REMOTE_PATH"] = repository["remote_path"]
    if repository.get("passphrase_command"):
        env["BORG_PASSCOMMAND"] = repository["passphrase_command"]
    if cache_suffix:
        env["BORG_FILES_CACHE_SUFFIX"] = cache_suffix
    return env


parse_comment = parse_archive_comment  # the comment is built by metadata.archive_comment


def archive_info_from(entry: Mapping[str, Any], repository: str, domain: str | None = None) -> ArchiveInfo | None:
    """Given one archive of `borg info --json`, return its ArchiveInfo, or None if it is not kvm-borg's (or not `domain`'s)."""
    meta = parse_comment(entry.get("comment"))
    if meta is None or (domain is not None and meta["domain"] != domain):
        return None
    stats = entry.get("stats") or {}
    disks = meta.get("disks") or []
    return ArchiveInfo(
        name=entry["name"],
        domain=meta["domain"],
        time=_utc_iso(entry.get("start") or entry.get("time") or ""),
        repository=repository,
        original_size=stats.get("original_size"),
        deduplicated_size=stats.get("deduplicated_size"),
        disks=tuple(d["target"] if isinstance(d, dict) and "target" in d else str(d) for d in disks),
        host=meta.get("host"),
    )


def _utc_iso(borg_time: str) -> str:
    """Given a borg JSON time (naive, UTC because we run borg with TZ=UTC), return ISO 8601 with its offset."""
    try:
        return datetime.fromisoformat(borg_time).replace(tzinfo=timezone.utc).isoformat(timespec="seconds")
    except ValueError:
        return borg_time


# One line of `borg prune --list`: "{action:<44} {archive:<36} {time} [{id}]".
_PRUNE_LINE = re.compile(
    r"^(?P<action>Would prune:|Pruning archive \(\d+/\d+\):|Keeping checkpoint archive:"
    r"|Keeping archive \(rule: (?P<rule>[^#]+?) #\d+\):)\s+(?P<name>.+?)\s+"
    r"\w{3}, \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[[0-9a-f]{64}\]\s*$"
)
# borg's rule names -> kvm-borg's (keep_last is borg's keep-secondly).
_BORG_RULES = {"within": "keep_within", "secondly": "keep_last", "minutely": "keep_minutely",
               "hourly": "keep_hourly", "daily": "keep_daily", "weekly": "keep_weekly",
               "monthly": "keep_monthly", "yearly": "keep_yearly"}


def parse_prune_line(line: str) -> tuple[str, str, str | None] | None:
    """Given one line of `borg prune --list`, return (kept|pruned, archive, rule) or None if it is no such line."""
    match = _PRUNE_LINE.match(line)
    if not match:
        return None
    action, name = match.group("action"), match.group("name")
    if action.startswith("Keeping archive"):
        rule = match.group("rule")
        base, oldest = (rule[:-len("[oldest]")], True) if rule.endswith("[oldest]") else (rule, False)
        ours = _BORG_RULES.get(base, base)
        return "kept", name, f"{ours} (oldest)" if oldest else ours
    if action.startswith("Keeping checkpoint"):
        return "kept", name, "checkpoint"
    return "pruned", name, None


class BorgLog:
    """Given borg's `--log-json` stderr lines one at a time, log them and keep what results need."""

    def __init__(self, on_progress: Callable[[int], None] | None = None):
        self.on_progress = on_progress
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.msgids: list[str] = []
        self.tracebacks: list[str] = []
        self.other_lines: list[str] = []
        self.refused: list[str] = []  # questions borg asked that our environment answered "no"
        self.list_lines: list[str] = []  # `--list` output (borg.output.list), e.g. of prune
        self._question = ""

    def feed(self, line: str) -> None:
        """Given one stderr line, record it (a JSON record of borg's, or a plain line)."""
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.other_lines.append(line)
            logger.info("borg: %s", line)
            return
        kind = record.get("type")
        if kind == "archive_progress":
            if self.on_progress is not None and "original_size" in record:
                self.on_progress(int(record["original_size"]))
        elif kind == "log_message":
            self._log_message(record)
        elif kind == "question_prompt":
            self._question = (str(record.get("message", "")).strip().splitlines() or [""])[0]
            logger.debug("borg asks: %s", record.get("message"))
        elif kind == "question_accepted_false":
            self.refused.append(f"{self._question or 'a question'} Answered no by {record.get('msgid')}=no")
        else:  # progress_message, progress_percent, file_status
            logger.debug("borg: %s", record.get("message") or record)

    def _log_message(self, record: Mapping[str, Any]) -> None:
        message = str(record.get("message", "")).strip()
        level = record.get("levelname", "INFO")
        if record.get("msgid"):
            self.msgids.append(record["msgid"])
        if record.get("name") == "borg.output.list":
            self.list_lines.append(message)
        if level in ("ERROR", "CRITICAL"):
            if message.startswith("Traceback"):
                self.tracebacks.append(message)
            else:
                self.errors.append(one_line(message.splitlines()[0] if message else ""))
            logger.debug("borg: %s", message)  # the caller reports the error itself
        elif level == "WARNING" and (_is_new_files_cache(message) or "KEY AND PASSPHRASE" in message):
            # expected on a first run / `borg init`'s key advice (kvm-borg gives its own): not a problem
            logger.info("borg: %s", message)
        elif level == "WARNING":
            self.warnings.append(one_line(message))
            logger.warning("borg: %s", message)
        else:
            logger.log(logging.DEBUG if level == "DEBUG" else logging.INFO, "borg: %s", message)

    def error_message(self, returncode: int | None) -> str:
        """Given borg's exit code, return one line saying why it failed, with the remote side's reason if any."""
        if self.errors:
            message = self.errors[0]
            if message in ("Local Exception", "Remote Exception") and self.tracebacks:
                found = _EXCEPTION_LINE.findall(self.tracebacks[-1])
                if found:
                    message = f"{message}: {found[-1]}"
        elif self.other_lines:
            message = one_line(self.other_lines[-1])
        elif returncode is not None and returncode < 0:
            message = f"borg was killed by signal {-returncode}"
        else:
            message = f"borg exited with code {returncode}"
        if self.refused:
            message = f"{message} ({self.refused[-1]})"
        remote = [w for w in self.warnings if w.startswith("Remote:")]
        if remote and remote[-1] not in message:
            message = f"{message} ({remote[-1]})"
        return one_line(message)


def _is_new_files_cache(message: str) -> bool:
    """Given a borg warning, return whether it only says a domain's files cache does not exist yet.

    Borg says so on the first backup of each domain (see files_cache_suffix); that is expected."""
    return "files cache" in message and (
        "No such file or directory" in message or message.startswith("Continuing without files cache")
    )


def _failed(returncode: int) -> bool:
    """Given a borg exit code, return whether the command failed (1 is success with warnings)."""
    return returncode < 0 or returncode >= 2


class BorgRepository(BackendBase):
    """One borg repository of the configuration, as a RepositoryBackend."""

    def __init__(self, repository: Mapping[str, Any], settings: Any):
        self.repository = dict(repository)
        self.settings = settings
        self.name: str = repository["name"]
        self.location: str = repository["path"]
        self.encryption: str = repository.get("encryption") or DEFAULT_ENCRYPTION
        self.compression: str = repository.get("compression") or DEFAULT_COMPRESSION
        self.chunker_params: str = repository.get("chunker_params") or DEFAULT_CHUNKER_PARAMS
        lock_wait = repository.get("lock_wait")
        self.lock_wait: int = DEFAULT_LOCK_WAIT if lock_wait is None else int(lock_wait)
        self.binary = find_borg_binary(getattr(settings, "borg_binary", None))
        self.progress = bool(getattr(settings, "progress", False))

    def __repr__(self) -> str:
        return f"BorgRepository({self.name!r}, {redact_url(self.location)!r})"

    # --- RepositoryBackend ------------------------------------------------------------------

    def preflight(self) -> None:
        """Raise BorgError when the borg binary to run is missing or not executable."""
        path = self.binary if os.sep in self.binary else shutil.which(self.binary)
        if not path or not os.access(path, os.X_OK):
            raise BorgError(f"repository {self.name!r}: borg binary {self.binary} not found (borg_binary)")

    def init(self) -> bool:
        """Create the repository (and its parent directories) unless it exists; return True if it was created."""
        argv = borg_commands.make_init_command(self.binary, self.location, self.encryption)
        result, log = self._run(argv)
        if "Repository.AlreadyExists" in log.msgids:
            return False
        if _failed(result.returncode):
            raise self._error("init", log, result)
        logger.info("created borg repository %s at %s (%s)", self.name, redact_url(self.location), self.encryption)
        return True

    def exists(self) -> bool:
        """Return whether a borg repository is at the configured location (a wrong passphrase still means yes)."""
        argv = borg_commands.make_list_command(self.binary, self.location, last=1, lock_wait=self.lock_wait)
        result, log = self._run(argv)
        if not _failed(result.returncode) or "PassphraseWrong" in log.msgids:
            return True
        if _NO_REPOSITORY_MSGIDS.intersection(log.msgids):
            return False
        raise self._error("list", log, result)

    def store(self, request: ArchiveRequest) -> StoreResult:
        """Given an ArchiveRequest, write its archive with `borg create` and return the StoreResult.

        A borg failure is `ok=False` with a one-line error, never an exception; an interrupt
        (KeyboardInterrupt, Interrupted) stops borg and propagates."""
        started = time.monotonic()
        argv = borg_commands.make_create_command(
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
            comment=request.comment,
            progress=self.progress,
            log_json=True,
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
                    argv, cache_suffix=files_cache_suffix(request.domain), on_progress=update
                )
        except (BorgError, CommandError) as exc:
            return StoreResult(self.name, ok=False, seconds=time.monotonic() - started, error=str(exc))
        seconds = time.monotonic() - started
        if _failed(result.returncode):
            error = f"borg create failed: {log.error_message(result.returncode)}"
            return StoreResult(self.name, ok=False, seconds=seconds, error=error)

        warnings = []
        if result.returncode == 1:
            warnings = log.warnings or ["borg create finished with warnings (exit code 1)"]
        try:
            stats = json.loads(result.stdout)["archive"]["stats"]
            original, deduplicated = int(stats["original_size"]), int(stats["deduplicated_size"])
        except (ValueError, KeyError, TypeError):
            original = deduplicated = 0
            warnings.append("borg create printed no readable statistics")
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

    def list_archives(self, domain: str | None = None) -> list[ArchiveInfo]:
        """Given a domain name (None: all), return kvm-borg's archives in time order, from one `borg info --json`.

        Archives without a kvm-borg comment are someone else's and are left out."""
        argv = borg_commands.make_info_command(
            self.binary, self.location, glob=borg_commands.archive_glob(domain), lock_wait=self.lock_wait
        )
        data = self._run_json(argv, "info")
        infos = (archive_info_from(entry, self.name, domain) for entry in data.get("archives", []))
        return [info for info in infos if info is not None]

    def list_paths(self, archive: str) -> list[str]:
        """Given an archive name, return the paths stored in it as borg names them (no leading "/")."""
        argv = borg_commands.make_list_archive_paths_command(
            self.binary, self.location, archive, lock_wait=self.lock_wait
        )
        result = self._run_checked(argv, "list")
        paths = []
        for line in result.stdout.splitlines():
            if line.strip():
                try:
                    paths.append(json.loads(line)["path"])
                except (ValueError, KeyError, TypeError):
                    raise BorgError(f"repository {self.name!r}: borg list printed an unreadable line") from None
        return paths

    def list_entries(self, archive: str) -> dict[str, str]:
        """Given an archive name, return {stored path (no leading "/"): kind} with kind one of file, dir,
        symlink, hardlink, device, fifo, socket, other (from `borg list --json-lines`' `type`)."""
        argv = borg_commands.make_list_archive_paths_command(
            self.binary, self.location, archive, lock_wait=self.lock_wait
        )
        result = self._run_checked(argv, "list")
        kinds = {"-": "file", "d": "dir", "l": "symlink", "h": "hardlink", "b": "device", "c": "device",
                 "p": "fifo", "s": "socket"}
        entries: dict[str, str] = {}
        for line in result.stdout.splitlines():
            if line.strip():
                try:
                    item = json.loads(line)
                    path, kind = item["path"], kinds.get(item.get("type"), "other")
                except (ValueError, KeyError, TypeError):
                    raise BorgError(f"repository {self.name!r}: borg list printed an unreadable line") from None
                if kind == "file" and item.get("source"):  # borg 1.x: a hard link to an earlier item
                    kind = "hardlink"
                entries[str(path).lstrip("/")] = kind
        return entries

    def extract_file(self, archive: str, archive_path: str, destination: Path) -> None:
        """Given an archive, one stored path and a destination file, extract it sparse and rename it into place.

        Borg writes into a temporary directory beside `destination` (same file system), so the
        destination appears only when complete."""
        destination = Path(destination)
        argv = borg_commands.make_extract_command(
            self.binary, self.location, archive, [archive_path], sparse=True, lock_wait=self.lock_wait
        )
        try:
            workdir = tempfile.mkdtemp(prefix=".kvm-borg-extract-", dir=destination.parent)
        except OSError as exc:
            raise BorgError(f"cannot extract to {destination}: {exc.strerror or exc}") from None
        try:
            result, log = self._run(argv, cwd=workdir)
            if _failed(result.returncode):
                raise self._error("extract", log, result)
            extracted = Path(workdir, archive_path)
            if not extracted.is_file():
                reason = log.warnings[-1] if log.warnings else "no such file"
                raise BorgError(f"repository {self.name!r}: {archive_path} not extracted from {archive}: {reason}")
            os.replace(extracted, destination)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def archive_path(self, host_path: str) -> str:
        """Given an absolute host path, return the path borg stores it under (without the leading "/")."""
        return posixpath.normpath(host_path).lstrip("/")

    def stream_file(self, archive: str, archive_path: str, write: Callable[[bytes], None]) -> None:
        """Given an archive and one stored path, pass the file's bytes as stored to `write`, in order.

        `borg extract --stdout`: every chunk is authenticated by borg as it is read."""
        argv = borg_commands.make_extract_command(
            self.binary, self.location, archive, [archive_path], stdout=True, lock_wait=self.lock_wait
        )
        result, log = self._run(argv, on_stdout=write)
        if _failed(result.returncode):
            raise self._error("extract", log, result)
        if any("never matched" in w for w in log.warnings):
            raise BorgError(f"repository {self.name!r}: {archive_path} is not in {archive}")

    def mount(self, archive: str, mountpoint: str) -> str:
        """Given an archive and an empty directory, mount the archive there read-only (FUSE, in the
        background); return the directory that holds the archive's root."""
        argv = (self.binary, "mount", "--log-json") + (
            ("--lock-wait", str(self.lock_wait)) if self.lock_wait is not None else ()
        ) + ("-o", "ro", borg_commands.archive_location(self.location, archive), mountpoint)
        result, log = self._run(argv)
        if _failed(result.returncode):
            raise self._error("mount", log, result)
        return mountpoint

    def unmount(self, mountpoint: str) -> None:
        """Given a directory `mount` mounted, unmount it (borg's FUSE process then exits)."""
        result, log = self._run((self.binary, "umount", "--log-json", mountpoint))
        if _failed(result.returncode):
            raise self._error("umount", log, result)

    def foreign_archives(self, domain: str) -> list[str]:
        """Given a domain, return archives whose names match its archive glob but that kvm-borg did not make for it."""
        argv = borg_commands.make_list_command(
            self.binary, self.location, glob=borg_commands.archive_glob(domain), lock_wait=self.lock_wait,
            format="{comment}",
        )
        entries = self._run_json(argv, "list").get("archives", [])
        return [e["name"] for e in entries if (parse_comment(e.get("comment")) or {}).get("domain") != domain]

    def prune(self, domain: str, policy: dict, dry_run: bool = False) -> PruneResult:
        """Given a domain and a complete retention policy, prune that domain's archives only and return the PruneResult.

        `borg prune --glob-archives` with the domain's exact archive glob; refused (ok=False,
        nothing deleted) when an archive kvm-borg did not make for this domain matches the glob.
        Space is freed only by `compact`."""
        from kvm_borg import retention

        result = PruneResult(self.name, domain, ok=False, dry_run=dry_run)
        if retention.is_empty(policy):
            result.error = f"the retention policy of domain '{domain}' keeps nothing: refusing to prune"
            return result
        try:
            foreign = self.foreign_archives(domain)
            if foreign:
                result.error = (f"archive {foreign[0]} matches the archive names of domain '{domain}' but was not "
                                f"made by kvm-borg for it: not pruning '{domain}' in {self.name}")
                return result
            argv = borg_commands.make_prune_command(
                self.binary, self.location, borg_commands.archive_glob(domain), retention.borg_flags(policy),
                dry_run=dry_run, lock_wait=self.lock_wait,
            )
            run, log = self._run(argv)
        except BorgError as exc:
            result.error = str(exc)
            return result
        if _failed(run.returncode):
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
        self._run_checked(borg_commands.make_compact_command(self.binary, self.location, lock_wait=self.lock_wait),
                          "compact")

    def check(self, verify_data: bool = False, read_data_subset: str | None = None) -> CheckResult:
        """Run `borg check` (with `verify_data`, `--verify-data`) and return the CheckResult; failures are ok=False.

        Borg cannot read a subset of the data: with `read_data_subset` it runs the plain check,
        which already reads every segment and checks its CRC, and says so in the result's mode."""
        started = time.monotonic()
        mode = "verify-data" if verify_data else "metadata"
        if read_data_subset and not verify_data:
            logger.info("repository %s: borg cannot check a subset of the data; running borg check", self.name)
        argv = borg_commands.make_check_command(
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
        return {"env": make_environment(self.repository, os.environ), "secret": secret,
                "secret_env": "BORG_PASSPHRASE_FD" if secret is not None else None}

    def _run(
        self,
        argv: Sequence[str],
        *,
        cache_suffix: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        cwd: str | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
    ) -> tuple[CommandResult, BorgLog]:
        """Given a borg argv, run it with our environment and passphrase; return the result and its BorgLog."""
        secret = self._passphrase()
        log = BorgLog(on_progress)
        try:
            result = run_command(
                argv,
                env=make_environment(self.repository, os.environ, cache_suffix=cache_suffix),
                secret=secret,
                secret_env="BORG_PASSPHRASE_FD" if secret is not None else None,
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
        if _failed(result.returncode):
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
