"""`kvm-borg` with `type: restic` repositories against real libvirtd + QEMU + restic (Debian's 0.14).

Archives are read back through the backend itself (list_archives, list_paths, extract_file: what
`kvm-borg restore` builds on) and compared with the probe plugin's copy of each disk taken at
the snapshot instant (KBTEST_REFERENCE_DIR).

The helpers here (restic_backend, extract_restic_archive, restic_snapshots, loop_device,
block_device_domain) are shared by the other restic / multi-repository / remote test modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import RESTIC_BIN, TEST_PASSPHRASE, DiskSpec, qemu_img_compare, restic_env, run_cli
from kbtest_plugins.probe import AFTER_SNAPSHOT_LENGTH, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_PATTERN
from kvm_borg.backends.restic.repository import ResticRepository
from kvm_borg.restore_plan import safe_file_name
from support import assert_back_on_own_images, cli_env, write_config, write_passphrase

MiB = 1 << 20
TWO_DISKS = [DiskSpec("vda", "qcow2", 64), DiskSpec("vdb", "raw", 64)]


# --- shared helpers ---------------------------------------------------------------------------


def restic_repository(directory: Path, name: str = "restic", url: str | None = None, **keys) -> dict:
    """A restic repository config entry with a fresh passphrase file in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    return {"name": name, "type": "restic", "url": url or str(directory / f"{name}-repo"),
            "passphrase_file": str(write_passphrase(directory / f"{name}.pass")), **keys}


def restic_backend(repository: dict, hostname: str | None = None) -> ResticRepository:
    """The backend object kvm-borg itself would use for `repository` (in this process)."""
    settings = SimpleNamespace(hostname=hostname or os.uname().nodename, restic_binary=None, progress=False)
    return ResticRepository(repository, settings)


def extract_restic_archive(backend, archive: str, destination: Path) -> dict:
    """Extract meta.json and every disk image of `archive` through the backend into `destination`.

    Returns meta.json with each disk's extracted file under "extracted"."""
    destination.mkdir(parents=True, exist_ok=True)
    [meta_path] = [p for p in backend.list_paths(archive) if p.endswith("/meta.json")]
    backend.extract_file(archive, meta_path, destination / "meta.json")
    meta = json.loads((destination / "meta.json").read_text())
    for disk in meta["disks"]:
        target = destination / f"{disk['target']}.img"
        backend.extract_file(archive, backend.archive_path("/" + disk["archive_path"]), target)
        disk["extracted"] = target
    return meta


def commands_run(backend) -> list[tuple[str, ...]]:
    """Record the argv of every restic run of `backend` from now on (the runs still happen); return the record."""
    ran: list[tuple[str, ...]] = []
    run = backend._run

    def recording(argv, **kwargs):
        ran.append(tuple(argv))
        return run(argv, **kwargs)

    backend._run = recording
    return ran


def restic_snapshots(url: str, cache_dir: Path | None = None) -> list[dict]:
    """Every snapshot of a restic repository, read with the restic CLI directly."""
    proc = subprocess.run([str(RESTIC_BIN), "-r", url, "snapshots", "--json"], capture_output=True, text=True,
                          env=restic_env(cache_dir=cache_dir), check=True, stdin=subprocess.DEVNULL)
    return json.loads(proc.stdout)


def assert_images_match_reference(meta: dict, reference: Path) -> None:
    """Each extracted image is the guest view at the snapshot instant (the probe's copy), without the later write."""
    for disk in meta["disks"]:
        image, fmt = disk["extracted"], disk["format"]
        assert qemu_img_compare(image, reference / f"{disk['target']}.raw", fmt, "raw"), disk["target"]


@contextlib.contextmanager
def loop_device(backing: Path):
    """Attach `backing` to a free loop device; yield its path; detach at the end (deferred while in use)."""
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def make_block_device_domain(domain_factory, stack: contextlib.ExitStack, disks, device_target: str, name: str):
    """Create and start a domain from `disks` whose `device_target` disk is a loop device over its filled image.

    The content stays what the factory wrote, so `verify_fill` still applies; the loop device is
    detached when `stack` closes."""
    import xml.etree.ElementTree as ET

    import libvirt

    from harness import wait_state

    domain = domain_factory.make(disks=disks, running=False, name=name)
    device = stack.enter_context(loop_device(domain.disks[device_target]))
    root = ET.fromstring(domain.xml(inactive=True))
    for disk in root.findall("./devices/disk"):
        if disk.find("target").get("dev") == device_target:
            disk.set("type", "block")
            source = disk.find("source")
            source.attrib.clear()
            source.set("dev", str(device))
    domain.conn.defineXML(ET.tostring(root, encoding="unicode"))
    domain.disks[device_target] = device
    domain.dom.create()
    wait_state(domain.dom, libvirt.VIR_DOMAIN_RUNNING)
    return domain


