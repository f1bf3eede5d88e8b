"""The real borgmatic (2.x) with contrib/borgmatic/kvm-borg.yaml: `borgmatic create` backs up a running
domain through `kvm-borg freeze` / `thaw`, the domain is back on its images afterwards (also when the
borg step fails), and `kvm-borg restore` restores the domain from the archive borgmatic made."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from harness import BORG_BIN, VENV_BIN, DiskSpec, qemu_img_compare, run_cli, tmpfs
from kbtest_plugins.probe import AFTER_SNAPSHOT_LENGTH, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_PATTERN
from support import assert_back_on_own_images, borg_archives, cli_env, extract_archive, write_config

from kvm_borg.pipeline.exposure import mount_points

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "borgmatic" / "kvm-borg.yaml"
BORGMATIC = VENV_BIN / "borgmatic"
MiB = 1 << 20
CONTRIB_EXPOSE_DIR = "/var/lib/kvm-borg/expose"


def borgmatic_config(directory: Path, repo: Path, expose: Path, passphrase: Path) -> Path:
    """The contrib config with this test's repository, exposure directory and passphrase."""
    text = CONTRIB.read_text().replace(CONTRIB_EXPOSE_DIR, str(expose))
    data = yaml.safe_load(text)
    assert data["source_directories"] == [str(expose)]
    data["repositories"] = [{"path": str(repo), "label": "test"}]
    data["encryption_passcommand"] = f"cat {passphrase}"
    data["local_path"] = str(BORG_BIN)
    path = directory / "borgmatic.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def borgmatic(*args, config: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BORGMATIC), "-c", str(config), *args, "--verbosity", "1"], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=600)
    print(f"$ borgmatic {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_nothing_exposed(expose: Path, state_dir: Path) -> None:
    assert not [p for p in mount_points() if p.startswith(str(expose) + "/")]
    assert not expose.exists() or list(expose.iterdir()) == []
    assert not (state_dir / "exposures").exists() or list((state_dir / "exposures").iterdir()) == []


def test_borgmatic_backs_up_a_running_domain_and_kvm_borg_restores_it(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 32), DiskSpec("vdb", "raw", 16)], name="borgmatic")
    domain.hmp_write("vda", 0xA5, 4 * MiB, MiB)
    second = domain_factory.make(disks=[DiskSpec("vdc", "raw", 8)], name="borgmatic second")
    repo = tmp_path / "repo"
    kb = image_dir / "kb"
    config = write_config(kb, repo_path=repo, domains={"include": [domain.name, second.name]})  # init creates repo
    expose = image_dir / "expose"
    reference = image_dir / "reference"
    reference.mkdir()
    env = {**os.environ, **cli_env(KVM_BORG_CONFIG=config, KBTEST_REFERENCE_DIR=reference,
                                   KBTEST_WRITE_AFTER_SNAPSHOT=1),
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "BORG_BASE_DIR": str(tmp_path / "borg-base")}
    bm_config = borgmatic_config(tmp_path, repo, expose, kb / "passphrase")

    proc = borgmatic("create", config=bm_config, env=env)
    assert proc.returncode == 0
    assert_back_on_own_images(domain, kb / "state")
    assert_nothing_exposed(expose, kb / "state")
    # The write made right after the snapshot landed in the domain's own image.
    for target in ("vda", "vdb"):
        assert domain.hmp_read_check(target, AFTER_SNAPSHOT_PATTERN, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_LENGTH)

    [archive] = borg_archives(repo)
    extracted = extract_archive(repo, archive, tmp_path / "x")
    domain_dir = extracted / str(expose / domain.name).lstrip("/")
    meta = json.loads((domain_dir / "meta.json").read_text())
    assert meta["domain"]["name"] == domain.name and meta["consistency"] == "crash-consistent"
    for disk in meta["disks"]:
        image = extracted / disk["archive_path"]
        assert image == domain_dir / "disks" / f"{disk['target']}.{disk['format']}"
        # Exactly the guest view at the snapshot instant: not the write made after it.
        assert qemu_img_compare(image, reference / f"{disk['target']}.raw", disk["format"], "raw")
        assert not domain.has_pattern(disk["target"], AFTER_SNAPSHOT_PATTERN, AFTER_SNAPSHOT_OFFSET,
                                      AFTER_SNAPSHOT_LENGTH, path=image, fmt=disk["format"])
    assert domain.has_pattern("vda", 0xA5, 4 * MiB, MiB, path=domain_dir / "disks" / "vda.qcow2", fmt="qcow2")
    assert (domain_dir / "domain.xml").read_text().startswith("<domain")

    # kvm-borg restores a copy of the domain from the archive borgmatic made.
    copy = domain_factory.domain_name("borgmatic copy")
    restored = run_cli("restore", domain.name, "--archive", archive, "--name", copy, "--target-dir",
                       image_dir / "restored", "--json", config=config, env=cli_env())
    assert restored.returncode == 0, restored.stderr
    result = json.loads(restored.stdout)
    assert set(result["disks"]) == {"vda", "vdb"}
    for target, path in result["disks"].items():
        fmt = domain.formats[target]
        assert qemu_img_compare(path, reference / f"{target}.raw", fmt, "raw")
    # The same archive holds the second domain too (freeze --all): restore picks it by name.
    second_copy = domain_factory.domain_name("borgmatic second copy")
    restored = run_cli("restore", second.name, "--archive", archive, "--name", second_copy, "--target-dir",
                       image_dir / "restored-second", "--json", config=config, env=cli_env())
    assert restored.returncode == 0, restored.stderr
    assert second.verify_fill("vdc", json.loads(restored.stdout)["disks"]["vdc"], "raw")
    assert_back_on_own_images(second, kb / "state")

    # A second run: the exposed paths are the same, borg's files cache sees the same names.
    again = borgmatic("create", config=bm_config, env={**env, "KBTEST_WRITE_AFTER_SNAPSHOT": ""})
    assert again.returncode == 0
    assert len(borg_archives(repo)) == 2
    assert_back_on_own_images(domain, kb / "state")


