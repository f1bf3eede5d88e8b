"""Remote repositories over a private sshd on loopback: borg over ssh with the hardened
(append-only, path-restricted) key, and no prompt ever, whatever the server's host key."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from harness import BORG_BIN, DiskSpec, borg_env, qemu_img_compare, run_cli
from harness.sshd import generate_key, server_borg
from support import archived_meta, assert_back_on_own_images, cli_env, write_config, write_passphrase
from test_restic_backend import restic_repository, restic_snapshots

MiB = 1 << 20
TWO_DISKS = [DiskSpec("vda", "qcow2", 32), DiskSpec("vdb", "raw", 32)]


def hardened_borg(sshd, image_dir: Path, tmp_path: Path, name: str = "offsite") -> tuple[dict, Path]:
    """A borg repository on the ssh server reached with a key that may only `borg serve` it, append-only.

    Returns (repository config, the repository's directory on the server)."""
    key = generate_key(tmp_path / "hypervisor" / "id_ed25519")
    server_repo = sshd.make_repo_dir(image_dir / "server" / "hv1")
    sshd.authorize(key, command=f"{server_borg()} serve --restrict-to-path {server_repo} --append-only")
    repository = {"name": name, "type": "borg", "path": sshd.borg_url(server_repo),
                  "passphrase_file": str(write_passphrase(tmp_path / f"{name}.pass")),
                  "ssh_command": sshd.ssh_command(key)}
    return repository, server_repo


def server_borg_run(*args, base_dir: Path, cwd: Path | None = None, check=True) -> subprocess.CompletedProcess:
    """Run borg on the server's side (the repository by its local path), with its own borg base dir."""
    return subprocess.run([str(BORG_BIN), *map(str, args)], env=borg_env(base_dir=base_dir), cwd=cwd,
                          capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL)


def server_archives(repo: Path, base_dir: Path) -> list[str]:
    return [a["name"] for a in json.loads(server_borg_run("list", "--json", repo, base_dir=base_dir).stdout)["archives"]]


def client_borg(repository: dict, *args, base_dir: Path) -> subprocess.CompletedProcess:
    """Run borg as the hypervisor would, with its hardened key (what an intruder on it could do)."""
    env = borg_env(base_dir=base_dir, extra={"BORG_RSH": repository["ssh_command"]})
    return subprocess.run([str(BORG_BIN), *map(str, args)], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


def last_transaction(repo: Path) -> int:
    """The number of the last committed transaction in an append-only repository's log."""
    lines = (repo / "transactions").read_text().splitlines()
    return int(lines[-1].split()[1].rstrip(","))


def roll_back(repo: Path, transaction: int) -> None:
    """The documented server-side undo of an append-only repository: drop every segment written
    after `transaction` and the index files (borg rebuilds them from the segments)."""
    for segment in (repo / "data").glob("*/*"):
        if segment.name.isdigit() and int(segment.name) > transaction:
            segment.unlink()
    for pattern in ("index.*", "hints.*", "integrity.*"):
        for path in repo.glob(pattern):
            path.unlink()


def test_remote_borg_over_ssh_stores_the_snapshot_content(domain_factory, image_dir, tmp_path, sshd):
    domain = domain_factory.make(disks=TWO_DISKS, name="remote borg")
    reference = image_dir / "reference"
    reference.mkdir()
    repository, server_repo = hardened_borg(sshd, image_dir, tmp_path)
    config = write_config(image_dir / "kb", [repository])  # `kvm-borg init` through the restricted key
    proc = run_cli("backup", domain.name, "--json", config=config,
                   env=cli_env(KBTEST_REFERENCE_DIR=reference, KBTEST_WRITE_AFTER_SNAPSHOT=1))
    assert proc.returncode == 0, proc.stderr
    [store] = json.loads(proc.stdout)["domains"][0]["stores"]
    assert store["ok"] and store["repository"] == "offsite"
    listed = json.loads(run_cli("list", "--json", config=config, env=cli_env()).stdout)
    assert [a["name"] for a in listed] == [store["archive"]]

    admin = tmp_path / "server-admin"
    extracted = tmp_path / "x"
    extracted.mkdir()
    server_borg_run("extract", "--sparse", f"{server_repo}::{store['archive']}", base_dir=admin, cwd=extracted)
    for disk in archived_meta(extracted)["disks"]:
        assert qemu_img_compare(extracted / disk["archive_path"], reference / f"{disk['target']}.raw",
                                disk["format"], "raw")
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_append_only_key_cannot_remove_archives_from_the_server(domain_factory, image_dir, tmp_path, sshd):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], running=False, name="append only")
    repository, server_repo = hardened_borg(sshd, image_dir, tmp_path)
    config = write_config(image_dir / "kb", [repository])
    for _ in range(2):
        assert run_cli("backup", domain.name, config=config, env=cli_env()).returncode == 0
        time.sleep(1.1)  # archive names carry the second
    before = server_archives(server_repo, tmp_path / "admin-before")
    assert len(before) == 2
    good_transaction = last_transaction(server_repo)
    segments_before = {p.relative_to(server_repo) for p in (server_repo / "data").glob("*/*")}

    # An intruder on the hypervisor uses its key to delete everything it can.
    intruder = tmp_path / "intruder"
    url = repository["path"]
    client_borg(repository, "delete", "--glob-archives", "*", url, base_dir=intruder)
    client_borg(repository, "prune", "--keep-last", "1", url, base_dir=intruder)
    client_borg(repository, "compact", url, base_dir=intruder)
    whole = client_borg(repository, "delete", url, base_dir=intruder)
    assert whole.returncode != 0  # deleting the repository itself is refused outright
    escape = client_borg(repository, "list", sshd.borg_url(server_repo.parent), base_dir=intruder)
    assert escape.returncode != 0 and "not allowed" in escape.stderr  # and so is any other path
    assert json.loads(run_cli("list", "--json", config=config, env=cli_env()).stdout) == []  # looks gone

    # Nothing was removed: every segment is still there; rolling back the log brings the archives back.
    assert segments_before <= {p.relative_to(server_repo) for p in (server_repo / "data").glob("*/*")}
    roll_back(server_repo, good_transaction)
    admin = tmp_path / "admin-after"
    assert server_archives(server_repo, admin) == before
    server_borg_run("check", server_repo, base_dir=admin)
    for archive in before:
        extracted = tmp_path / archive
        extracted.mkdir()
        server_borg_run("extract", "--sparse", f"{server_repo}::{archive}", base_dir=admin, cwd=extracted)
        meta = archived_meta(extracted)
        assert domain.verify_fill("vda", extracted / meta["disks"][0]["archive_path"], "qcow2")


