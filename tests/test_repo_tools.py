"""The repositories' own tools, within reach: `kvm-borg key export` and `kvm-borg borg|restic -- ARGS`
against a real borg repository and a real restic repository holding a real kvm-borg archive.

One shut-off domain is backed up once (module fixture) into both repositories; every test then
runs the passthrough or the key export on them and checks the result with borg/restic directly.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from harness import (
    BORG_BIN,
    KVM_BORG_BIN,
    RESTIC_BIN,
    TEST_PASSPHRASE,
    DiskSpec,
    DomainFactory,
    borg_env,
    make_dir,
    restic_env,
    run_borg,
    run_cli,
)
from support import cli_env, write_config, write_passphrase

RESTIC_PASSWORD = "kbtest-restic-password-not-secret"
PAPER_LINE = re.compile(r"^\s*\d+: (?:[0-9a-f]{1,6} ?)+ - [0-9a-f]{2}$")


@dataclass
class Stack:
    config: Path
    directory: Path
    borg_repo: Path
    restic_repo: Path
    domain: str
    archive: str


@pytest.fixture(scope="module")
def stack(libvirt_conn, run_dir, run_id, tmp_path_factory):
    """A config with borg `main` and restic `offsite`, and one kvm-borg archive of a shut-off domain in each."""
    factory = DomainFactory(libvirt_conn, make_dir(run_dir / "repo-tools"), run_id, label="repo-tools")
    try:
        domain = factory.make(disks=[DiskSpec("vda", "qcow2", 16)], running=False, name="repo-tools")
        directory = tmp_path_factory.mktemp("repo-tools")
        restic_password = directory / "restic.pass"
        write_passphrase(restic_password, RESTIC_PASSWORD)
        repositories = [
            {"name": "main", "type": "borg", "path": str(directory / "borg-repo"),
             "passphrase_file": str(write_passphrase(directory / "borg.pass"))},
            {"name": "offsite", "type": "restic", "url": str(directory / "restic-repo"),
             "passphrase_file": str(restic_password)},
        ]
        config = write_config(directory, repositories, plugins=())
        run_cli("backup", domain.name, config=config, env=cli_env(), check=True)
        listed = json.loads(run_cli("list", "--json", config=config, env=cli_env(), check=True).stdout)
        [archive] = {a["name"] for a in listed}
        yield Stack(config, directory, directory / "borg-repo", directory / "restic-repo", domain.name, archive)
    finally:
        errors = factory.cleanup()
        assert not errors, errors


def kvm_borg(stack: Stack, *args, **kwargs) -> subprocess.CompletedProcess:
    return run_cli(*args, config=stack.config, env=cli_env(), **kwargs)


def borg_json(*args, base_dir: Path) -> dict:
    return json.loads(run_borg(*args, env=borg_env(base_dir=base_dir, extra={"BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"})).stdout)


def key_less_copy(stack: Stack, tmp_path: Path) -> Path:
    """Copy the borg repository and remove the (repokey) key from the copy's config; return the copy."""
    copy = tmp_path / "copy"
    shutil.copytree(stack.borg_repo, copy)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(copy / "config")
    assert parser.get("repository", "key", fallback="").strip(), "a repokey repository keeps its key in config"
    parser.remove_option("repository", "key")
    with open(copy / "config", "w") as handle:
        parser.write(handle)
    return copy


