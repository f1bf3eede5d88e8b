"""One snapshot, several repositories (borg and restic, local and remote), against real libvirtd +
QEMU + borg + restic + a private sshd: every repository gets the same frozen content, a failing
one does not fail the others, an interrupt stops every store and still merges back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from harness import KVM_BORG_BIN, DiskSpec, qemu_img_compare, run_cli
from harness.cli import _merged_env
from harness.sshd import generate_key
from support import (
    archived_meta,
    assert_back_on_own_images,
    borg_archives,
    cli_env,
    extract_archive,
    write_config,
    write_passphrase,
)
from test_restic_backend import (
    assert_images_match_reference,
    extract_restic_archive,
    restic_backend,
    restic_repository,
    restic_snapshots,
)

MiB = 1 << 20
TWO_DISKS = [DiskSpec("vda", "qcow2", 48), DiskSpec("vdb", "raw", 48)]


def borg_repository(directory: Path, name: str = "borg", path: str | None = None, **keys) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    return {"name": name, "type": "borg", "path": path or str(directory / f"{name}-repo"),
            "passphrase_file": str(write_passphrase(directory / f"{name}.pass")), **keys}


def hook_calls(events: Path) -> list[str]:
    return [json.loads(line)["hook"] for line in events.read_text().splitlines()]


def test_local_borg_and_remote_restic_over_sftp_get_the_same_snapshot(domain_factory, image_dir, tmp_path, sshd):
    domain = domain_factory.make(disks=TWO_DISKS, name="borg and sftp restic")
    domain.hmp_write("vdb", 0xB7, 3 * MiB, MiB)
    key = generate_key(tmp_path / "hypervisor" / "id_ed25519")
    sshd.authorize(key)  # sftp needs no forced command; the hardened borg key is tested in test_remote_*
    server_repo = sshd.make_repo_dir(image_dir / "server" / "restic")
    local_borg = borg_repository(tmp_path)
    remote_restic = restic_repository(tmp_path, "offsite", url=sshd.sftp_url(server_repo),
                                      ssh_command=sshd.ssh_command(key))
    reference, events = image_dir / "reference", tmp_path / "events.jsonl"
    reference.mkdir()
    config = write_config(image_dir / "kb", [local_borg, remote_restic])
    assert (server_repo / "config").is_file()  # `kvm-borg init` created the remote repository
    proc = run_cli("backup", domain.name, "--json", config=config,
                   env=cli_env(KBTEST_REFERENCE_DIR=reference, KBTEST_WRITE_AFTER_SNAPSHOT=1,
                               KBTEST_EVENTS_FILE=events))
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    stores = {s["repository"]: s for s in result["stores"]}
    assert result["ok"] and set(stores) == {"borg", "offsite"} and all(s["ok"] for s in stores.values())
    assert stores["borg"]["archive"] == stores["offsite"]["archive"]
    # One freeze, one store per repository, one merge.
    assert hook_calls(events) == ["before_snapshot", "after_snapshot", "after_store", "after_store",
                                  "before_commit", "after_commit", "backup_finished"]

    extracted = extract_archive(Path(local_borg["path"]), stores["borg"]["archive"], tmp_path / "borg-x")
    for disk in archived_meta(extracted)["disks"]:
        assert qemu_img_compare(extracted / disk["archive_path"], reference / f"{disk['target']}.raw",
                                disk["format"], "raw")
    meta = extract_restic_archive(restic_backend(remote_restic), stores["offsite"]["archive"], tmp_path / "restic-x")
    assert_images_match_reference(meta, reference)
    assert domain.has_pattern("vdb", 0xB7, 3 * MiB, MiB, path=meta["disks"][1]["extracted"], fmt="raw")
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_one_unreachable_repository_out_of_two_fails_alone(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS, name="one of two unreachable")
    reference = image_dir / "reference"
    reference.mkdir()
    good = restic_repository(tmp_path, "good")
    gone = borg_repository(tmp_path, "gone", path="ssh://nobody@127.0.0.1:1/nowhere",
                           ssh_command="ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no")
    config = write_config(image_dir / "kb", [gone, good], init=False)
    assert run_cli("init", "--repo", "good", config=config, env=cli_env()).returncode == 0

    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env(KBTEST_REFERENCE_DIR=reference))
    assert proc.returncode == 2
    [result] = json.loads(proc.stdout)["domains"]
    stores = {s["repository"]: s for s in result["stores"]}
    assert not result["ok"] and "gone" in result["error"] and "good" not in result["error"]
    assert stores["good"]["ok"] and not stores["gone"]["ok"] and stores["gone"]["error"]
    meta = extract_restic_archive(restic_backend(good), stores["good"]["archive"], tmp_path / "x")
    assert_images_match_reference(meta, reference)
    assert_back_on_own_images(domain, image_dir / "kb" / "state")

    text = run_cli("backup", domain.name, config=config, env=cli_env())  # the plain summary says it too
    assert text.returncode == 2
    assert "gone: FAILED:" in text.stdout and f"good: {domain.name}-" in text.stdout
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_repo_option_chooses_the_repositories(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="repo option")
    first, second = restic_repository(tmp_path, "first"), borg_repository(tmp_path, "second")
    third = restic_repository(tmp_path, "third")
    config = write_config(image_dir / "kb", [first, second, third])
    proc = run_cli("backup", domain.name, "--repo", "third", "--repo", "second", "--json", config=config,
                   env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert sorted(s["repository"] for s in json.loads(proc.stdout)["domains"][0]["stores"]) == ["second", "third"]
    assert restic_snapshots(first["url"]) == [] and len(restic_snapshots(third["url"])) == 1
    assert len(borg_archives(Path(second["path"]))) == 1
    listed = json.loads(run_cli("list", "--json", config=config, env=cli_env()).stdout)
    assert sorted(a["repository"] for a in listed) == ["second", "third"]


def _processes_running(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def test_sigterm_during_parallel_stores_stops_every_child_and_merges_back(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS, name="sigterm parallel")
    # A stand-in for ssh that never answers (its stdout stays open) and ends when its client
    # closes stdin: both stores hang until they are stopped.
    fake_ssh = tmp_path / f"fake-ssh-{os.getpid()}"
    fake_ssh.write_text("#!/bin/sh\ncat >/dev/null\n")
    fake_ssh.chmod(0o755)
    hanging_borg = borg_repository(tmp_path, "borg", path="ssh://x@hanging.invalid/repo", ssh_command=str(fake_ssh))
    hanging_restic = restic_repository(tmp_path, "restic", url="sftp:x@hanging.invalid:/repo",
                                       ssh_command=str(fake_ssh))
    config = write_config(image_dir / "kb", [hanging_borg, hanging_restic], init=False)
    proc = subprocess.Popen([str(KVM_BORG_BIN), "--config", str(config), "backup", domain.name],
                            env=_merged_env(cli_env()), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(_processes_running(str(fake_ssh))) < 2:  # one per repository: both stores are running
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stores never started"
        time.sleep(0.2)
    assert all(".kvm-borg-" in s for s in domain.live_sources().values())
    domain.hmp_write("vda", 0x5C, 4 * MiB, MiB)  # lands on the overlay
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "overlays were merged back" in err
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    assert domain.hmp_read_check("vda", 0x5C, 4 * MiB, MiB)
    deadline = time.monotonic() + 10
    while _processes_running(str(fake_ssh)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_running(str(fake_ssh)) == []
    assert not [pid for pid in _processes_running("kvm-borg") if pid != os.getpid()
                and str(config) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
