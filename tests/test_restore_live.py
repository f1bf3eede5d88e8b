"""`kvm-borg restore --live` against real libvirtd + QEMU + borg/restic + FUSE: the README's live restore
promises, one test each. The pulls are throttled (--pull-bandwidth) so the copy is seen running from the
archive before the pull ends; disks are a few MiB so each test takes seconds."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import libvirt
import pytest

from harness import (DiskSpec, DomainFactory, create_image, make_dir, qemu_img_compare, run_cli, start_cli, tmpfs,
                     wait_for, wait_state)
from guest.fixtures import guest_artifacts, guest_factory  # noqa: F401 (fixtures)
from harness.bitmap import bitmap_settings, short_scratch_dir
from kvm_borg import mountinfo
from kvm_borg.live_restore_plan import targets_with_backing
from support import cli_env, write_config, write_passphrase

TWO_DISKS = [DiskSpec("vda", "qcow2", 8), DiskSpec("vdb", "raw", 8)]


def backup(domain, config) -> str:
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]


def state_dir(config: Path) -> Path:
    return config.parent / "state"


def live_mounts(config: Path) -> list[str]:
    """Every mount point below the config's state_dir/live (the exposure of an archive)."""
    root = str(state_dir(config) / "live")
    return sorted(p for p in mountinfo.mount_points() if p == root or p.startswith(root + "/"))


