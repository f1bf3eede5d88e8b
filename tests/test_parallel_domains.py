"""`backup --jobs N` against the real stack: several domains at once into a borg and a restic repository
(real libvirtd + QEMU, real borg, real restic), and a SIGTERM while two domains are storing.

Promises: every archive is right and every domain is back on its own images, the summary lists the
domains in the sequential run's order; an interrupt stops the running stores, merges every frozen
domain back (no journal entry), exits 130, and the next run works."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import KVM_BORG_BIN, DiskSpec, DomainFactory, make_dir, run_cli
from harness.cli import _merged_env
from silent_server import SilentServer
from support import (archived_meta, assert_back_on_own_images, borg_archives, cli_env, extract_archive,
                     journal_entries, write_config, write_passphrase)
from test_restic_backend import restic_repository, restic_snapshots
from test_store_timeout import SSH_COMMAND, assert_gone, ssh_processes_to, wait_for

MiB = 1 << 20
DISK = [DiskSpec("vda", "raw", 8)]


def borg_repository(directory: Path, name: str = "borg") -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    return {"name": name, "type": "borg", "path": str(directory / f"{name}-repo"),
            "passphrase_file": str(write_passphrase(directory / f"{name}.pass"))}


@pytest.fixture(scope="module")
def world(libvirt_conn, run_dir, run_id, tmp_path_factory):
    """Three small running domains, each with its own pattern (0xB1, 0xB2, 0xB3) at 1 MiB of vda, and a
    config with a borg and a restic repository (initialised) that takes them with --all; shared by the
    tests of this module."""
    factory = DomainFactory(libvirt_conn, make_dir(run_dir / "parallel-domains"), run_id, label="jobs")
    domains = []
    for n in range(3):
        domain = factory.make(disks=DISK, name=f"jobs {n}")
        domain.hmp_write("vda", 0xB1 + n, MiB, MiB)
        domains.append(domain)
    repos = tmp_path_factory.mktemp("jobs-repos")
    borg, restic = borg_repository(repos), restic_repository(repos)
    kb = make_dir(run_dir / "parallel-domains" / "kb")
    config = write_config(kb, [borg, restic], domains={"include": [d.name for d in domains]})
    yield SimpleNamespace(domains=domains, names=[d.name for d in domains], borg=borg, restic=restic,
                          config=config, state=kb / "state", dir=run_dir / "parallel-domains")
    errors = factory.cleanup()
    assert not errors, errors


def test_three_domains_with_jobs_2_into_borg_and_restic_at_once(world, tmp_path):
    domains, names, borg, restic = world.domains, world.names, world.borg, world.restic
    proc = run_cli("backup", "--all", "--jobs", "2", "--json", config=world.config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["domains"]
    assert [r["domain"] for r in results] == sorted(names)  # the order of the sequential run (--all: by name)
    for result in results:
        assert result["ok"] and [s["repository"] for s in result["stores"]] == ["borg", "restic"], result
    archives = {s["archive"] for r in results for s in r["stores"]}
    assert len(archives) == 3 and set(borg_archives(Path(borg["path"]))) == archives
    tagged = {t for snap in restic_snapshots(restic["url"]) for t in snap["tags"] if t.startswith("domain=")}
    assert tagged == {f"domain={name}" for name in names}
    # One disk, from borg, holds its own domain's pattern (not another's: the archives did not mix).
    second = domains[1]
    [archive] = [s["archive"] for r in results if r["domain"] == second.name for s in r["stores"]
                 if s["repository"] == "borg"]
    extracted = extract_archive(Path(borg["path"]), archive, tmp_path / "x")
    [disk] = archived_meta(extracted)["disks"]
    image = extracted / disk["archive_path"]
    assert second.has_pattern("vda", 0xB2, MiB, MiB, path=image, fmt="raw")
    assert not second.has_pattern("vda", 0xB1, MiB, MiB, path=image, fmt="raw")
    for domain in domains:
        assert_back_on_own_images(domain, world.state)


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def test_sigterm_during_a_parallel_run_merges_every_domain_back_and_the_next_run_works(
        world, tmp_path, silent_server):
    domains, names = world.domains, world.names
    state = world.dir / "kb-sigterm" / "state"
    silent = {"name": "silent", "type": "restic", "url": f"sftp://nobody@127.0.0.1:{silent_server.port}//srv/r",
              "passphrase_file": str(write_passphrase(tmp_path / "silent.pass")), "ssh_command": SSH_COMMAND}
    good = {**world.borg, "name": "good"}  # the first test's borg repository, already initialised
    config = write_config(make_dir(world.dir / "kb-sigterm"), [good, silent], init=False)
    proc = subprocess.Popen([str(KVM_BORG_BIN), "--config", str(config), "backup", *names, "--jobs", "2", "--json"],
                            env=_merged_env(cli_env()), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:  # two domains storing at once: each has a restic (ssh) waiting on the silent server
        ssh = wait_for(lambda: (found := ssh_processes_to(silent_server.port)) and len(found) >= 2 and found,
                       "two domains storing", proc)
        frozen = [d for d in domains if any(".kvm-borg-" in s for s in d.live_sources().values())]
        assert len(frozen) == 2, [d.live_sources() for d in domains]  # the third waits for a free slot
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert_gone(ssh, "the ssh children of the stopped restic stores")
    for domain in domains:
        assert_back_on_own_images(domain, state)
    assert journal_entries(state) == []
    again = run_cli("backup", *names[:2], "--jobs", "2", "--repo", "good", "--json", config=config, env=cli_env())
    assert again.returncode == 0, again.stderr
    assert [r["domain"] for r in json.loads(again.stdout)["domains"]] == names[:2]
    for domain in domains:
        assert_back_on_own_images(domain, state)