def test_unknown_server_host_key_fails_at_once_without_prompting(domain_factory, image_dir, tmp_path, sshd):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], name="unknown host key")
    key = generate_key(tmp_path / "hypervisor" / "id_ed25519")
    sshd.authorize(key)
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    # No BatchMode, no StrictHostKeyChecking: plain ssh would ask "Are you sure you want to continue?"
    ssh_command = f"ssh -i {key} -o UserKnownHostsFile={empty_known_hosts} -o GlobalKnownHostsFile=/dev/null -F /dev/null"
    restic = restic_repository(tmp_path, "restic", url=sshd.sftp_url(sshd.make_repo_dir(image_dir / "srv-r")),
                               ssh_command=ssh_command)
    borg = {"name": "borg", "type": "borg", "path": sshd.borg_url(image_dir / "srv-b"), "ssh_command": ssh_command,
            "passphrase_file": str(write_passphrase(tmp_path / "borg.pass"))}
    config = write_config(image_dir / "kb", [restic, borg], init=False)
    # Bounded waits (run_cli's timeout): a prompting ssh would wait for an answer that never comes.
    init = run_cli("init", "--repo", "restic", config=config, env=cli_env(), timeout=120)
    assert init.returncode == 2 and "Host key verification failed" in init.stderr
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env(), timeout=120)
    assert proc.returncode == 2
    stores = {s["repository"]: s for s in json.loads(proc.stdout)["domains"][0]["stores"]}
    assert not stores["restic"]["ok"] and "Host key verification failed" in stores["restic"]["error"]
    assert not stores["borg"]["ok"]
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    assert not os.listdir(image_dir / "srv-r")
