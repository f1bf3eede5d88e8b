"""`kvm-borg verify`: the restore drill against real libvirtd + QEMU + borg."""

from __future__ import annotations

import json

import pytest

from guest import build
from guest.fixtures import guest_artifacts, guest_factory  # noqa: F401
from harness import DiskSpec, run_cli, start_cli, wait_for
from kvm_borg import mountinfo
from kvm_borg.restore_plan import safe_file_name
from support import cli_env, write_config

TWO_DISKS = [DiskSpec("vda", "qcow2", 32), DiskSpec("vdb", "raw", 32)]


def backup(name, config) -> str:
    proc = run_cli("backup", name, "--json", config=config, env=cli_env())
    assert proc.returncode in (0, 1), proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    assert result["ok"], result
    return result["stores"][0]["archive"]


def assert_nothing_left(libvirt_conn, config_dir, original: str):
    """No verify copy of `original` (other sessions' drills may run meanwhile), no scratch directory."""
    names = [d.name() for d in libvirt_conn.listAllDomains(0)]
    assert not [n for n in names if n.startswith(f"kvm-borg-verify-{safe_file_name(original)[:40]}-")]
    verify_dir = config_dir / "state" / "verify"
    assert not verify_dir.exists() or list(verify_dir.iterdir()) == []


def assert_no_exposure_left(config_dir):
    """No mount, file, journal entry or process of a live drill's exposure is left."""
    live = config_dir / "state" / "live"
    assert not [p for p in mountinfo.mount_points() if p.startswith(str(live))]
    assert not live.exists() or list(live.iterdir()) == []
    journal = config_dir / "state" / "journal"
    assert not journal.exists() or list(journal.glob("*.json")) == []


def test_verify_restores_to_scratch_and_checks_every_disk(domain_factory, image_dir, tmp_path, libvirt_conn):
    domain = domain_factory.make(disks=TWO_DISKS, running=False, name="verify disks")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    archive = backup(domain.name, config)
    proc = run_cli("verify", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["archive"] == archive and report["restore_seconds"] > 0
    assert report["disks"]["vda"]["check"] == "no errors"
    assert report["disks"]["vdb"]["check"] == "not applicable to raw"
    assert {d["virtual_size"] for d in report["disks"].values()} == {32 << 20}
    assert report["boot"] is None
    assert_nothing_left(libvirt_conn, image_dir / "kb", domain.name)


def test_verify_boot_without_agent_waits_for_the_copy_to_keep_running(domain_factory, image_dir, tmp_path,
                                                                     libvirt_conn):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], name="verify alive")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    backup(domain.name, config)
    proc = run_cli("verify", domain.name, "--boot", "--alive-seconds", "3", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["boot"]["sign_of_life"] == "still running after 3s"
    assert report["rto_seconds"] >= report["restore_seconds"] + 3
    assert domain.is_active()  # the original is untouched
    assert_nothing_left(libvirt_conn, image_dir / "kb", domain.name)
    # Booted live: the same sign of life, while (or after) its disk is pulled in; then all of it is gone.
    proc = run_cli("verify", domain.name, "--boot", "--live", "--alive-seconds", "3", "--json", config=config,
                   env=cli_env())
    assert proc.returncode == 0, proc.stderr
    live = json.loads(proc.stdout)
    assert live["ok"] and live["live"] and live["boot"]["sign_of_life"] == "still running after 3s", live
    assert live["sign_of_life_after_seconds"] >= live["running_after_seconds"] + 2.99  # both rounded to ms
    assert live["pull"]["done"] == (live["pull"]["not_pulled"] == [])
    assert live["pull"]["done"] == (live["pull"]["done_after_seconds"] is not None)
    assert domain.is_active()
    assert_nothing_left(libvirt_conn, image_dir / "kb", domain.name)
    assert_no_exposure_left(image_dir / "kb")
    bad = run_cli("verify", domain.name, "--live", config=config, env=cli_env())
    assert bad.returncode == 2 and "it needs --boot" in bad.stdout + bad.stderr

    # A live drill killed outright leaves its copy running from the archive: recover discards it.
    proc = start_cli("verify", domain.name, "--boot", "--live", "--alive-seconds", "120", config=config,
                     env=cli_env())
    journal = image_dir / "kb" / "state" / "journal"

    def copy_running() -> bool:
        entries = [json.loads(p.read_text()) for p in journal.glob("*.json")] if journal.is_dir() else []
        return any(e["stage"] == "pulling" and e["extra"].get("drill") for e in entries)
    wait_for(copy_running, "the drill's copy running", timeout=120, proc=proc)
    proc.kill()
    proc.communicate(timeout=30)
    recovered = run_cli("recover", "--all", "--json", config=config, env=cli_env())
    assert recovered.returncode == 0, recovered.stderr
    [outcome] = json.loads(recovered.stdout)
    assert outcome["ok"] and any("removed the restore drill's copy" in a for a in outcome["actions"]), outcome
    names = [d.name() for d in libvirt_conn.listAllDomains(0)]
    assert not [n for n in names if n.startswith(f"kvm-borg-verify-{safe_file_name(domain.name)[:40]}-")]
    assert_no_exposure_left(image_dir / "kb")


@pytest.mark.slow
def test_verify_boot_of_a_real_guest_reports_rto(guest_factory, image_dir, tmp_path, libvirt_conn):  # noqa: F811
    guest = guest_factory()
    build.wait_for_agent(guest.dom, timeout=120)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    archive = backup(guest.name, config)
    proc = run_cli("verify", guest.name, "--boot", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["archive"] == archive
    assert report["boot"]["sign_of_life"] == "guest agent answered guest-ping"
    assert 0 < report["restore_seconds"] < report["rto_seconds"]
    print(f"verify --boot: restore {report['restore_seconds']:.1f}s, RTO {report['rto_seconds']:.1f}s")
    assert guest.dom.isActive()
    assert_nothing_left(libvirt_conn, image_dir / "kb", guest.name)
    proc = run_cli("verify", guest.name, config=config, env=cli_env())  # the human-readable report
    assert proc.returncode == 0 and "verify ok" in proc.stdout

    # The same archive booted live: the drill's RTO is the time to the guest's first sign of life while its
    # 64 MiB disk still comes from the archive.
    proc = run_cli("verify", guest.name, "--boot", "--live", "--pull-bandwidth", "1", "--json", config=config,
                   env=cli_env())
    assert proc.returncode == 0, proc.stderr
    live = json.loads(proc.stdout)
    print(f"verify --boot --live: running after {live['running_after_seconds']:.1f}s, sign of life after "
          f"{live['sign_of_life_after_seconds']:.1f}s, pull {live['pull']}")
    assert live["ok"] and live["live"] and live["archive"] == archive, live
    assert live["boot"]["sign_of_life"] == "guest agent answered guest-ping"
    assert 0 < live["running_after_seconds"] < live["sign_of_life_after_seconds"] == live["rto_seconds"]
    assert live["restore_seconds"] == live["running_after_seconds"]
    pull = live["pull"]  # 64 s at 1 MiB/s: still pulling when the agent answers, unless the host is very loaded
    assert (pull == {"done": False, "done_after_seconds": None, "not_pulled": ["vda"]}
            or pull["done"] and pull["not_pulled"] == [] and 60 < pull["done_after_seconds"] <= live["rto_seconds"]), pull
    assert guest.dom.isActive()
    assert_nothing_left(libvirt_conn, image_dir / "kb", guest.name)
    assert_no_exposure_left(image_dir / "kb")
