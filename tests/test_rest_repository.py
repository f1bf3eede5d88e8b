"""A shared REST repository for restic fleets, against a real server: `rclone serve restic --append-only`
(Debian's rclone) on loopback. Backup, list, restore and verify work through a `rest:` URL; a prune sent
by a hypervisor is refused by the server, and kvm-borg says so in one line, at once (restic 0.14 alone
retries for ~45 s), with nothing lost and no lock left; the prune run on the server, against the
directory that holds the repository, does the job (docs/repositories.md)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from harness import RESTIC_BIN, DiskSpec, qemu_img_compare, restic_env, run_cli
from rclone_server import RcloneRestServer
from support import assert_back_on_own_images, cli_env, write_config, write_passphrase
from test_prune_restic import HOST, seed, snapshot_archives

from kvm_borg.restore_plan import safe_file_name


@pytest.fixture(scope="module")
def rest_server(tmp_path_factory):
    """One append-only rclone REST server for the module's repositories (one URL path each)."""
    server = RcloneRestServer(tmp_path_factory.mktemp("rclone") / "srv").start()
    yield server
    server.stop()


def rest_repository(server: RcloneRestServer, name: str, directory) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    return {"name": "fleet", "type": "restic", "url": server.url(name),
            "passphrase_file": str(write_passphrase(directory / f"{name}.pass"))}


def restic_locks(url: str) -> list[str]:
    proc = subprocess.run([str(RESTIC_BIN), "list", "locks", "--no-lock"], capture_output=True, text=True,
                          env=restic_env(extra={"RESTIC_REPOSITORY": url}), check=True, stdin=subprocess.DEVNULL)
    return proc.stdout.split()


def test_backup_list_restore_and_verify_through_an_append_only_rest_server(
        rest_server, domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16), DiskSpec("vdb", "raw", 8)], name="rest")
    reference = image_dir / "reference"
    reference.mkdir()
    repo = rest_repository(rest_server, "roundtrip", tmp_path)
    config = write_config(image_dir / "kb", [repo])  # `kvm-borg init` creates it through the server
    assert (rest_server.directory("roundtrip") / "config").is_file()

    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env(KBTEST_REFERENCE_DIR=reference))
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    [store] = result["stores"]
    assert result["ok"] and store["ok"] and store["repository"] == "fleet", result
    assert rest_server.password not in proc.stdout + proc.stderr  # the URL's credentials stay out of the output
    assert_back_on_own_images(domain, image_dir / "kb" / "state")

    listed = json.loads(run_cli("list", "--json", config=config, env=cli_env(), check=True).stdout)
    assert [(a["domain"], a["name"]) for a in listed] == [(domain.name, store["archive"])]

    restored = tmp_path / "restored"
    proc = run_cli("restore", domain.name, "--repo", "fleet", "--target-dir", restored, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):
        image = restored / f"{safe_file_name(domain.name)}-{target}.{fmt}"
        assert qemu_img_compare(image, reference / f"{target}.raw", fmt, "raw"), target

    proc = run_cli("verify", domain.name, "--repo", "fleet", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["archive"] == store["archive"], report
    assert report["disks"]["vda"]["check"] == "no errors", report


def test_prune_through_the_server_is_refused_in_one_line_and_the_server_side_prune_works(rest_server, tmp_path):
    repo = rest_repository(rest_server, "prune", tmp_path)
    config = write_config(tmp_path / "kb", [repo], plugins=(), hostname=HOST, retention={"keep_last": 1})
    work = tmp_path / "work"
    work.mkdir()
    names = [seed(repo["url"], work, "web", when) for when in ("2024-03-09T08:00:00", "2024-03-10T08:00:00")]
    before = snapshot_archives(repo["url"])
    assert before == sorted((name, "main") for name in names)

    started = time.monotonic()
    proc = run_cli("prune", config=config, env=cli_env())
    seconds = time.monotonic() - started
    print(f"the refused prune took {seconds:.1f} s")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr
    assert "restic forget stopped: the server refused to delete (snapshot: 403 Forbidden): the repository is " \
           "append-only; forget and prune on the server" in errors[0], errors
    assert seconds < 20, seconds  # stopped at the first refusal, not after restic's ~45 s of retries
    assert snapshot_archives(repo["url"]) == before  # nothing lost ...
    assert restic_locks(repo["url"]) == []  # ... and no lock left behind (restic stopped with SIGINT)

    # On the server: the same prune, against the directory that holds the repository, every host's archives.
    server_side = {"name": "fleet", "type": "restic", "url": str(rest_server.directory("prune")),
                   "passphrase_file": repo["passphrase_file"], "hosts": ["*"]}
    server_config = write_config(tmp_path / "server", [server_side], plugins=(), init=False,
                                 retention={"keep_last": 1})
    proc = run_cli("prune", "--json", config=server_config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    [outcome] = json.loads(proc.stdout)
    assert outcome["compacted"] and outcome["results"][0]["pruned"] == [names[0]], outcome
    assert snapshot_archives(repo["url"]) == [(names[1], "main")]  # seen through the server too
