"""Failures of the spine: every path after a snapshot ends back on the domain's own images, or in a
journal entry that `kvm-borg recover` completes; refusals change nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from harness import DiskSpec, run_cli, start_cli, tmpfs, wait_for
from support import (
    assert_back_on_own_images,
    borg_archives,
    cli_env,
    journal_entries,
    overlay_files,
    write_config,
    write_passphrase,
)

MiB = 1 << 20
TWO_DISKS = [DiskSpec("vda", "qcow2", 32), DiskSpec("vdb", "raw", 32)]


def _start_paused_backup(config, domain, pause_file, seconds=120):
    """Start `kvm-borg backup` that pauses right after its snapshot; return the Popen once paused."""
    proc = start_cli("backup", domain.name, config=config,
                     env=cli_env(KBTEST_PAUSE_FILE=pause_file, KBTEST_PAUSE_SECONDS=seconds))
    wait_for(lambda: os.path.exists(pause_file), "the backup's snapshot", timeout=60, proc=proc)
    return proc


def _strand(config, domain, tmp_path) -> None:
    """SIGKILL a backup right after its snapshot: the domain is left running on its overlays."""
    proc = _start_paused_backup(config, domain, tmp_path / "paused")
    proc.kill()
    proc.communicate(timeout=30)


def test_wrong_passphrase_fails_cleanly_and_domain_is_back_on_its_images(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    write_passphrase(image_dir / "kb" / "passphrase", "not the passphrase")
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 2
    store = json.loads(proc.stdout)["domains"][0]["stores"][0]
    assert not store["ok"] and "passphrase" in store["error"].lower()
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    assert borg_archives(tmp_path / "repo") == []


def test_unreachable_repository_fails_cleanly_and_domain_is_back_on_its_images(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS)
    config = write_config(image_dir / "kb", init=False, repositories=[{
        "name": "gone", "type": "borg", "path": "ssh://nobody@127.0.0.1:1/nowhere",
        "passphrase_file": str(write_passphrase(tmp_path / "pass")),
        "ssh_command": "ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no"}])
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 2
    result = json.loads(proc.stdout)["domains"][0]
    assert not result["ok"] and result["stores"][0]["error"]
    assert "\n" not in result["stores"][0]["error"]
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_sigterm_mid_backup_merges_back_before_exiting(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = _start_paused_backup(config, domain, tmp_path / "paused")
    assert domain.live_sources()["vda"].endswith(".qcow2") and ".kvm-borg-" in domain.live_sources()["vda"]
    domain.hmp_write("vda", 0x5A, 4 * MiB, MiB)  # lands on the overlay
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "overlays were merged back" in err
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    assert domain.hmp_read_check("vda", 0x5A, 4 * MiB, MiB)


def test_sigkill_mid_backup_is_completed_by_recover(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS)
    state = image_dir / "kb" / "state"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    _strand(config, domain, tmp_path)
    # Stranded: the domain runs on overlays and the journal says so.
    assert all(".kvm-borg-" in s for s in domain.live_sources().values())
    assert len(journal_entries(state)) == 1
    domain.hmp_write("vdb", 0x6B, 4 * MiB, MiB)  # written while stranded: must survive recovery
    # The next backup refuses clearly and changes nothing.
    again = run_cli("backup", domain.name, config=config, env=cli_env())
    assert again.returncode == 2
    assert "kvm-borg recover" in again.stderr
    assert len(journal_entries(state)) == 1
    recover = run_cli("recover", config=config, env=cli_env())
    assert recover.returncode == 0, recover.stderr
    assert domain.name in recover.stdout
    assert_back_on_own_images(domain, state)
    assert domain.hmp_read_check("vdb", 0x6B, 4 * MiB, MiB)
    # Idempotent, and the next backup succeeds.
    assert run_cli("recover", config=config, env=cli_env()).stdout.strip() == "nothing to recover"
    assert run_cli("backup", domain.name, config=config, env=cli_env()).returncode == 0
    assert_back_on_own_images(domain, state)


def test_sigkill_of_backup_of_domain_shut_down_meanwhile_is_merged_offline(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS)
    state = image_dir / "kb" / "state"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    _strand(config, domain, tmp_path)
    domain.hmp_write("vda", 0x7C, 6 * MiB, MiB)
    domain.destroy()  # the guest powers off while on its overlays
    assert all(".kvm-borg-" in s for s in domain.inactive_sources().values())
    recover = run_cli("recover", domain.name, config=config, env=cli_env())
    assert recover.returncode == 0, recover.stderr
    assert "qemu-img commit" in recover.stdout
    assert_back_on_own_images(domain, state)
    assert domain.has_pattern("vda", 0x7C, 6 * MiB, MiB)
    domain.start()  # the redefined domain boots from its own images (raw stays raw)
    assert domain.live_sources() == {t: str(p) for t, p in domain.disks.items()}


def test_domain_with_checkpoint_is_refused_with_no_change(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)])
    domain.dom.checkpointCreateXML("<domaincheckpoint><name>nbd-1</name></domaincheckpoint>", 0)
    try:
        config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
        proc = run_cli("backup", domain.name, config=config, env=cli_env())
        assert proc.returncode == 2
        assert "checkpoints (nbd-1)" in proc.stderr
        assert [c.getName() for c in domain.dom.listAllCheckpoints(0)] == ["nbd-1"]  # not deleted
        assert_back_on_own_images(domain, image_dir / "kb" / "state")
        assert borg_archives(tmp_path / "repo") == []
    finally:
        for checkpoint in domain.dom.listAllCheckpoints(0):
            checkpoint.delete(0)


def test_unknown_domain_is_one_clear_line_and_exit_2(image_dir, tmp_path):
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", "kbtest-no-such-domain", config=config, env=cli_env())
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kvm-borg: error: domain 'kbtest-no-such-domain' does not exist"
    assert journal_entries(image_dir / "kb" / "state") == []


def test_concurrent_backup_of_the_same_domain_is_refused(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)])
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    first = _start_paused_backup(config, domain, tmp_path / "paused", seconds=5)
    second = run_cli("backup", domain.name, config=config, env=cli_env())
    assert second.returncode == 2
    assert f"being handled by another kvm-borg run (pid {first.pid})" in second.stderr
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_domain_on_a_stray_overlay_is_refused_naming_recover(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)])
    overlay = domain.dir / "vda.qcow2.kvm-borg-20260101T000000Z.qcow2"
    domain.dom.snapshotCreateXML(
        f"<domainsnapshot><disks><disk name='vda' snapshot='external'><source file='{overlay}'/></disk>"
        "</disks></domainsnapshot>", 0x10 | 0x80 | 0x4)  # DISK_ONLY | ATOMIC | NO_METADATA, by hand
    try:
        config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
        proc = run_cli("backup", domain.name, config=config, env=cli_env())
        assert proc.returncode == 2
        assert "runs on a kvm-borg overlay" in proc.stderr and "kvm-borg recover" in proc.stderr
        assert domain.live_sources()["vda"] == str(overlay)
    finally:
        subprocess.run(["virsh", "blockcommit", domain.name, "vda", "--active", "--pivot", "--wait"],
                       capture_output=True)
        overlay.unlink(missing_ok=True)


def test_overlay_deleted_by_hand_of_a_shut_off_domain_is_reported_and_the_disk_pointed_back(
        domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS)
    state = image_dir / "kb" / "state"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    _strand(config, domain, tmp_path)
    domain.destroy()
    for source in domain.inactive_sources().values():
        os.unlink(source)  # an admin "cleaning up" the overlays of a shut-off domain
    recover = run_cli("recover", "--json", config=config, env=cli_env())
    assert recover.returncode == 1, recover.stderr  # recovered, with a warning
    [outcome] = json.loads(recover.stdout)
    assert outcome["ok"] and any("is missing (deleted by hand?)" in w for w in outcome["warnings"])
    assert_back_on_own_images(domain, state)
    domain.start()  # boots from its own images again (raw stays raw, qcow2 stays qcow2)
    assert domain.live_sources() == {t: str(p) for t, p in domain.disks.items()}


# --- signals and merges: an interrupt stays an interrupt; the merge runs first -------------------------


def _start_backup(config, names, **env):
    """Start `kvm-borg backup NAMES...` with extra environment variables; return the Popen."""
    return start_cli("backup", *names, config=config, env=cli_env(**env))


def _wait_for_file(path, proc, what, timeout=120):
    """Return once the backup `proc` created `path` (it reached `what`); fail if it exits first."""
    wait_for(lambda: os.path.exists(path), f"the backup to reach {what}", timeout=timeout, proc=proc)


def _domains_in_events(events) -> set[str]:
    lines = events.read_text().splitlines() if events.exists() else []
    return {json.loads(line).get("domain") for line in lines} - {None}


@pytest.mark.parametrize("merge_fails", [False, True], ids=["merge-succeeds", "merge-fails"])
def test_sigterm_during_the_merge_of_domain_1_exits_130_and_never_starts_domain_2(
        domain_factory, image_dir, tmp_path, merge_fails):
    first = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)])
    second = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)])
    state = image_dir / "kb" / "state"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", commit_retries=2)
    pause, events = tmp_path / "at-release", tmp_path / "events.jsonl"
    failpoint = f"release:pause={pause}" + (",merge-attempt:error" if merge_fails else "")
    proc = _start_backup(config, [first.name, second.name], KVM_BORG_FAILPOINT=failpoint, KBTEST_EVENTS_FILE=events)
    _wait_for_file(pause, proc, "the merge of domain 1")
    proc.send_signal(signal.SIGTERM)  # arrives while the merge is shielded: remembered
    os.unlink(pause)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert second.name not in _domains_in_events(events)  # never started
    assert second.live_sources() == {t: str(p) for t, p in second.disks.items()}
    if merge_fails:
        assert f"kvm-borg recover '{first.name}'" in err and "overlays were merged back" not in err
        assert len(journal_entries(state)) == 1
        recover = run_cli("recover", config=config, env=cli_env())
        assert recover.returncode == 0, recover.stderr
    else:
        assert "overlays were merged back" in err
    assert_back_on_own_images(first, state)
    assert_back_on_own_images(second, state)


def test_a_merge_that_fails_on_every_retry_exits_2_naming_recover_and_the_run_goes_on(
        domain_factory, image_dir, tmp_path):
    first = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)])
    second = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)])
    state = image_dir / "kb" / "state"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", commit_retries=2)
    events = tmp_path / "events.jsonl"
    proc = _start_backup(config, [first.name, second.name, "--json"], KVM_BORG_FAILPOINT="merge-attempt:error",
                         KBTEST_EVENTS_FILE=events)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    results = {d["domain"]: d for d in json.loads(out)["domains"]}
    for dom in (first, second):  # both were attempted: one failing merge does not stop the run
        assert not results[dom.name]["ok"]
        assert f"run `kvm-borg recover '{dom.name}'`" in results[dom.name]["error"]
        assert f"kvm-borg recover '{dom.name}'" in err
    assert _domains_in_events(events) == {first.name, second.name}
    assert len(journal_entries(state)) == 2
    recover = run_cli("recover", config=config, env=cli_env())
    assert recover.returncode == 0, recover.stderr
    assert_back_on_own_images(first, state)
    assert_back_on_own_images(second, state)


def test_an_unexpected_exception_in_one_domain_is_one_line_for_it_and_the_run_goes_on(
        domain_factory, image_dir, tmp_path):
    first = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)])
    second = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)])
    state = image_dir / "kb" / "state"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = _start_backup(config, [first.name, second.name, "--json"], KVM_BORG_FAILPOINT="storing:bug")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    results = json.loads(out)["domains"]
    assert [d["domain"] for d in results] == [first.name, second.name]
    assert all("unexpected error: RuntimeError: failpoint storing: simulated bug" in d["error"] for d in results)
    assert_back_on_own_images(first, state)
    assert_back_on_own_images(second, state)


def test_a_full_state_dir_shared_with_the_overlays_never_skips_the_merge(domain_factory, image_dir, tmp_path):
    """ENOSPC in state_dir (journal stage writes) must not skip or delay the blockcommit."""
    with tmpfs(image_dir / "small-state", "8m", "mode=0755") as small:
        (small / "overlays").mkdir()
        domain = domain_factory.make(disks=TWO_DISKS)  # started after the mount: QEMU's namespace sees it
        config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", state_dir=str(small / "state"),
                              overlay_dir=str(small / "overlays"), overlay_min_free="1MiB")
        pause = tmp_path / "at-storing"
        proc = _start_backup(config, [domain.name, "--json"], KVM_BORG_FAILPOINT=f"storing:pause={pause}")
        _wait_for_file(pause, proc, "storing")
        with open(small / "filler", "wb") as handle:  # the file system runs full, as a busy overlay does
            try:
                while True:
                    handle.write(b"\0" * MiB)
                    handle.flush()
            except OSError:
                pass
        os.unlink(pause)
        out, err = proc.communicate(timeout=300)
        os.unlink(small / "filler")
        assert proc.returncode == 1, err  # stored and merged back, with the journal warning
        [result] = json.loads(out)["domains"]
        assert result["ok"] and any("could not record stage 'committing'" in w for w in result["warnings"])
        assert_back_on_own_images(domain, small / "state")
        assert overlay_files(small) == []


def test_recover_reports_a_corrupt_journal_entry_by_file_and_still_completes_the_others(
        domain_factory, image_dir, tmp_path):
    good = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)])
    bad = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)])
    state = image_dir / "kb" / "state"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    for n, dom in enumerate((good, bad)):
        proc = _start_paused_backup(config, dom, tmp_path / f"paused-{n}")
        proc.kill()
        proc.communicate(timeout=30)
    bad_entry = state / "journal" / f"{bad.dom.UUIDString()}.json"
    intact = bad_entry.read_bytes()
    bad_entry.write_bytes(intact[: len(intact) // 2])  # a torn write
    named = run_cli("recover", bad.name, config=config, env=cli_env())
    assert named.returncode == 2 and f"FAILED: journal entry {bad_entry} is unreadable" in named.stdout
    everything = run_cli("recover", "--all", config=config, env=cli_env())
    assert everything.returncode == 2, everything.stderr  # at the end, after completing the good entry
    assert f"{good.name}: recovered" in everything.stdout and str(bad_entry) in everything.stdout
    assert "Traceback" not in everything.stderr
    assert good.live_sources() == {t: str(p) for t, p in good.disks.items()}
    assert journal_entries(state) == [bad_entry]
    bad_entry.write_bytes(intact)  # the admin repairs it: recover completes it too
    assert run_cli("recover", config=config, env=cli_env()).returncode == 0
    assert_back_on_own_images(good, state)
    assert_back_on_own_images(bad, state)