def test_domain_is_back_on_its_images_when_the_borg_step_fails(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], name="borgmatic fails")
    kb = image_dir / "kb"
    config = write_config(kb, repo_path=tmp_path / "kvm-borg-repo", domains={"include": [domain.name]})
    expose = image_dir / "expose"
    env = {**os.environ, **cli_env(KVM_BORG_CONFIG=config), "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "BORG_BASE_DIR": str(tmp_path / "borg-base")}
    missing_repo = tmp_path / "no-such-repo"  # never created: borg create fails
    bm_config = borgmatic_config(tmp_path, missing_repo, expose, kb / "passphrase")
    proc = borgmatic("create", config=bm_config, env=env)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "Running after create configuration command hook" in output and ": thawed" in output
    assert_back_on_own_images(domain, kb / "state")
    assert_nothing_exposed(expose, kb / "state")
    assert domain.is_active()
    # thaw again is a no-op
    again = run_cli("thaw", "--expose", expose, config=config, env=cli_env())
    assert again.returncode == 0 and "nothing to thaw" in again.stdout


def test_freeze_leftovers_are_cleaned_by_recover(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)], name="freeze recover")
    kb = image_dir / "kb"
    config = write_config(kb, repo_path=tmp_path / "repo")
    expose = image_dir / "expose"
    frozen = run_cli("freeze", domain.name, "--expose", expose, "--json", config=config, env=cli_env())
    assert frozen.returncode == 0, frozen.stderr
    exposed_image = expose / domain.name / "disks" / "vda.raw"
    assert str(exposed_image) in mount_points()
    with open(exposed_image, "rb") as handle:
        assert len(handle.read(MiB)) == MiB
    assert subprocess.run(["sh", "-c", f"echo x >> '{exposed_image}'"], capture_output=True).returncode != 0  # read-only
    # A backup of a frozen domain is refused; a second freeze too.
    assert run_cli("backup", domain.name, config=config, env=cli_env()).returncode == 2
    assert run_cli("freeze", domain.name, "--expose", expose, config=config, env=cli_env()).returncode == 2
    # `kvm-borg recover` (e.g. after a crash of the borgmatic run) removes the exposure and merges back.
    recovered = run_cli("recover", "--json", config=config, env=cli_env())
    assert recovered.returncode == 0, recovered.stderr
    assert any("unmounted" in action for action in json.loads(recovered.stdout)[0]["actions"])
    assert_back_on_own_images(domain, kb / "state")
    assert_nothing_exposed(expose, kb / "state")


