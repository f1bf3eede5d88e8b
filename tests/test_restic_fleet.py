"""Many hypervisors, one restic repository: two kvm-borg instances (own state dirs, own host names,
own domains) back up into the same repository at the same time; each sees and restores only its
own domain's archive, and an admin view (`hosts: ["*"]`) sees both."""

from __future__ import annotations

import json
import subprocess

from harness import KVM_BORG_BIN, DiskSpec, run_cli
from harness.cli import _merged_env
from support import assert_back_on_own_images, cli_env, write_config, write_passphrase
from test_restic_backend import assert_images_match_reference, extract_restic_archive, restic_backend, restic_snapshots

DISKS = [DiskSpec("vda", "qcow2", 48), DiskSpec("vdb", "raw", 32)]


def test_two_hypervisors_back_up_into_one_restic_repository_at_once(domain_factory, image_dir, tmp_path):
    shared_url = str(tmp_path / "shared-restic")
    passphrase = str(write_passphrase(tmp_path / "shared.pass"))
    hypervisors = {}
    for host in ("hv1", "hv2"):
        domain = domain_factory.make(disks=DISKS, name=f"fleet {host}")
        reference = image_dir / f"reference-{host}"
        reference.mkdir()
        repo = {"name": "shared", "type": "restic", "url": shared_url, "passphrase_file": passphrase}
        config = write_config(image_dir / host, [repo], hostname=host)  # the second `init` finds it there
        hypervisors[host] = (domain, reference, config, repo)

    runs = {
        host: subprocess.Popen(
            [str(KVM_BORG_BIN), "--config", str(config), "backup", domain.name, "--json"],
            env=_merged_env(cli_env(KBTEST_REFERENCE_DIR=reference)), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for host, (domain, reference, config, _repo) in hypervisors.items()
    }
    archives = {}
    for host, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        [store] = json.loads(out)["domains"][0]["stores"]
        assert store["ok"]
        archives[host] = store["archive"]

    snapshots = restic_snapshots(shared_url)
    assert sorted(s["hostname"] for s in snapshots) == ["hv1", "hv2"]

    for host, (domain, reference, config, repo) in hypervisors.items():
        # `list` on a hypervisor shows its own archives only ...
        listed = json.loads(run_cli("list", "--json", config=config, env=cli_env()).stdout)
        assert [(a["domain"], a["host"], a["name"]) for a in listed] == [(domain.name, host, archives[host])]
        # ... and restores its own domain from the shared repository.
        meta = extract_restic_archive(restic_backend(repo, hostname=host), archives[host], tmp_path / f"x-{host}")
        assert meta["host"] == host and meta["domain"]["name"] == domain.name
        assert_images_match_reference(meta, reference)
        assert_back_on_own_images(domain, image_dir / host / "state")

    # An admin's view of the whole fleet: `hosts: ["*"]`.
    admin = restic_backend({"name": "shared", "type": "restic", "url": shared_url, "passphrase_file": passphrase,
                            "hosts": ["*"]}, hostname="admin")
    assert sorted((a.host, a.domain) for a in admin.list_archives()) == [
        ("hv1", hypervisors["hv1"][0].name), ("hv2", hypervisors["hv2"][0].name)]
