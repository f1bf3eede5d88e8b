"""The borg backend against the real borg of the venv: no mocks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pluggy
import pytest

from kvm_borg import hookspecs
from kvm_borg.backends import borg as borg_backend
from kvm_borg.backends.borg.environment import files_cache_suffix, find_borg_binary, make_environment
from kvm_borg.backends.borg.output import BorgLog
from kvm_borg.backends.borg.repository import BorgError, BorgRepository
from kvm_borg.metadata import parse_archive_comment
from kvm_borg.models import ArchiveRequest

PASSPHRASE = "kbtest-borg-backend-Pa55phrase"
MiB = 1024 * 1024
SETTINGS = SimpleNamespace(borg_binary=None, progress=False)
BORG = str(Path(sys.executable).parent / "borg")


def repository_config(path, passphrase_file, **extra) -> dict:
    return {
        "name": "test",
        "type": "borg",
        "path": str(path),
        "encryption": "repokey-blake2",
        "passphrase_file": str(passphrase_file) if passphrase_file else None,
        "passphrase_command": None,
        "compression": "lz4",
        "chunker_params": "fixed,4194304",
        "lock_wait": 5,
        "ssh_command": None,
        "remote_path": None,
        **extra,
    }


def write_passphrase(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def make_request(domain: str, files: list[Path], timestamp: str, *, block_devices=()) -> ArchiveRequest:
    comment = json.dumps({"kvm_borg": 1, "domain": domain, "disks": ["vda"], "host": "testhost"})
    return ArchiveRequest(
        domain=domain,
        archive_name=f"{domain}-{timestamp}",
        timestamp=timestamp,
        files=tuple(str(f) for f in files),
        block_devices=tuple(block_devices),
        comment=comment,
        total_bytes=sum(f.stat().st_size for f in files if f.is_file()),
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def borg_processes_for(repo: Path) -> list[int]:
    """Return the pids of running processes whose argv names `repo`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes()
            except OSError:
                continue
            if str(repo).encode() in cmdline and b"borg" in cmdline:
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def borg_base(tmp_path_factory):
    """Keep borg's cache, config and security dirs away from the real ones for this module."""
    base = tmp_path_factory.mktemp("borg-base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BORG_BASE_DIR", str(base))
        yield base


@pytest.fixture(scope="module")
def stored(borg_base, tmp_path_factory):
    """An encrypted repository holding one archive of domain `web`: a sparse 64 MiB image and a json."""
    work = tmp_path_factory.mktemp("borg-backend")
    passphrase_file = write_passphrase(work / "passphrase", PASSPHRASE)
    data = work / "data"
    data.mkdir()
    image = data / "vda.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(os.urandom(MiB))
        f.seek(40 * MiB)
        f.write(b"some data in the middle" * 1000)
    meta = data / "meta.json"
    meta.write_text(json.dumps({"domain": "web"}))
    backend = BorgRepository(repository_config(work / "repo", passphrase_file), SETTINGS)
    assert backend.init() is True
    request = make_request("web", [meta, image], "20261126T121638Z")
    result = backend.store(request)
    return SimpleNamespace(
        backend=backend, request=request, result=result, image=image, meta=meta, work=work,
        repo=work / "repo", passphrase_file=passphrase_file,
    )


# --- the plugin ------------------------------------------------------------------------------


def test_plugin_answers_for_borg_repositories_only(tmp_path):
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(borg_backend)
    backend = pm.hook.kvm_borg_repository_backend(repository=repository_config(tmp_path, None), settings=SETTINGS)
    assert isinstance(backend, BorgRepository) and backend.name == "test"
    restic = {"name": "r", "type": "restic", "url": "/x"}
    assert pm.hook.kvm_borg_repository_backend(repository=restic, settings=SETTINGS) is None


def test_default_borg_is_the_one_beside_the_interpreter():
    assert find_borg_binary(None) == BORG
    assert find_borg_binary("/opt/borg") == "/opt/borg"


