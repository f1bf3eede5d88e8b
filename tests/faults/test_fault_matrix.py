"""The fault matrix: faults injected into real backups of a real, writing Linux guest.

After every fault: the domain is back on its own images (after `kvm-borg recover` where the
run could not finish), no overlay file or journal entry remains, the guest keeps writing, the
next backup succeeds, no record the guest reported is missing from its image, and `borg check`
passes. Each test adds its row to the report (tests/faults/conftest.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from guest import build
from harness import (
    BORG_BIN,
    borg_env,
    inactive_sources,
    live_sources,
    run_cli,
    start_borg,
    start_cli,
    tmpfs,
    wait_for,
)
from support import borg, cli_env, journal_entries, overlay_files, write_config, write_passphrase

pytestmark = pytest.mark.slow
MiB = 1 << 20


@dataclass
class Scenario:
    guest: build.Guest
    conn: object
    config: Path
    state: Path
    repo: Path
    tmp: Path
    extra_dirs: list[Path] = field(default_factory=list)
    max_seen: int = 0  # highest record sequence the guest reported before any restart

    @property
    def dom(self):
        return self.conn.lookupByName(self.guest.name)

    def note_console(self) -> None:
        self.max_seen = max(self.max_seen, build.serial_last_seq(self.guest.console_log) or 0)


def make_bulky_data_disk(path: Path, size_mib: int, random_mib: int) -> Path:
    """An ext4 data disk holding `random_mib` of incompressible data, so borg needs a while."""
    tree = path.with_name(path.name + ".tree")
    tree.mkdir()
    with open(tree / "bulk.bin", "wb") as handle:
        for _ in range(random_mib):
            handle.write(os.urandom(MiB))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path), f"{size_mib}M"], check=True)
    shutil.rmtree(tree)
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def scenario(guest_factory, image_dir, tmp_path, libvirt_conn):
    """A writing guest (qcow2 data disk) with the agent up, and a config with an initialised repository."""

    def make(fmt="qcow2", data_disk=None, repositories=None, init=True, **settings) -> Scenario:
        kwargs = {"data_disk": data_disk} if data_disk else {}
        guest = guest_factory(fmt=fmt, size_mib=64, **kwargs)
        repo = tmp_path / "repo"
        # The repository is initialised while the guest boots (TCG: seconds), not after.
        config = write_config(image_dir / "kb", repo_path=repo, repositories=repositories, init=init,
                              plugins=[], **settings)
        build.wait_for_agent(guest.dom, 90)
        build.wait_for_progress(guest.console_log, 5, 60)
        return Scenario(guest, libvirt_conn, config, image_dir / "kb" / "state", repo, tmp_path)

    return make


def start_backup(sc: Scenario, failpoint: str | None = None) -> subprocess.Popen:
    extra = {"KVM_BORG_FAILPOINT": failpoint} if failpoint else {}
    return start_cli("backup", sc.guest.name, "--json", config=sc.config, env=cli_env(**extra))


def pause_at(sc: Scenario, point: str) -> tuple[subprocess.Popen, Path]:
    """Start a backup that stops at failpoint `point`; return (process, pause file) once it is there."""
    pause = sc.tmp / f"pause-{point}"
    proc = start_backup(sc, f"{point}:pause={pause}")
    wait_for(pause.exists, f"failpoint {point}", proc=proc)
    return proc, pause


def finish(proc: subprocess.Popen, pause: Path | None = None, timeout: float = 300) -> tuple[int, str, str]:
    if pause is not None:
        pause.unlink(missing_ok=True)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def recover(sc: Scenario, *args: str) -> subprocess.CompletedProcess:
    proc = run_cli("recover", *args, config=sc.config, env=cli_env())
    assert proc.returncode in (0, 1), proc.stderr
    return proc


def on_overlay(sc: Scenario) -> bool:
    sources = live_sources(sc.dom) if sc.dom.isActive() else inactive_sources(sc.dom)
    return ".kvm-borg-" in sources["vda"]


def write_until_the_guest_pauses(sc: Scenario, proc: subprocess.Popen) -> None:
    """Given a scenario whose overlays sit on a 4 MiB file system and the backup holding them, let the
    guest write 12 MiB and return once QEMU has paused it on the write error (ENOSPC)."""
    build.agent_command(sc.dom, "guest-exec", {
        "path": "/bin/sh", "arg": ["-c", "dd if=/dev/urandom of=/data/fill bs=1M count=12 conv=fsync"]})
    wait_for(lambda: sc.dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR],
             "the guest to pause on ENOSPC", timeout=120, proc=proc)
    sc.note_console()


def settle_and_verify(sc: Scenario, row: dict) -> None:
    """The invariants every fault must leave, filling the report row as they are shown."""
    sc.note_console()
    dom, disk = sc.dom, str(sc.guest.data_disk)
    if dom.isActive():
        assert live_sources(dom)["vda"] == disk
    assert inactive_sources(dom)["vda"] == disk
    leftovers = overlay_files(sc.guest.data_disk.parent) + overlay_files(sc.state)
    leftovers += [p for d in sc.extra_dirs for p in overlay_files(d)]
    assert leftovers == [] and journal_entries(sc.state) == []
    row["recovered"] = "yes"
    if not dom.isActive():
        dom.create()
        build.wait_for_agent(dom, 90)
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
    # The guest keeps writing on its own images ...
    build.wait_for_progress(sc.guest.console_log, (build.serial_last_seq(sc.guest.console_log) or 0) + 5, 90)
    assert build.serial_errors(sc.guest.console_log) == []
    # ... the next backup succeeds ...
    nxt = run_cli("backup", sc.guest.name, "--json", config=sc.config, env=cli_env())
    assert nxt.returncode in (0, 1), nxt.stderr
    assert json.loads(nxt.stdout)["domains"][0]["ok"]
    # That was the repository's last write: `borg check` runs while the guest shuts down.
    repo_check = start_borg("check", sc.repo)
    try:
        # ... and no record the guest reported is missing from its image ...
        sc.note_console()
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        build.wait_for_shutoff(dom, 90)
        sc.note_console()
        check = build.check_records(build.read_records(sc.guest.data_disk))
        lost = max(0, sc.max_seen - (check.last_seq or 0))
        row["records_lost"] = lost
        assert check.gap_free, check.errors
        assert lost == 0, f"guest reported seq {sc.max_seen}, image ends at {check.last_seq}"
    except BaseException:
        repo_check.kill()
        repo_check.communicate()
        raise
    # ... and the repository checks clean.
    _, stderr = repo_check.communicate(timeout=600)
    row["repo_check"] = "ok" if repo_check.returncode == 0 else f"FAILED ({repo_check.returncode})"
    assert repo_check.returncode == 0, stderr


# --- SIGKILL of kvm-borg at each stage -------------------------------------------------------------


@pytest.mark.parametrize("point", ["journal-written", "snapshot-taken", "storing", "commit-ready", "pivoted"])
def test_sigkill_at_each_stage_is_completed_by_recover(point, scenario, report_row):
    report_row["fault"] = f"SIGKILL of backup at {point}"
    sc = scenario()
    rc, _, err = finish(start_backup(sc, f"{point}:kill"))
    assert rc == -signal.SIGKILL, err
    sc.note_console()
    assert len(journal_entries(sc.state)) == 1  # the journal knows what was in flight
    build.wait_for_progress(sc.guest.console_log, sc.max_seen + 5, 60)  # stranded or not, it writes on
    recover(sc)
    settle_and_verify(sc, report_row)


def borg_create_pid(parent_pid: int) -> int | None:
    """Return the pid of the real `borg create` whose parent is `parent_pid`, or None.

    The process must *be* borg (its argv runs the borg program: `borg ...` or `python .../borg ...`),
    not the util-linux `setpriv --pdeathsig ... -- borg create` wrapper before it execs borg."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            argv = [os.path.basename(a.decode()) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if int(stat[1]) != parent_pid or "create" not in argv or "setpriv" in argv[:1]:
            continue
        program = argv[1] if argv[0].startswith("python") and len(argv) > 1 else argv[0]
        if program == "borg" and argv.index("create") == argv.index(program) + 1:
            return int(pid)
    return None