def test_a_failed_freeze_leaves_nothing_and_thaw_after_it_is_safe(domain_factory, image_dir, tmp_path):
    good = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], name="freeze good")
    bad = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8)], name="freeze bad")
    bad.dom.checkpointCreateXML("<domaincheckpoint><name>cp1</name></domaincheckpoint>", 0)
    kb = image_dir / "kb"
    config = write_config(kb, repo_path=tmp_path / "repo")
    expose = image_dir / "expose"
    try:
        proc = run_cli("freeze", good.name, bad.name, "--expose", expose, "--json", config=config, env=cli_env())
        assert proc.returncode == 2
        outcomes = {o["domain"]: o for o in json.loads(proc.stdout)}
        assert outcomes[good.name]["ok"] and not outcomes[bad.name]["ok"]
        assert not (expose / bad.name).exists()
        thawed = run_cli("thaw", "--expose", expose, "--json", config=config, env=cli_env())
        assert thawed.returncode == 0, thawed.stderr
        assert [o["domain"] for o in json.loads(thawed.stdout)] == [good.name]
        assert_back_on_own_images(good, kb / "state")
        assert_nothing_exposed(expose, kb / "state")
        assert run_cli("thaw", config=config, env=cli_env()).stdout.strip() == "nothing to thaw"
    finally:
        for checkpoint in bad.dom.listAllCheckpoints(0):
            checkpoint.delete(0)


def test_thaw_removes_only_what_freeze_created_never_a_foreign_directory_or_a_mount(domain_factory, image_dir,
                                                                                    tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], name="freeze marker")
    kb = image_dir / "kb"
    config = write_config(kb, repo_path=tmp_path / "repo")
    expose = image_dir / "expose"
    expose.mkdir()
    # What an admin keeps beside the exposures: a directory that looks like one, and a mounted file system.
    foreign = expose / "old-vm"
    (foreign / "disks").mkdir(parents=True)
    (foreign / "meta.json").write_text("{}")
    with tmpfs(expose / "scratch", "1m") as mounted:
        (mounted / "meta.json").write_text("{}")
        (mounted / "disks").mkdir()
        frozen = run_cli("freeze", domain.name, "--expose", expose, "--json", config=config, env=cli_env())
        assert frozen.returncode == 0, frozen.stderr
        domain_dir = expose / domain.name
        marker = json.loads((domain_dir / ".kvm-borg-freeze").read_text())
        assert "meta.json" in marker["files"] and "disks/vda.raw" in marker["files"]
        (domain_dir / "notes.txt").write_text("an admin's file inside the exposure")
        thawed = run_cli("thaw", "--expose", expose, "--json", config=config, env=cli_env())
        assert thawed.returncode == 1, thawed.stderr  # thawed, with the warning that something was left
        [outcome] = json.loads(thawed.stdout)
        assert outcome["ok"] and any("did not create" in w for w in outcome["warnings"])
        assert_back_on_own_images(domain, kb / "state")
        assert sorted(p.name for p in domain_dir.iterdir()) == ["notes.txt"]  # everything of freeze is gone
        assert (foreign / "meta.json").exists() and (foreign / "disks").is_dir()
        assert str(mounted) in mount_points() and (mounted / "meta.json").exists() and (mounted / "disks").is_dir()