def test_defaults_apply_to_a_minimal_repository(tmp_path):
    backend = BorgRepository({"name": "m", "type": "borg", "path": str(tmp_path)}, SETTINGS)
    assert (backend.encryption, backend.compression, backend.chunker_params, backend.lock_wait) == (
        "repokey-blake2", "lz4", "fixed,4194304", 60,
    )


def test_version_is_the_installed_borgs_and_a_missing_borg_is_named(tmp_path):
    installed = subprocess.run([BORG, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    backend = BorgRepository({"name": "m", "type": "borg", "path": str(tmp_path)}, SETTINGS)
    assert backend.version() == installed
    missing = BorgRepository({"name": "m", "type": "borg", "path": str(tmp_path)},
                             SimpleNamespace(borg_binary=str(tmp_path / "no-borg"), progress=False))
    with pytest.raises(BorgError, match=r"repository 'm': cannot run .*no-borg"):
        missing.version()


def test_this_hosts_name_is_the_configured_hostname(tmp_path):
    settings = SimpleNamespace(borg_binary=None, progress=False, hostname="hv7")
    backend = BorgRepository({"name": "m", "type": "borg", "path": str(tmp_path)}, settings)
    assert backend.host == "hv7" and backend.list_hosts is None


# --- the environment -------------------------------------------------------------------------


def test_environment_never_holds_a_passphrase_and_never_prompts(tmp_path):
    inherited = {"PATH": "/bin", "BORG_PASSPHRASE": "leak", "BORG_RSH": "evil", "BORG_REPO": "/elsewhere"}
    env = make_environment(repository_config(tmp_path, tmp_path / "pp"), inherited)
    assert "leak" not in env.values()
    assert "BORG_PASSPHRASE" not in env and "BORG_REPO" not in env
    assert env["PATH"] == "/bin"
    assert env["BORG_RSH"] == ("ssh -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o ConnectTimeout=30 "
                               "-o BatchMode=yes")
    assert env["BORG_DISPLAY_PASSPHRASE"] == "no"
    assert env["BORG_RELOCATED_REPO_ACCESS_IS_OK"] == "no"
    assert env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] == "no"
    assert env["BORG_CHECK_I_KNOW_WHAT_I_AM_DOING"] == "NO"
    assert env["BORG_DELETE_I_KNOW_WHAT_I_AM_DOING"] == "NO"


def test_environment_passes_commands_not_secrets(tmp_path):
    config = repository_config(
        tmp_path, None, passphrase_command="pass show borg", ssh_command="ssh -i /k", remote_path="borg-1.4"
    )
    env = make_environment(config, {}, cache_suffix="kvm-borg-web")
    assert env["BORG_PASSCOMMAND"] == "pass show borg"
    assert env["BORG_RSH"] == "ssh -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o ConnectTimeout=30 -i /k"
    assert env["BORG_REMOTE_PATH"] == "borg-1.4"
    assert env["BORG_FILES_CACHE_SUFFIX"] == "kvm-borg-web"


def test_only_borg_mount_loads_a_fuse_library(tmp_path):
    """Borg imports its FUSE library (pyfuse3, trio) at every start: every run but `borg mount` and the
    user's own borg commands gets BORG_FUSE_IMPL=none."""
    config = repository_config(tmp_path, None)
    assert make_environment(config, {"BORG_FUSE_IMPL": "llfuse"})["BORG_FUSE_IMPL"] == "none"
    assert make_environment(config, {"BORG_FUSE_IMPL": "llfuse"}, fuse=True)["BORG_FUSE_IMPL"] == "llfuse"
    assert "BORG_FUSE_IMPL" not in make_environment(config, {}, fuse=True)
    backend = BorgRepository(config, SimpleNamespace(borg_binary=None, progress=False, hostname="hv1"))
    assert "BORG_FUSE_IMPL" not in backend.command_environment()["env"]  # `kvm-borg borg mount ...` works


def test_files_cache_suffix_is_one_per_domain_and_file_name_safe():
    assert files_cache_suffix("web") == "kvm-borg-web"
    odd = files_cache_suffix("a/b c")
    assert "/" not in odd and " " not in odd
    assert odd != files_cache_suffix("a_b_c")


# --- reading borg's output -------------------------------------------------------------------


def test_comment_must_be_kvm_borgs():
    assert parse_archive_comment('{"kvm_borg": 1, "domain": "web"}') == {"kvm_borg": 1, "domain": "web"}
    assert parse_archive_comment("") is None
    assert parse_archive_comment("daily backup") is None
    assert parse_archive_comment('{"domain": "web"}') is None
    assert parse_archive_comment('["kvm_borg"]') is None


def test_error_message_adds_the_remote_reason():
    log = BorgLog()
    for record in (
        {"type": "log_message", "levelname": "WARNING", "message": "Remote: ssh: connect to host h port 1: Connection refused"},
        {"type": "log_message", "levelname": "ERROR", "message": "Connection closed by remote host. Is borg working on the server?", "msgid": "ConnectionClosedWithHint"},
    ):
        log.feed(json.dumps(record))
    assert log.error_message(2) == (
        "Connection closed by remote host. Is borg working on the server? "
        "(Remote: ssh: connect to host h port 1: Connection refused)"
    )
    assert log.msgids == ["ConnectionClosedWithHint"]


def test_error_message_names_a_question_we_answered_no():
    log = BorgLog()
    for record in (
        {"type": "question_prompt", "msgid": "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK",
         "message": "Warning: Attempting to access a previously unknown unencrypted repository!\nDo you want to continue? [yN] "},
        {"type": "question_accepted_false", "msgid": "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "message": "Aborting."},
        {"type": "log_message", "levelname": "ERROR", "message": "Cache initialization aborted"},
    ):
        log.feed(json.dumps(record))
    assert log.error_message(2) == (
        "Cache initialization aborted (Warning: Attempting to access a previously unknown unencrypted "
        "repository! Answered no by BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=no)"
    )


def test_error_message_of_an_unexpected_exception_names_it():
    log = BorgLog()
    log.feed(json.dumps({"type": "log_message", "levelname": "ERROR", "message": "Local Exception"}))
    traceback = "Traceback (most recent call last):\n  File \"x\", line 1\nValueError: bad thing\n\nPlatform: Linux"
    log.feed(json.dumps({"type": "log_message", "levelname": "ERROR", "message": traceback}))
    assert log.error_message(2) == "Local Exception: ValueError: bad thing"


def test_error_message_falls_back_to_plain_lines_and_the_exit_code():
    log = BorgLog()
    assert log.error_message(2) == "borg exited with code 2"
    assert log.error_message(-9) == "borg was killed by signal 9"
    log.feed("something odd")
    assert log.error_message(2) == "something odd"


# --- a real repository ------------------------------------------------------------------------


def test_init_creates_the_repository_once(borg_base, tmp_path):
    passphrase_file = write_passphrase(tmp_path / "passphrase", PASSPHRASE)
    assert passphrase_file.stat().st_mode & 0o777 == 0o600
    backend = BorgRepository(repository_config(tmp_path / "parent" / "repo", passphrase_file), SETTINGS)
    assert backend.exists() is False
    assert backend.init() is True
    assert backend.exists() is True
    assert backend.init() is False
    assert json.loads(
        subprocess.run(
            [BORG, "info", "--json", str(tmp_path / "parent" / "repo")],
            env={**os.environ, "BORG_PASSPHRASE": PASSPHRASE}, capture_output=True, text=True, check=True,
        ).stdout
    )["encryption"]["mode"] == "repokey-blake2"


def test_init_refuses_a_directory_that_is_not_a_repository(borg_base, tmp_path):
    (tmp_path / "notrepo").mkdir()
    (tmp_path / "notrepo" / "file").write_text("x")
    backend = BorgRepository(repository_config(tmp_path / "notrepo", write_passphrase(tmp_path / "pp", PASSPHRASE)), SETTINGS)
    with pytest.raises(BorgError, match="There is already something at"):
        backend.init()


def test_store_reports_sizes(stored):
    result = stored.result
    assert result.ok, result.error
    assert result.repository == "test"
    assert result.archive == "web-20261126T121638Z"
    assert result.original_size == 64 * MiB + stored.meta.stat().st_size
    assert 0 < result.deduplicated_size < 8 * MiB  # the holes are neither read nor stored
    assert result.error is None and result.warnings == []
    assert result.seconds > 0


def test_list_archives_shows_kvm_borg_archives_with_their_domain_and_disks(stored):
    subprocess.run(  # someone else's archive, named like ours but without our comment
        [BORG, "create", f"{stored.repo}::web-20250101T000000Z", str(stored.meta)],
        env={**os.environ, "BORG_PASSPHRASE": PASSPHRASE}, check=True, capture_output=True,
    )
    other = stored.backend.store(make_request("web-2", [stored.meta], "20261126T130000Z"))
    assert other.ok, other.error

    archives = stored.backend.list_archives("web")
    assert [a.name for a in archives] == ["web-20261126T121638Z"]
    web = archives[0]
    assert (web.domain, web.disks, web.host, web.repository) == ("web", ("vda",), "testhost", "test")
    assert web.original_size == stored.result.original_size
    assert web.deduplicated_size is not None
    assert web.time.endswith("+00:00")

    everything = {a.name for a in stored.backend.list_archives()}
    assert everything == {"web-20261126T121638Z", "web-2-20261126T130000Z"}
    assert [a.name for a in stored.backend.list_archives("web-2")] == ["web-2-20261126T130000Z"]
    assert stored.backend.list_archives("nope") == []


def test_list_paths_names_the_files_without_leading_slash(stored):
    paths = stored.backend.list_paths(stored.request.archive_name)
    assert paths == [stored.backend.archive_path(p) for p in stored.request.files]
    assert all(not p.startswith("/") for p in paths)
    assert stored.backend.archive_path("/var/lib/libvirt/images/a.qcow2") == "var/lib/libvirt/images/a.qcow2"


def test_extract_file_gives_identical_sparse_bytes(stored, tmp_path):
    destination = tmp_path / "restored.img"
    stored.backend.extract_file(stored.request.archive_name, stored.backend.archive_path(str(stored.image)), destination)
    assert sha256(destination) == sha256(stored.image)
    st = destination.stat()
    assert st.st_size == 64 * MiB
    # Holes stayed holes: `borg extract --sparse` leaves out every all-zero 4 MiB chunk, so only the
    # two chunks holding data (at 10 MiB and 40 MiB) are allocated. (Archives are made without
    # `borg create --sparse`, see BorgRepository.store; kvm-borg restore punches 4 KiB holes itself.)
    assert st.st_blocks * 512 <= 2 * 4 * MiB
    assert [p.name for p in tmp_path.iterdir()] == ["restored.img"]  # no temporary directory left


def test_extract_file_of_a_missing_path_is_an_error(stored, tmp_path):
    with pytest.raises(BorgError):
        stored.backend.extract_file(stored.request.archive_name, "no/such/file", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_wrong_passphrase_is_one_line_naming_the_passphrase(stored, tmp_path):
    config = repository_config(stored.repo, write_passphrase(tmp_path / "wrong", "not-the-passphrase"))
    result = BorgRepository(config, SETTINGS).store(make_request("web", [stored.meta], "20261126T140000Z"))
    assert not result.ok
    assert "passphrase" in result.error.lower()
    assert "\n" not in result.error
    assert result.archive is None


def test_unreadable_passphrase_file_fails_the_store(stored, tmp_path):
    result = BorgRepository(repository_config(stored.repo, tmp_path / "missing"), SETTINGS).store(
        make_request("web", [stored.meta], "20261126T140000Z")
    )
    assert not result.ok and "passphrase_file" in result.error


def test_missing_local_repository_fails_the_store(borg_base, stored, tmp_path):
    backend = BorgRepository(repository_config(tmp_path / "nowhere", stored.passphrase_file), SETTINGS)
    result = backend.store(make_request("web", [stored.meta], "20261126T140000Z"))
    assert not result.ok
    assert "does not exist" in result.error


@pytest.mark.timeout(120)  # a bounded wait: the store must end by itself (ConnectTimeout), not hang
def test_unreachable_remote_repository_fails_the_store(borg_base, stored):
    config = repository_config(
        "ssh://nobody@127.0.0.1:1/srv/repo", stored.passphrase_file,
        ssh_command="ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no",
    )
    result = BorgRepository(config, SETTINGS).store(make_request("web", [stored.meta], "20261126T140000Z"))
    assert not result.ok
    assert "\n" not in result.error
    assert "Connection" in result.error or "ssh" in result.error


def test_missing_source_file_is_a_warning(stored, tmp_path):
    request = make_request("web", [stored.meta], "20261126T150000Z")
    request = dataclasses.replace(request, files=(str(stored.meta), str(tmp_path / "gone.img")))
    result = stored.backend.store(request)
    assert result.ok
    assert any("gone.img" in w for w in result.warnings)


def test_passphrase_never_appears_in_argv_logs_or_process_table(stored, caplog):
    caplog.set_level(logging.DEBUG)
    seen: list[bytes] = []
    stop = threading.Event()

    def watch_process_table():
        while not stop.is_set():
            for pid in borg_processes_for(stored.repo):
                for name in ("cmdline", "environ"):
                    try:
                        seen.append(Path("/proc", str(pid), name).read_bytes())
                    except OSError:
                        pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_process_table)
    watcher.start()
    try:
        progress = BorgRepository(dict(stored.backend.repository), SimpleNamespace(borg_binary=None, progress=True))
        result = progress.store(make_request("web", [stored.meta, stored.image], "20261126T160000Z"))
    finally:
        stop.set()
        watcher.join()
    assert result.ok, result.error
    assert "running: " in caplog.text and " create " in caplog.text
    assert PASSPHRASE not in caplog.text
    assert seen, "the borg process was never seen"
    assert not any(PASSPHRASE.encode() in blob for blob in seen)
    assert any(b"BORG_PASSPHRASE_FD=" in blob for blob in seen)
    info = subprocess.run(
        [BORG, "info", "--json", f"{stored.repo}::web-20261126T160000Z"],
        env={**os.environ, "BORG_PASSPHRASE": PASSPHRASE}, capture_output=True, text=True, check=True,
    )
    assert PASSPHRASE not in info.stdout  # borg stores its command line in the archive


def test_interrupted_store_stops_borg_and_leaves_the_repository_usable(stored, tmp_path):
    fifo = tmp_path / "blocked.fifo"
    os.mkfifo(fifo)  # with --read-special borg waits for a writer that never comes
    request = make_request("web", [stored.meta, fifo], "20261126T170000Z", block_devices=[str(fifo)])

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)  # not SIGALRM: pytest-timeout uses it
    timer = threading.Timer(3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            stored.backend.store(request)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert borg_processes_for(stored.repo) == []
    after = stored.backend.store(make_request("web", [stored.meta], "20261126T180000Z"))
    assert after.ok, after.error
    assert "web-20261126T170000Z" not in {a.name for a in stored.backend.list_archives("web")}


def test_first_backup_of_a_domain_does_not_warn_about_its_new_files_cache():
    log = BorgLog()
    for message in (
        "The files cache can't be read. [[Errno 2] No such file or directory: '/c/files.kvm-borg-web']",
        "Continuing without files cache - expect lower performance.",
        "/x: file changed while we backed it up",
    ):
        log.feed(json.dumps({"type": "log_message", "levelname": "WARNING", "message": message}))
    assert log.warnings == ["/x: file changed while we backed it up"]