def process_start(pid: int) -> str | None:
    """Return a process's start time (field 22 of /proc/PID/stat), None if it is gone or a zombie:
    with the pid, it names one process even if the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if stat[0] in ("Z", "X") else stat[19]


def test_sigkill_during_the_repository_write_is_completed_by_recover(scenario, image_dir, report_row):
    report_row["fault"] = "SIGKILL of backup during the repository write"
    disk = make_bulky_data_disk(image_dir / "bulky.raw", 512, 200)
    sc = scenario(fmt="raw", data_disk=disk)
    proc = start_backup(sc)
    wait_for(lambda: borg_create_pid(proc.pid), "borg create", proc=proc)
    borg_pid = borg_create_pid(proc.pid)
    started = process_start(borg_pid)
    assert started is not None
    time.sleep(0.5)
    proc.kill()
    proc.communicate()
    # That very borg process (not a fresh lookup by parent, which it loses once kvm-borg is gone) must end.
    wait_for(lambda: process_start(borg_pid) != started, "borg to die with kvm-borg", timeout=30)
    assert on_overlay(sc)
    recover(sc)
    settle_and_verify(sc, report_row)


def test_sigkill_during_backup_of_a_shut_off_domain_needs_nothing_recovered(scenario, report_row):
    report_row["fault"] = "SIGKILL of backup of a shut-off domain"
    sc = scenario()
    sc.note_console()
    sc.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    build.wait_for_shutoff(sc.dom, 90)
    sc.note_console()
    rc, _, err = finish(start_backup(sc, "storing:kill"))
    assert rc == -signal.SIGKILL, err
    assert journal_entries(sc.state) == []  # an offline backup changes nothing to undo
    assert recover(sc).stdout.strip() == "nothing to recover"
    settle_and_verify(sc, report_row)


# --- the domain changes state mid-backup ---------------------------------------------------------


def test_domain_destroyed_mid_backup_is_merged_offline_by_the_same_run(scenario, report_row):
    report_row["fault"] = "domain destroyed (power cut) mid-backup"
    sc = scenario()
    proc, pause = pause_at(sc, "storing")
    sc.note_console()
    sc.dom.destroy()
    rc, out, err = finish(proc, pause)
    assert rc == 0, err
    settle_and_verify(sc, report_row)


def test_domain_paused_mid_backup_is_merged_and_stays_paused(scenario, report_row):
    report_row["fault"] = "domain paused mid-backup"
    sc = scenario()
    proc, pause = pause_at(sc, "storing")
    sc.dom.suspend()
    rc, _, err = finish(proc, pause)
    assert rc == 0, err
    assert sc.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED  # kvm-borg never resumes a user's pause
    settle_and_verify(sc, report_row)


def test_domain_shut_down_mid_backup_is_merged_offline(scenario, report_row):
    report_row["fault"] = "domain shut down mid-backup"
    sc = scenario()
    proc, pause = pause_at(sc, "storing")
    sc.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    build.wait_for_shutoff(sc.dom, 90)
    sc.note_console()
    rc, out, err = finish(proc, pause)
    assert rc == 0, err
    assert "qemu-img commit" in err
    settle_and_verify(sc, report_row)


def test_overlay_file_system_full_pauses_the_guest_which_is_resumed_after_the_commit(scenario, image_dir,
                                                                                    report_row):
    report_row["fault"] = "overlay file system full"
    with tmpfs(image_dir / "small-overlays", "4m", "mode=0755") as overlay_dir:
        sc = scenario(overlay_dir=str(overlay_dir), overlay_min_free="1MiB")
        sc.extra_dirs.append(overlay_dir)
        proc, pause = pause_at(sc, "storing")
        write_until_the_guest_pauses(sc, proc)
        rc, out, err = finish(proc, pause)
        assert rc == 1, err  # success, with the warning that the guest was resumed
        assert "paused by a write error" in out
        assert sc.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        settle_and_verify(sc, report_row)


# --- the repository fails -------------------------------------------------------------------------


def test_repository_hangs_store_timeout_merges_back(scenario, tmp_path, report_row):
    """A port that accepts and never answers: after store_timeout borg (and its ssh) are stopped and the
    writing guest is merged back by the run itself, nothing left for recover."""
    from silent_server import SilentServer

    report_row["fault"] = "repository hangs → store_timeout merges back"
    server = SilentServer()
    try:
        sc = scenario(init=False, store_timeout="5s", repositories=[{
            "name": "silent", "type": "borg", "path": f"ssh://nobody@127.0.0.1:{server.port}/srv/repo",
            "passphrase_file": str(write_passphrase(tmp_path / "pass")),
            "ssh_command": "ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"}])
        proc = start_backup(sc)
        wait_for(lambda: server.accepted, "borg's ssh to connect to the silent server", proc=proc)
        assert on_overlay(sc)  # hanging, with the guest on its overlay
        rc, out, err = finish(proc, timeout=300)  # bounded: the run must end by itself
        sc.note_console()
    finally:
        server.close()
    assert rc == 2, err
    store = json.loads(out)["domains"][0]["stores"][0]
    assert not store["ok"] and store["error"].startswith("store_timeout 5s passed"), store
    assert "store_timeout 5s passed" in err
    assert journal_entries(sc.state) == [] and not on_overlay(sc)  # merged back by the run itself
    write_config(sc.config.parent, repo_path=sc.repo, plugins=[])  # the next backup goes to a reachable one
    settle_and_verify(sc, report_row)


def test_repository_lock_held_by_another_process(scenario, tmp_path, report_row):
    report_row["fault"] = "repository lock held by another process"
    sc = scenario(repositories=[{"name": "main", "type": "borg", "path": str(tmp_path / "repo"), "lock_wait": 2,
                                 "passphrase_file": str(write_passphrase(tmp_path / "pass"))}])
    holder = subprocess.Popen(["/bin/sh", "-c", f"exec {BORG_BIN} with-lock {sc.repo} sleep 60"], env=borg_env())
    try:
        wait_for(lambda: any((sc.repo / name).exists() for name in ("lock.exclusive", "lock.roster")),
                 "the lock to be taken", timeout=30)
        rc, out, err = finish(start_backup(sc))
        assert rc == 2
        assert "lock" in json.loads(out)["domains"][0]["stores"][0]["error"].lower()
    finally:
        holder.kill()
        holder.wait()
    settle_and_verify(sc, report_row)


def test_repository_unreachable(scenario, tmp_path, report_row):
    report_row["fault"] = "repository unreachable"
    sc = scenario(init=False, repositories=[{
        "name": "gone", "type": "borg", "path": "ssh://nobody@127.0.0.1:1/nowhere",
        "passphrase_file": str(write_passphrase(tmp_path / "pass")),
        "ssh_command": "ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no"}])
    rc, out, err = finish(start_backup(sc))
    assert rc == 2 and not json.loads(out)["domains"][0]["ok"]
    # The next backup goes to a reachable repository.
    write_config(sc.config.parent, repo_path=sc.repo, plugins=[])
    settle_and_verify(sc, report_row)


def test_wrong_passphrase(scenario, report_row):
    report_row["fault"] = "wrong passphrase"
    sc = scenario()
    good = (sc.config.parent / "passphrase").read_text()
    write_passphrase(sc.config.parent / "passphrase", "wrong")
    rc, out, err = finish(start_backup(sc))
    assert rc == 2 and "passphrase" in json.loads(out)["domains"][0]["stores"][0]["error"].lower()
    write_passphrase(sc.config.parent / "passphrase", good.strip())
    settle_and_verify(sc, report_row)


def test_repository_disk_full(scenario, image_dir, report_row):
    report_row["fault"] = "repository disk full"
    with tmpfs(image_dir / "small-repo-fs", "24m") as small:
        disk = make_bulky_data_disk(image_dir / "bulky.raw", 256, 64)
        sc = scenario(fmt="raw", data_disk=disk, repositories=None)
        full_repo = small / "repo"
        config = write_config(sc.config.parent, repo_path=full_repo, plugins=[])
        rc, out, err = finish(start_backup(sc))
        assert rc == 2
        error = json.loads(out)["domains"][0]["stores"][0]["error"]
        assert "space" in error.lower(), error
        result = borg("check", full_repo, check=False)
        assert result.returncode == 0, result.stderr  # a full disk does not damage the repository
        write_config(config.parent, repo_path=sc.repo, plugins=[])
        settle_and_verify(sc, report_row)


# --- libvirtd and concurrency --------------------------------------------------------------------


def restart_libvirtd() -> None:
    """Stop libvirtd and start it again, as a package upgrade or an admin would."""
    pid = int(Path("/run/libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "libvirtd to stop", timeout=60)
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_for(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode
             == 0, "libvirtd to answer", timeout=60)


def test_libvirtd_restarted_mid_backup(scenario, report_row):
    report_row["fault"] = "libvirtd restarted mid-backup"
    sc = scenario()
    proc, pause = pause_at(sc, "storing")
    restart_libvirtd()
    rc, out, err = finish(proc, pause)
    assert rc == 1, err  # success, with the warning that the connection was re-established
    assert "reconnected" in out
    settle_and_verify(sc, report_row)


def test_recover_all_after_libvirtd_restart_while_on_an_overlay(scenario, report_row):
    """What the recover-at-boot unit runs (contrib/): `kvm-borg recover --all` after libvirtd starts."""
    report_row["fault"] = "libvirtd restarted while on an overlay (boot-time recover --all)"
    sc = scenario()
    rc, _, _ = finish(start_backup(sc, "snapshot-taken:kill"))
    assert rc == -signal.SIGKILL and on_overlay(sc)
    restart_libvirtd()
    assert on_overlay(sc)
    recover(sc, "--all")
    settle_and_verify(sc, report_row)


def test_two_backups_of_the_same_domain_at_once(scenario, report_row):
    report_row["fault"] = "two backups of the same domain at once"
    sc = scenario()
    first, pause = pause_at(sc, "storing")
    second = run_cli("backup", sc.guest.name, config=sc.config, env=cli_env())
    assert second.returncode == 2 and "being handled by another kvm-borg run" in second.stderr
    rc, _, err = finish(first, pause)
    assert rc == 0, err
    report_row["runs"] = 2
    settle_and_verify(sc, report_row)


def test_overlay_deleted_by_hand_while_the_domain_runs_on_it(scenario, report_row):
    """QEMU keeps the deleted overlay open: the merge still takes every write from it."""
    report_row["fault"] = "overlay deleted by hand (running domain)"
    sc = scenario()
    rc, _, _ = finish(start_backup(sc, "snapshot-taken:kill"))
    assert rc == -signal.SIGKILL
    overlay = Path(live_sources(sc.dom)["vda"])
    overlay.unlink()
    build.wait_for_progress(sc.guest.console_log, (build.serial_last_seq(sc.guest.console_log) or 0) + 10, 60)
    recover(sc)
    settle_and_verify(sc, report_row)


# --- signals and merges: an interrupt stays an interrupt; the merge runs first -------------------------


def test_sigterm_while_the_guest_writes_exits_130_merged_back(scenario, report_row):
    report_row["fault"] = "SIGTERM of backup while the guest writes"
    sc = scenario()
    proc, pause = pause_at(sc, "storing")
    sc.note_console()
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc, pause)
    assert rc == 130, err
    assert "overlays were merged back" in err
    assert not on_overlay(sc) and journal_entries(sc.state) == []  # merged by the run itself
    settle_and_verify(sc, report_row)


def test_merge_failing_on_every_retry_exits_2_naming_recover_which_completes_it(scenario, report_row):
    report_row["fault"] = "merge fails on every retry (failpoint merge-attempt)"
    sc = scenario(commit_retries=2)
    rc, out, err = finish(start_backup(sc, "merge-attempt:error"))
    assert rc == 2, err
    assert f"run `kvm-borg recover '{sc.guest.name}'`" in err
    assert json.loads(out)["domains"][0]["ok"] is False
    assert on_overlay(sc) and len(journal_entries(sc.state)) == 1  # the journal keeps it for recover
    build.wait_for_progress(sc.guest.console_log, (build.serial_last_seq(sc.guest.console_log) or 0) + 5, 60)
    recover(sc, sc.guest.name)
    settle_and_verify(sc, report_row)


def test_sigterm_during_a_failing_merge_exits_130_and_recover_completes_it(scenario, report_row):
    report_row["fault"] = "SIGTERM during a failing merge"
    sc = scenario(commit_retries=2)
    pause = sc.tmp / "pause-release"
    proc = start_backup(sc, f"release:pause={pause},merge-attempt:error")
    wait_for(pause.exists, "the merge to start", proc=proc)
    proc.send_signal(signal.SIGTERM)  # remembered: the merge is shielded, then fails
    rc, _, err = finish(proc, pause)
    assert rc == 130, err  # the interrupt wins over the merge's failure (not 2)
    assert f"kvm-borg recover '{sc.guest.name}'" in err and "overlays were merged back" not in err
    assert on_overlay(sc) and len(journal_entries(sc.state)) == 1
    recover(sc)
    settle_and_verify(sc, report_row)


def fill_to_the_last_page(path: Path) -> None:
    """Write zeros to `path` (on a tmpfs) until the file system has no page left (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def test_full_file_system_shared_by_state_dir_and_overlays_still_merges_and_resumes(scenario, image_dir,
                                                                                    report_row):
    report_row["fault"] = "state_dir and overlays on one full file system"
    with tmpfs(image_dir / "small-state", "4m", "mode=0755") as small:
        (small / "overlays").mkdir()
        sc = scenario(state_dir=str(small / "state"), overlay_dir=str(small / "overlays"), overlay_min_free="1MiB")
        sc.state = small / "state"
        sc.extra_dirs.append(small)
        proc, pause = pause_at(sc, "storing")
        write_until_the_guest_pauses(sc, proc)
        fill_to_the_last_page(small / "filler")  # QEMU's failed cluster may have left a few pages free
        rc, out, err = finish(proc, pause)
        (small / "filler").unlink()  # room again for the next backup's overlay
        assert rc == 1, err  # stored and merged back; the warnings say what could not be written
        [result] = json.loads(out)["domains"]
        assert any("could not record stage 'committing'" in w for w in result["warnings"]), result
        assert any("paused by a write error" in w for w in result["warnings"]), result
        assert sc.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # not left paused
        assert not on_overlay(sc)
        settle_and_verify(sc, report_row)


def test_corrupt_journal_entry_beside_a_good_one_is_reported_and_the_good_one_recovered(scenario, report_row):
    report_row["fault"] = "corrupt journal entry beside a good one"
    sc = scenario()
    rc, _, _ = finish(start_backup(sc, "snapshot-taken:kill"))
    assert rc == -signal.SIGKILL and on_overlay(sc)
    corrupt = sc.state / "journal" / "00000000-0000-0000-0000-000000000000.json"
    corrupt.write_text('{"domain": "gone", "disks": [')  # a torn write, a disk error
    proc = run_cli("recover", "--all", config=sc.config, env=cli_env())
    assert proc.returncode == 2, proc.stderr  # reported at the end ...
    assert str(corrupt) in proc.stdout and "Traceback" not in proc.stderr
    assert f"{sc.guest.name}: recovered" in proc.stdout  # ... after completing the good entry
    assert not on_overlay(sc)
    assert journal_entries(sc.state) == [corrupt]  # left for the admin to look at
    corrupt.unlink()
    settle_and_verify(sc, report_row)