def start_kvm_borg(stack: Stack, *args) -> subprocess.Popen:
    """Start `kvm-borg --config CONFIG ARGS...` with pipes for stdin, stdout and stderr (text)."""
    env = {**os.environ, **cli_env(), "PATH": f"{BORG_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen([str(KVM_BORG_BIN), "--config", str(stack.config), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def real_borg_child(proc: subprocess.Popen, marker: bytes) -> str:
    """Given a running kvm-borg, return the pid of its borg child whose argv holds `marker`, once setpriv
    has exec'd borg (its argv and environment are final from then on); bounded wait."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            if marker in argv and Path(argv.split(b"\0")[0].decode()).name != "setpriv":
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no borg child of kvm-borg with {marker!r} in its argv (kvm-borg exit: {proc.poll()})")



# --- passthrough ------------------------------------------------------------------------------


def test_borg_passthrough_list_and_info_json_show_kvm_borgs_archive(stack):
    listed = kvm_borg(stack, "borg", "--repo", "main", "--", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [a["name"] for a in json.loads(listed.stdout)["archives"]] == [stack.archive]
    info = kvm_borg(stack, "borg", "--", "info", "--json", f"::{stack.archive}")  # the only borg repository
    assert info.returncode == 0, info.stderr
    [archive] = json.loads(info.stdout)["archives"]
    assert archive["name"] == stack.archive and json.loads(archive["comment"])["domain"] == stack.domain


def test_failing_borg_passthrough_passes_borgs_exit_code_through(stack, tmp_path):
    # With the user's BORG_EXIT_CODES=modern, borg's specific code for a missing archive shows it is borg's, not ours.
    direct = run_borg("list", f"{stack.borg_repo}::nonexistent", check=False,
                      env=borg_env(passphrase=TEST_PASSPHRASE, extra={"BORG_EXIT_CODES": "modern"}))
    assert direct.returncode not in (0, 1, 2), direct.stderr
    proc = run_cli("borg", "--", "list", "::nonexistent", config=stack.config, env=cli_env(BORG_EXIT_CODES="modern"))
    assert proc.returncode == direct.returncode
    assert "nonexistent does not exist" in proc.stderr
    legacy = kvm_borg(stack, "borg", "--", "list", "::nonexistent")
    assert legacy.returncode == 2 and "nonexistent does not exist" in legacy.stderr


def test_restic_passthrough_snapshots_json_lists_kvm_borgs_snapshots(stack):
    proc = kvm_borg(stack, "restic", "--repo", "offsite", "--", "snapshots", "--json")
    assert proc.returncode == 0, proc.stderr
    through = json.loads(proc.stdout)
    direct = json.loads(subprocess.run([str(RESTIC_BIN), "-r", str(stack.restic_repo), "snapshots", "--json"],
                                       capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
                                       env=restic_env(password=RESTIC_PASSWORD)).stdout)
    assert sorted(s["id"] for s in through) == sorted(s["id"] for s in direct) and through
    assert all("kvm-borg" in s["tags"] for s in through)
    assert any(f"archive={stack.archive}" in s["tags"] for s in through)


def test_restic_passthrough_passes_restics_exit_code_through(stack):
    proc = kvm_borg(stack, "restic", "--", "cat", "blob", "0" * 64)
    assert proc.returncode == 1 and proc.stderr.strip()  # restic's "not found" exit code


def test_a_repository_of_the_other_type_is_one_line_and_exit_2(stack):
    for args, hint in ((("borg", "--repo", "offsite", "--", "list"), "kvm-borg restic --repo offsite"),
                       (("restic", "--repo", "main", "--", "snapshots"), "kvm-borg borg --repo main")):
        proc = kvm_borg(stack, *args)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and hint in proc.stderr


def test_passthrough_without_a_command_is_refused(stack):
    proc = kvm_borg(stack, "borg", "--repo", "main")
    assert proc.returncode == 2 and "name the borg command to run" in proc.stderr


def test_passphrase_is_in_neither_the_childs_argv_nor_environment_nor_the_log(stack):
    """A borg that waits on our stdin (`key import --paper`) is looked at in /proc while it runs."""
    passphrase = (stack.directory / "borg.pass").read_text().strip()
    config_before = (stack.borg_repo / "config").read_bytes()
    proc = start_kvm_borg(stack, "-vv", "borg", "--repo", "main", "--", "key", "import", "--paper")
    try:
        child = real_borg_child(proc, b"key\0import")
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    finally:
        stdout, stderr = proc.communicate(input="", timeout=120)  # EOF: borg aborts the import
    assert passphrase.encode() not in cmdline
    assert not [v for v in environ if passphrase.encode() in v]
    assert any(v.startswith(b"BORG_PASSPHRASE_FD=") for v in environ)
    assert f"BORG_REPO={stack.borg_repo}".encode() in environ
    assert b"--lock-wait\x0060" in cmdline
    assert passphrase not in stdout + stderr
    assert "running attached:" in stderr  # the -vv log was written, without the passphrase
    assert "aborted" in stdout and (stack.borg_repo / "config").read_bytes() == config_before  # stdin was borg's
    assert kvm_borg(stack, "borg", "--", "list", "--short").stdout.split() == [stack.archive]


def restic_keys(stack: Stack) -> list[str]:
    proc = kvm_borg(stack, "restic", "--", "key", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return sorted(key["id"] for key in json.loads(proc.stdout))


def test_sigterm_to_kvm_borg_reaches_the_restic_child_as_sigint(stack):
    """`restic key add` waits on our (open) stdin for the new password; kvm-borg alone gets SIGTERM."""
    keys_before = restic_keys(stack)
    proc = start_kvm_borg(stack, "restic", "--", "key", "add")
    try:
        child = None
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline and proc.poll() is None:
            for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                try:
                    argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                    reading = any(Path(f"/proc/{pid}/task/{task}/wchan").read_text() == "anon_pipe_read"
                                  for task in os.listdir(f"/proc/{pid}/task"))
                except FileNotFoundError:
                    continue
                if Path(argv0.decode()).name == "restic" and reading:  # exec'd, and blocked on our stdin
                    child = pid
            time.sleep(0.05)
        assert child is not None, "restic did not start reading stdin"
        proc.send_signal(signal.SIGTERM)  # to kvm-borg only, not to its child
        proc.wait(timeout=120)  # without passing it on, restic would wait on stdin for ever
    finally:
        if proc.poll() is None:
            proc.kill()
        _stdout, stderr = proc.communicate(timeout=120)
    # restic 0.14 cleans up (releases its lock) on SIGINT only: kvm-borg passed SIGTERM on as SIGINT
    assert "signal interrupt received, cleaning up" in stderr
    assert proc.returncode == 130  # restic's exit code after its SIGINT, passed through
    assert not Path(f"/proc/{child}").exists()
    assert restic_keys(stack) == keys_before  # no key was added


# --- key export -------------------------------------------------------------------------------


def test_exported_key_file_is_0600_and_borg_key_import_accepts_it(stack, tmp_path):
    key = tmp_path / "kvm-borg-key"
    proc = kvm_borg(stack, "key", "export", str(key))  # the only borg repository: no --repo needed
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    repo_id = configparser.ConfigParser(interpolation=None)
    repo_id.read(stack.borg_repo / "config")
    assert key.read_text().splitlines()[0] == f"BORG_KEY {repo_id.get('repository', 'id')}"
    copy = key_less_copy(stack, tmp_path)
    base = tmp_path / "borg-base"
    base.mkdir()
    env = borg_env(base_dir=base, extra={"BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"})
    assert run_borg("list", copy, env=env, check=False).returncode == 2  # no key, no archives
    run_borg("key", "import", copy, key, env=env)
    assert [a["name"] for a in borg_json("list", "--json", copy, base_dir=base)["archives"]] == [stack.archive]


def test_paper_key_has_borgs_paper_format_and_types_back_in(stack, tmp_path):
    paper = tmp_path / "paper.txt"
    proc = kvm_borg(stack, "key", "export", "--repo", "main", "--paper", str(paper))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(paper.stat().st_mode) == 0o600
    lines = paper.read_text().splitlines()
    assert lines[0].startswith("To restore key use borg key import --paper") and "BORG PAPER KEY v1" in lines
    id_line = next(line for line in lines if line.startswith("id: "))
    count = int(id_line.split()[1])
    body = [line for line in lines if PAPER_LINE.match(line)]
    assert len(body) == count
    copy = key_less_copy(stack, tmp_path)
    base = tmp_path / "borg-base"
    base.mkdir()
    typed = "\n".join([id_line.split(": ", 1)[1]] + [line.split(": ", 1)[1] for line in body]) + "\n"
    run_borg("key", "import", "--paper", copy, input=typed,
             env=borg_env(base_dir=base, extra={"BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}))
    assert [a["name"] for a in borg_json("list", "--json", copy, base_dir=base)["archives"]] == [stack.archive]


def test_key_export_to_stdout(stack, tmp_path):
    proc = kvm_borg(stack, "key", "export", "-")
    assert proc.returncode == 0 and proc.stdout.startswith("BORG_KEY ")
    assert not list(Path.cwd().glob("-"))


def test_key_export_refuses_an_existing_file_unless_overwrite(stack, tmp_path):
    key = tmp_path / "key"
    key.write_text("keep me\n")
    proc = kvm_borg(stack, "key", "export", str(key))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--overwrite" in proc.stderr
    assert key.read_text() == "keep me\n"
    assert kvm_borg(stack, "key", "export", "--overwrite", str(key)).returncode == 0
    assert key.read_text().startswith("BORG_KEY ") and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_restic_key_export_explains_there_is_no_key(stack, tmp_path):
    proc = kvm_borg(stack, "key", "export", "--repo", "offsite", str(tmp_path / "k"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "restic has no key file to export" in proc.stderr and "restic.pass" in proc.stderr
    assert not (tmp_path / "k").exists()


def test_key_export_with_several_borg_repositories_asks_which(stack, tmp_path):
    repositories = [
        {"name": name, "type": "borg", "path": str(tmp_path / name), "passphrase_file": str(stack.directory / "borg.pass")}
        for name in ("alpha", "beta")
    ]
    config = write_config(tmp_path, repositories, plugins=(), init=False)
    proc = run_cli("key", "export", str(tmp_path / "k"), config=config, env=cli_env())
    assert proc.returncode == 2 and proc.stderr.strip().endswith("choose one with --repo: alpha, beta")
    assert not (tmp_path / "k").exists() and not (tmp_path / "alpha").exists()


def test_first_use_notice_names_a_key_export_command_that_works(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))  # no repositories: the embedded default
    # The first use creates it (`kvm-borg init` cannot yet: it reads the passphrase file before creating it).
    first = run_cli("borg", "--", "list", "--short", config=config, env=cli_env())
    assert first.returncode == 0 and first.stdout == "", first.stderr
    match = re.search(r"Export the key with: (kvm-borg key export [^\n]*?) (/root/kvm-borg-key\.txt)\s*$", first.stderr)
    assert match, first.stderr
    args = match.group(1).split()[1:] + [str(tmp_path / "key.txt")]  # not into the real /root
    proc = run_cli(*args, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert "BORG PAPER KEY v1" in (tmp_path / "key.txt").read_text()
    again = run_cli("borg", "--", "list", "--short", config=config, env=cli_env())
    assert again.returncode == 0 and "Export the key with" not in again.stderr  # told once


def test_help_lists_key_export_and_the_passthroughs():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("key", "borg", "restic"):
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.MULTILINE), command
    assert "FILE" in run_cli("key", "export", "--help").stdout


def test_passthrough_and_key_export_reach_remote_repositories_with_their_ssh_settings(image_dir, tmp_path, sshd):
    from harness.sshd import generate_key
    from test_remote_repositories import hardened_borg
    from test_restic_backend import restic_repository

    borg_repository, server_repo = hardened_borg(sshd, image_dir, tmp_path, name="vault")  # forced `borg serve`
    restic_key = generate_key(tmp_path / "restic-client" / "id_ed25519")
    sshd.authorize(restic_key)
    restic = restic_repository(tmp_path, "far", url=sshd.sftp_url(sshd.make_repo_dir(image_dir / "srv-restic")),
                               ssh_command=sshd.ssh_command(restic_key))
    config = write_config(image_dir / "kb", [borg_repository, restic], plugins=())  # `kvm-borg init` over ssh

    listed = run_cli("borg", "--repo", "vault", "--", "list", "--json", config=config, env=cli_env(), timeout=180)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["archives"] == []
    key = tmp_path / "vault.key"
    exported = run_cli("key", "export", "--repo", "vault", str(key), config=config, env=cli_env(), timeout=180)
    assert exported.returncode == 0, exported.stderr
    server_config = configparser.ConfigParser(interpolation=None)
    server_config.read(server_repo / "config")
    assert key.read_text().splitlines()[0] == f"BORG_KEY {server_config.get('repository', 'id')}"
    snapshots = run_cli("restic", "--repo", "far", "--", "snapshots", "--json", config=config, env=cli_env(),
                        timeout=180)
    assert snapshots.returncode == 0, snapshots.stderr
    assert json.loads(snapshots.stdout) == []