def processes_naming(path: str) -> list[int]:
    """The pids of processes whose command line names `path` (borg/restic mount, a segment view); QEMU's own
    command line keeps naming the backing files it was started with, so it is left out."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if path.encode() in cmdline and b"qemu-system" not in cmdline.split(b"\0")[0]:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def journal_entries(config: Path) -> list[dict]:
    directory = state_dir(config) / "journal"
    return [json.loads(p.read_text()) for p in directory.glob("*.json")] if directory.is_dir() else []


@pytest.fixture(scope="module")
def borg_archive(libvirt_conn, run_dir, run_id):
    """One running 2-disk domain backed up once into a borg repository, shared by the borg tests:
    (its TestDomain, the config)."""
    directory = make_dir(run_dir / "live-restore-borg")
    factory = DomainFactory(libvirt_conn, directory, run_id, label="live-borg")
    try:
        domain = factory.make(disks=TWO_DISKS, name="live borg")
        config = write_config(directory / "kb", repo_path=directory / "repo")
        backup(domain, config)
        yield domain, config
    finally:
        for path in reversed(live_mounts(directory / "kb" / "config.yaml")):
            subprocess.run(["umount", "-l", path], capture_output=True)
        errors = factory.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
        assert not errors, errors


@pytest.fixture
def leftovers(request):
    """Registers configs whose live exposures are lazily unmounted after the test, whatever happened."""
    configs: list[Path] = []
    yield configs
    for config in configs:
        for path in reversed(live_mounts(config)):
            subprocess.run(["umount", "-l", path], capture_output=True)


def wait_running_from_archive(libvirt_conn, name: str, proc) -> libvirt.virDomain:
    """Wait until the live-restored domain runs; return it."""
    def running():
        try:
            return libvirt_conn.lookupByName(name).isActive()
        except libvirt.libvirtError:
            return False
    wait_for(running, f"domain {name} running", timeout=60, proc=proc)
    return libvirt_conn.lookupByName(name)


def assert_flat_and_equal(domain, copy_dom, result_disks: dict[str, str], libvirt_conn):
    """The copy's disks hold the archived content, have no backing file (image header, live and persistent
    XML) and are the local images the result names."""
    for target, path in result_disks.items():
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True,
                                         text=True, check=True).stdout)
        assert info["format"] == "qcow2" and "backing-filename" not in info, info
        assert domain.verify_fill(target, path, "qcow2"), f"{target}: {path} differs from the archived content"
    assert targets_with_backing(copy_dom.XMLDesc(0)) == set()
    assert targets_with_backing(copy_dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == set()


def assert_nothing_left(config: Path):
    assert live_mounts(config) == []
    live = str(state_dir(config) / "live")
    # borg's mount process exits by itself once unmounted (it closes the repository first): allow it a moment.
    deadline = time.monotonic() + 10
    while processes_naming(live) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_naming(live)
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:300] for pid in left
                if Path(f"/proc/{pid}").exists()}
    assert not commands, commands
    assert journal_entries(config) == []
    live_dir = state_dir(config) / "live"
    assert not live_dir.exists() or not any(live_dir.iterdir())


def test_live_restore_runs_the_copy_before_the_pull_ends_and_leaves_plain_local_images(
        borg_archive, domain_factory, image_dir, libvirt_conn, leftovers):
    domain, config = borg_archive
    leftovers.append(config)
    copy = domain_factory.domain_name("live borg copy")
    target_dir = image_dir / "copy"

    proc = start_cli("restore", domain.name, "--live", "--name", copy, "--target-dir", target_dir,
                     "--pull-bandwidth", "4", "--json", config=config, env=cli_env())
    dom = wait_running_from_archive(libvirt_conn, copy, proc)
    # Running while the data still comes from the archive: backing files in the live XML, the exposure mounted.
    assert proc.poll() is None
    assert targets_with_backing(dom.XMLDesc(0)) == {"vda", "vdb"}
    assert live_mounts(config)
    assert [e["source"] for e in journal_entries(config)] == ["live-restore"]
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"{copy}: running after" in err
    result = json.loads(out)
    print(f"live restore: running after {result['running_after_seconds']}s, pulled after {result['seconds']}s")
    assert result["archive"].startswith(domain.name + "-") and result["domain"] == copy
    assert 0 < result["running_after_seconds"] < result["seconds"]
    assert result["seconds"] - result["running_after_seconds"] > 2  # 2 disks of 8 MiB, one after the other, at 4 MiB/s
    assert set(result["disks"]) == {"vda", "vdb"}
    assert all(os.path.dirname(p) == str(target_dir) for p in result["disks"].values())
    assert dom.isActive() and dom.UUIDString() != domain.dom.UUIDString()
    assert_flat_and_equal(domain, dom, result["disks"], libvirt_conn)
    assert_nothing_left(config)
    # A refused live restore changes nothing: the name is taken now.
    before = sorted(target_dir.iterdir())
    again = run_cli("restore", domain.name, "--live", "--name", copy, "--target-dir", image_dir / "other",
                    config=config, env=cli_env())
    assert again.returncode == 2 and f"domain {copy!r} exists" in again.stderr
    assert not (image_dir / "other").exists() and sorted(target_dir.iterdir()) == before
    assert_nothing_left(config)


SPARSE_WRITES = [(0x5A, 3 << 20, 1 << 20), (0x6B, 41 << 20, 2 << 20)]  # 3 MiB of data on a 64 MiB disk


def test_live_restored_images_are_sparse_and_owned_as_libvirt_needs(
        domain_factory, image_dir, tmp_path, libvirt_conn, leftovers):
    """As for a full restore: the pulled image allocates only the archived data (zeros read from the archive are
    not written as data), and it is owned as libvirt gives QEMU its images (the running original's owner),
    never open to others."""
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 64, fill=SPARSE_WRITES)], name="live sparse")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    leftovers.append(config)
    backup(domain, config)
    copy = domain_factory.domain_name("live sparse copy")
    proc = run_cli("restore", domain.name, "--live", "--name", copy, "--target-dir", image_dir / "copy", "--json",
                   config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    [path] = json.loads(proc.stdout)["disks"].values()
    dom = libvirt_conn.lookupByName(copy)
    assert dom.isActive()
    st, original = os.stat(path), os.stat(domain.disks["vda"])
    data = sum(length for _pattern, _offset, length in SPARSE_WRITES)
    assert st.st_blocks * 512 <= data * 1.05 + (1 << 20), (st.st_blocks * 512, data)  # + qcow2 metadata
    assert domain.verify_fill("vda", path, "qcow2")
    assert (st.st_uid, st.st_gid) == (original.st_uid, original.st_gid) and not st.st_mode & 0o007
    assert_flat_and_equal(domain, dom, {"vda": path}, libvirt_conn)
    assert_nothing_left(config)


def test_a_live_restore_without_room_for_its_pulled_disks_is_refused_and_changes_nothing(
        borg_archive, domain_factory, image_dir, libvirt_conn):
    domain, config = borg_archive
    copy = domain_factory.domain_name("live no room copy")
    # 2 disks of 8 MiB: the pulled local images need 16 MiB and their qcow2 metadata; 12 MiB are there.
    with tmpfs(image_dir / "small", "12m") as small:
        target_dir = small / "copy"
        proc = run_cli("restore", domain.name, "--live", "--name", copy, "--target-dir", target_dir,
                       config=config, env=cli_env())
        assert proc.returncode == 2, proc.stderr
        [line] = [line for line in proc.stderr.splitlines() if line.strip()]
        assert f"not enough free space in {target_dir} for a live restore" in line, line
        needed = 2 * ((8 << 20) + (8 << 20) // 4096 + (1 << 20))
        assert f"need up to {needed} bytes" in line and "are free" in line
        assert list(small.iterdir()) == []  # not even the target directory was made
    assert copy not in [d.name() for d in libvirt_conn.listAllDomains(0)]
    assert_nothing_left(config)


def test_live_restore_from_restic(domain_factory, image_dir, tmp_path, libvirt_conn, leftovers):
    domain = domain_factory.make(disks=TWO_DISKS, name="live restic")
    repo = {"name": "restic", "type": "restic", "url": str(tmp_path / "restic-repo"),
            "passphrase_file": str(write_passphrase(tmp_path / "restic.pass"))}
    config = write_config(image_dir / "kb", [repo])
    leftovers.append(config)
    backup(domain, config)
    copy = domain_factory.domain_name("live restic copy")

    proc = start_cli("restore", domain.name, "--live", "--name", copy, "--target-dir", image_dir / "copy",
                     "--pull-bandwidth", "4", "--json", config=config, env=cli_env())
    dom = wait_running_from_archive(libvirt_conn, copy, proc)
    assert proc.poll() is None and targets_with_backing(dom.XMLDesc(0)) == {"vda", "vdb"}
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    print(f"live restore: running after {result['running_after_seconds']}s, pulled after {result['seconds']}s")
    assert 0 < result["running_after_seconds"] < result["seconds"]
    assert_flat_and_equal(domain, dom, result["disks"], libvirt_conn)
    assert_nothing_left(config)


def test_live_restore_of_a_segmented_archive(domain_factory, image_dir, run_dir, tmp_path, libvirt_conn, leftovers):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8), DiskSpec("vdb", "qcow2", 4)], name="live seg")
    scratch = domain_factory.track_path(short_scratch_dir(run_dir))
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", **bitmap_settings(scratch_dir=str(scratch)))
    leftovers.append(config)
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["domains"][0]["method"] == "bitmap"
    copy = domain_factory.domain_name("live seg copy")

    proc = run_cli("restore", domain.name, "--live", "--name", copy, "--target-dir", image_dir / "copy", "--json",
                   config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert_flat_and_equal(domain, libvirt_conn.lookupByName(copy), result["disks"], libvirt_conn)
    assert_nothing_left(config)


def start_slow_live_restore(domain, copy: str, image_dir: Path, config: Path, libvirt_conn):
    """Start `restore --live` of `domain` as `copy` pulling at 1 MiB/s; wait until the copy runs and the
    journal says it pulls; return (the kvm-borg process, the copy's domain)."""
    proc = start_cli("restore", domain.name, "--live", "--name", copy, "--target-dir", image_dir / "copy",
                     "--pull-bandwidth", "1", config=config, env=cli_env())
    dom = wait_running_from_archive(libvirt_conn, copy, proc)
    wait_for(lambda: journal_entries(config) and journal_entries(config)[0]["stage"] == "pulling", "the pull",
             timeout=30, proc=proc)
    return proc, dom


def test_kvm_borg_killed_mid_pull_prune_refused_then_recover_completes_it(
        borg_archive, domain_factory, image_dir, libvirt_conn, leftovers):
    domain, config = borg_archive
    leftovers.append(config)
    copy = domain_factory.domain_name("live killed copy")

    proc, dom = start_slow_live_restore(domain, copy, image_dir, config, libvirt_conn)
    disks = {d["target"]: d["overlay"] for d in journal_entries(config)[0]["disks"]}
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert dom.isActive() and targets_with_backing(dom.XMLDesc(0))
    # The archive in use is protected: prune refuses while the live restore is unfinished.
    pruned = run_cli("prune", config=config, env=cli_env())
    assert pruned.returncode == 2 and "live restore of domain" in pruned.stderr + pruned.stdout

    recovered = run_cli("recover", "--all", "--json", config=config, env=cli_env())
    assert recovered.returncode == 0, recovered.stderr
    [outcome] = json.loads(recovered.stdout)
    assert outcome["domain"] == copy and outcome["ok"]
    assert_flat_and_equal(domain, dom, disks, libvirt_conn)
    assert_nothing_left(config)
    assert run_cli("prune", config=config, env=cli_env()).returncode == 0


def test_mount_killed_mid_pull_recover_exposes_again_and_finishes(
        borg_archive, domain_factory, image_dir, libvirt_conn, leftovers):
    domain, config = borg_archive
    leftovers.append(config)
    copy = domain_factory.domain_name("live mount killed copy")

    proc, dom = start_slow_live_restore(domain, copy, image_dir, config, libvirt_conn)
    [entry] = journal_entries(config)
    disks = {d["target"]: d["overlay"] for d in entry["disks"]}
    record = json.loads(Path(entry["extra"]["record"]).read_text())
    [mount_pid] = [s["pid"] for s in record["steps"] if s["kind"] == "archive"]
    assert mount_pid
    os.kill(mount_pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "kvm-borg recover" in err
    assert dom.isActive() and targets_with_backing(dom.XMLDesc(0))

    recovered = run_cli("recover", copy, "--json", config=config, env=cli_env())
    assert recovered.returncode == 0, recovered.stderr
    [outcome] = json.loads(recovered.stdout)
    assert outcome["ok"] and any("exposed archive" in a for a in outcome["actions"]), outcome
    dom = libvirt_conn.lookupByName(copy)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert_flat_and_equal(domain, dom, disks, libvirt_conn)
    assert_nothing_left(config)


def test_real_guest_answers_before_the_pull_ends_pauses_on_a_dead_mount_and_recover_resumes_it(
        guest_factory, domain_factory, image_dir, tmp_path, libvirt_conn, leftovers):  # noqa: F811
    from guest import build

    # The data disk vda (ext4, a writing workload), raw: all of it is pulled, 64 s at 1 MiB/s.
    guest = guest_factory(fmt="raw", size_mib=64)
    build.wait_for_agent(guest.dom, timeout=120)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    leftovers.append(config)
    backup(guest, config)
    guest.dom.destroy()  # the copy shares its kernel and console file
    copy = domain_factory.domain_name("live guest copy")

    proc = start_cli("restore", guest.name, "--live", "--name", copy, "--target-dir", image_dir / "copy",
                     "--pull-bandwidth", "1", config=config, env=cli_env())
    dom = wait_running_from_archive(libvirt_conn, copy, proc)
    print(f"agent of the copy answered after {build.wait_for_agent(dom, timeout=120):.1f}s")
    assert proc.poll() is None and targets_with_backing(dom.XMLDesc(0)) == {"vda"}  # before the pull ended
    [entry] = journal_entries(config)
    record = json.loads(Path(entry["extra"]["record"]).read_text())
    [mount_pid] = [s["pid"] for s in record["steps"] if s["kind"] == "archive"]
    os.kill(mount_pid, signal.SIGKILL)
    # The guest reads the disk's last MiB, not pulled yet (the pull goes from the start at 1 MiB/s): that read
    # goes to the dead archive, and the guest pauses instead of seeing an error.
    build.agent_command(dom, "guest-exec", {"path": "/bin/sh", "arg": [
        "-c", "dd if=/dev/vda of=/dev/null bs=65536 skip=1008 count=16"]})
    wait_for(lambda: dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR],
             "the guest paused on the read error", timeout=30)
    proc.communicate(timeout=60)
    assert proc.returncode != 0

    recovered = run_cli("recover", copy, "--json", config=config, env=cli_env())
    assert recovered.returncode == 0, recovered.stderr
    [outcome] = json.loads(recovered.stdout)
    assert any("resumed" in a for a in outcome["actions"]), outcome
    dom = libvirt_conn.lookupByName(copy)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    build.wait_for_agent(dom, timeout=60)
    assert targets_with_backing(dom.XMLDesc(0)) == set()
    assert_nothing_left(config)


def test_live_restore_of_a_shut_off_copy_is_flattened_offline_by_recover(
        borg_archive, domain_factory, image_dir, libvirt_conn, leftovers):
    domain, config = borg_archive
    leftovers.append(config)
    copy = domain_factory.domain_name("live offline copy")

    proc, dom = start_slow_live_restore(domain, copy, image_dir, config, libvirt_conn)
    disks = {d["target"]: d["overlay"] for d in journal_entries(config)[0]["disks"]}
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    dom.destroy()  # the copy is shut off with its pull not done: recover cannot pull, it copies offline
    assert targets_with_backing(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == {"vda", "vdb"}

    recovered = run_cli("recover", copy, "--json", config=config, env=cli_env())
    assert recovered.returncode == 0, recovered.stderr
    [outcome] = json.loads(recovered.stdout)
    assert outcome["ok"] and any("shut off: copied the archived data" in a for a in outcome["actions"]), outcome
    assert not dom.isActive()
    assert_flat_and_equal(domain, dom, disks, libvirt_conn)
    assert_nothing_left(config)
    dom.create()  # it runs without the archive now
    wait_state(dom, libvirt.VIR_DOMAIN_RUNNING)
    dom.destroy()


UEFI_TPM_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>
    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
    <tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def test_live_restore_of_a_uefi_domain_with_a_tpm_brings_its_nvram_and_tpm_state(
        domain_factory, image_dir, tmp_path, libvirt_conn, leftovers):
    # TCG, as tests/test_restore.py's UEFI test (OVMF_CODE_4M pauses at once under this host's nested KVM).
    name = domain_factory.domain_name("live uefi")
    disk = create_image(make_dir(image_dir / "uefi") / "vda.qcow2", "qcow2", 8, "pattern", 3)
    os.chmod(disk, 0o644)
    dom = libvirt_conn.defineXML(UEFI_TPM_XML.format(name=name, disk=disk))
    domain_factory.track_path(f"/var/lib/libvirt/swtpm/{dom.UUIDString()}")
    dom.create()  # libvirt makes the NVRAM file from its template, swtpm the TPM state
    wait_state(dom, libvirt.VIR_DOMAIN_RUNNING)
    dom.destroy()  # at once: waiting for OVMF to write a variable takes a minute under TCG on a loaded host
    nvram = Path(ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).findtext("./os/nvram"))
    archived_vars = nvram.read_bytes()[:-16] + b"kvm-borg-nvram-!"  # not the template's: the archive's own
    nvram.write_bytes(archived_vars)
    tpm_state = Path(f"/var/lib/libvirt/swtpm/{dom.UUIDString()}/tpm2/tpm2-00.permall").read_bytes()
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    leftovers.append(config)
    backup(SimpleNamespace(name=name), config)
    copy = domain_factory.domain_name("live uefi copy")

    proc = start_cli("restore", name, "--live", "--name", copy, "--target-dir", image_dir / "copy", "--json",
                     config=config, env=cli_env())
    copy_dom = wait_running_from_archive(libvirt_conn, copy, proc)
    domain_factory.track_path(f"/var/lib/libvirt/swtpm/{copy_dom.UUIDString()}")
    # Read at once: OVMF takes seconds under TCG before it writes a variable or starts the TPM.
    restored_vars = Path(ET.fromstring(copy_dom.XMLDesc(0)).findtext("./os/nvram")).read_bytes()
    restored_tpm = Path(f"/var/lib/libvirt/swtpm/{copy_dom.UUIDString()}/tpm2/tpm2-00.permall").read_bytes()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["nvram"] == ET.fromstring(copy_dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).findtext("./os/nvram")
    assert result["nvram"].startswith("/var/lib/libvirt/qemu/nvram/") and restored_vars == archived_vars
    assert result["tpm"] == f"/var/lib/libvirt/swtpm/{copy_dom.UUIDString()}" and restored_tpm == tpm_state
    assert copy_dom.isActive() and targets_with_backing(copy_dom.XMLDesc(0)) == set()
    assert qemu_img_compare(disk, result["disks"]["vda"], "qcow2", "qcow2")
    assert_nothing_left(config)