# --- tests ------------------------------------------------------------------------------------


def test_live_two_disk_backup_into_local_restic_equals_snapshot_content(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS, name="restic two-disk")
    domain.hmp_write("vda", 0xA1, 2 * MiB, MiB)
    reference = image_dir / "reference"
    reference.mkdir()
    repo = restic_repository(tmp_path)
    config = write_config(image_dir / "kb", [repo])
    proc = run_cli("backup", domain.name, "--json", config=config,
                   env=cli_env(KBTEST_REFERENCE_DIR=reference, KBTEST_WRITE_AFTER_SNAPSHOT=1))
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    [store] = result["stores"]
    assert result["ok"] and store["ok"] and store["repository"] == "restic"
    assert store["original_size"] > 0 and store["deduplicated_size"] > 0

    # One snapshot (no block device), tagged for kvm-borg, this domain and this hypervisor.
    [snapshot] = restic_snapshots(repo["url"])
    assert {"kvm-borg", f"domain={domain.name}", f"archive={store['archive']}", "part=main"} <= set(snapshot["tags"])
    assert snapshot["hostname"] == os.uname().nodename

    backend = restic_backend(repo)
    ran = commands_run(backend)
    meta = extract_restic_archive(backend, store["archive"], tmp_path / "x")
    assert meta["domain"]["name"] == domain.name and [d["target"] for d in meta["disks"]] == ["vda", "vdb"]
    assert_images_match_reference(meta, reference)
    for disk in meta["disks"]:
        assert disk["original_source"] == str(domain.disks[disk["target"]])
        assert not domain.has_pattern(disk["target"], AFTER_SNAPSHOT_PATTERN, AFTER_SNAPSHOT_OFFSET,
                                      AFTER_SNAPSHOT_LENGTH, path=disk["extracted"], fmt=disk["format"])
    assert domain.has_pattern("vda", 0xA1, 2 * MiB, MiB, path=meta["disks"][0]["extracted"], fmt="qcow2")
    paths = backend.list_paths(store["archive"])
    assert any(p.endswith("/domain.xml") for p in paths) and any(p.endswith("/domain-live.xml") for p in paths)
    assert all(p.startswith("/") for p in paths)
    # three files read and the paths listed twice: the archive's snapshots were listed once
    assert len([argv for argv in ran if "snapshots" in argv]) == 1, ran

    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    for target in ("vda", "vdb"):
        assert domain.hmp_read_check(target, AFTER_SNAPSHOT_PATTERN, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_LENGTH)

    # `kvm-borg restore` reads the restic archive through the same backend.
    restored = tmp_path / "restored"
    proc = run_cli("restore", domain.name, "--repo", "restic", "--target-dir", restored, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    for disk in meta["disks"]:  # named on this host, never after the archive's paths
        image = restored / f"{safe_file_name(domain.name)}-{disk['target']}.{disk['format']}"
        assert qemu_img_compare(image, reference / f"{disk['target']}.raw", disk["format"], "raw")


def test_block_device_disk_is_streamed_into_its_own_snapshot_at_its_device_path(domain_factory, image_dir, tmp_path):
    disks = [DiskSpec("vda", "qcow2", 32), DiskSpec("vdb", "raw", 32)]
    with contextlib.ExitStack() as stack:
        domain = make_block_device_domain(domain_factory, stack, disks, "vdb", "restic blockdev")
        device = domain.disks["vdb"]
        assert domain.live_sources()["vdb"] == str(device)
        reference = image_dir / "reference"
        reference.mkdir()
        repo = restic_repository(tmp_path)
        config = write_config(image_dir / "kb", [repo])
        proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env(KBTEST_REFERENCE_DIR=reference))
        assert proc.returncode == 0, proc.stderr
        [store] = json.loads(proc.stdout)["domains"][0]["stores"]
        assert store["ok"]

        snapshots = restic_snapshots(repo["url"])
        parts = {next(t for t in s["tags"] if t.startswith("part=")): s for s in snapshots}
        assert set(parts) == {"part=main", "part=device"} and len(snapshots) == 2
        assert parts["part=device"]["paths"] == [str(device)]
        assert str(device) not in parts["part=main"]["paths"]  # no device node in the main snapshot
        assert parts["part=device"]["time"] == parts["part=main"]["time"]

        backend = restic_backend(repo)
        [info] = backend.list_archives(domain.name)
        assert info.name == store["archive"] and info.disks == ("vda", "vdb")
        meta = extract_restic_archive(backend, store["archive"], tmp_path / "x")
        vdb = next(d for d in meta["disks"] if d["target"] == "vdb")
        assert vdb["block_device"] and vdb["archive_path"] == str(device).lstrip("/")
        assert os.path.getsize(vdb["extracted"]) == 32 * MiB
        assert_images_match_reference(meta, reference)
        assert domain.verify_fill("vdb", vdb["extracted"], "raw")
        assert_back_on_own_images(domain, image_dir / "kb" / "state")
        domain.destroy()


def test_list_shows_only_kvm_borgs_complete_archives_per_domain(domain_factory, image_dir, tmp_path):
    first = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)], name="restic list, one")
    second = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], running=False, name="restic list two")
    repo = restic_repository(tmp_path)
    config = write_config(image_dir / "kb", [repo])
    # Someone else's snapshot in the same repository, and an interrupted run's orphan device part.
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("not a VM\n")
    env = restic_env()
    env["RESTIC_PASSWORD"] = TEST_PASSPHRASE
    subprocess.run([str(RESTIC_BIN), "-r", repo["url"], "backup", "--tag", "kvm-borg", str(foreign)], env=env,
                   check=True, capture_output=True)
    subprocess.run([str(RESTIC_BIN), "-r", repo["url"], "backup", "--stdin", "--stdin-filename", "/dev/orphan",
                    "--tag", f"kvm-borg,domain={first.name.replace(',', '%2C')},archive=x,part=device"],
                   env=env, input=b"data", check=True, capture_output=True)
    assert run_cli("backup", first.name, second.name, config=config, env=cli_env()).returncode == 0
    archives = json.loads(run_cli("list", "--json", config=config, env=cli_env()).stdout)
    assert {a["domain"] for a in archives} == {first.name, second.name}
    for archive in archives:
        assert archive["repository"] == "restic" and archive["disks"] == ["vda"]
        assert archive["original_size"] >= 16 * MiB and archive["host"] == os.uname().nodename
        assert archive["name"].startswith(archive["domain"] + "-")
    only_first = json.loads(run_cli("list", first.name, "--json", config=config, env=cli_env()).stdout)
    assert [a["domain"] for a in only_first] == [first.name]  # the comma in the name is no tag separator
    table = run_cli("list", config=config, env=cli_env()).stdout
    assert first.name in table and second.name in table


def test_init_creates_the_repository_once_and_a_wrong_password_fails_cleanly(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], name="restic wrong password")
    repo = restic_repository(tmp_path)
    config = write_config(image_dir / "kb", [repo], init=False)
    assert run_cli("init", config=config, env=cli_env()).stdout.strip() == "restic: created"
    assert run_cli("init", config=config, env=cli_env()).stdout.strip() == "restic: already exists"
    write_passphrase(Path(repo["passphrase_file"]), "not the password")
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 2
    [store] = json.loads(proc.stdout)["domains"][0]["stores"]
    assert not store["ok"] and "wrong password" in store["error"] and "\n" not in store["error"]
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    assert restic_snapshots(repo["url"]) == []


def test_password_command_is_used_instead_of_a_file(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="restic passcommand")
    secret = write_passphrase(tmp_path / "secret")
    repo = {"name": "restic", "type": "restic", "url": str(tmp_path / "repo"), "passphrase_command": f"cat {secret}"}
    config = write_config(image_dir / "kb", [repo])
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert len(restic_snapshots(repo["url"])) == 1
    assert "kbtest-passphrase" not in proc.stderr
