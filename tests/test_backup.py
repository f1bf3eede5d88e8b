"""`kvm-borg backup` against real libvirtd + QEMU + borg: the README's promises, one test each."""

from __future__ import annotations

import json
import threading
import time

import pytest

from harness import DiskSpec, qemu_img_compare, run_cli
from kbtest_plugins.probe import AFTER_SNAPSHOT_LENGTH, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_PATTERN
from support import (
    archived_meta,
    assert_back_on_own_images,
    borg_archives,
    cli_env,
    extract_archive,
    write_config,
)

MiB = 1 << 20
TWO_DISKS = [DiskSpec("vda", "qcow2", 64), DiskSpec("vdb", "raw", 64)]


class GuestWriter(threading.Thread):
    """Keeps writing distinct 64 KiB blocks into both disks through the VM until stopped."""

    def __init__(self, test_domain, targets):
        super().__init__(daemon=True)
        self.test_domain, self.targets = test_domain, targets
        self.stop = threading.Event()
        self.done: list[tuple[str, int, int]] = []  # (target, pattern, offset) of completed writes
        self.errors: list[str] = []

    def run(self):
        n = 0
        while not self.stop.is_set():
            for target in self.targets:
                pattern = 0x40 + n % 64
                offset = 16 * MiB + (n % 512) * 64 * 1024
                try:
                    self.test_domain.hmp_write(target, pattern, offset, 64 * 1024)
                    self.done = [w for w in self.done if not (w[0] == target and w[2] == offset)]
                    self.done.append((target, pattern, offset))
                except Exception as exc:  # a guest write failing is a test failure, reported below
                    self.errors.append(str(exc))
            n += 1
            time.sleep(0.02)


def test_live_backup_archives_snapshot_content_while_guest_writes_survive_commit(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS, name="live two-disk")
    domain.hmp_write("vda", 0xA1, 2 * MiB, MiB)  # before the backup: must be in the archive
    domain.hmp_write("vdb", 0xB1, 2 * MiB, MiB)
    reference = image_dir / "reference"
    reference.mkdir()
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    writer = GuestWriter(domain, ["vda", "vdb"])
    writer.start()
    try:
        proc = run_cli("backup", domain.name, "--json", config=config,
                       env=cli_env(KBTEST_REFERENCE_DIR=reference, KBTEST_WRITE_AFTER_SNAPSHOT=1))
    finally:
        time.sleep(0.5)
        writer.stop.set()
        writer.join()
    assert proc.returncode == 0, proc.stderr
    assert writer.errors == [] and len(writer.done) > 10
    summary = json.loads(proc.stdout)
    [result] = summary["domains"]
    assert result["ok"] and result["consistency"] == "crash-consistent"
    archive = result["stores"][0]["archive"]
    assert archive.startswith(domain.name + "-") and archive.endswith("Z")

    extracted = extract_archive(tmp_path / "repo", archive, tmp_path / "x")
    meta = archived_meta(extracted)
    assert meta["domain"]["name"] == domain.name and meta["quiesced"] is False
    for disk in meta["disks"]:
        target = disk["target"]
        image = extracted / disk["archive_path"]
        assert disk["original_source"] == str(domain.disks[target])
        assert disk["format"] == domain.formats[target]
        # The archived image is exactly the guest view at the snapshot instant ...
        assert qemu_img_compare(image, reference / f"{target}.raw", disk["format"], "raw")
        # ... which has the write made before the backup and not the one made after the snapshot.
        assert domain.has_pattern(target, {"vda": 0xA1, "vdb": 0xB1}[target], 2 * MiB, MiB, path=image,
                                  fmt=disk["format"])
        assert not domain.has_pattern(target, AFTER_SNAPSHOT_PATTERN, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_LENGTH,
                                      path=image, fmt=disk["format"])
    assert (extracted / meta["files"]["domain_xml"]).read_text().startswith("<domain")
    assert domain.name in (extracted / meta["files"]["domain_live_xml"]).read_text()

    # After the commit the domain runs on its own images, with every write it made.
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    for target in ("vda", "vdb"):
        assert domain.hmp_read_check(target, AFTER_SNAPSHOT_PATTERN, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_LENGTH)
    for target, pattern, offset in writer.done:
        assert domain.hmp_read_check(target, pattern, offset, 64 * 1024), (target, pattern, offset)
    domain.destroy()  # QEMU flushes on the way out: the files themselves hold the writes
    for target in ("vda", "vdb"):
        assert domain.has_pattern(target, AFTER_SNAPSHOT_PATTERN, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_LENGTH)


def test_shut_off_domain_is_backed_up_from_its_images(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS, running=False)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    assert result["consistency"] == "offline"
    extracted = extract_archive(tmp_path / "repo", result["stores"][0]["archive"], tmp_path / "x")
    meta = archived_meta(extracted)
    assert meta["consistency"] == "offline" and "domain_live_xml" not in meta["files"]
    for disk in meta["disks"]:
        assert domain.verify_fill(disk["target"], extracted / disk["archive_path"], disk["format"])
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    assert not domain.is_active()


def test_list_json_shows_archives_per_domain(domain_factory, image_dir, tmp_path):
    first = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)], name="list one")
    second = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], running=False, name="list two")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    assert run_cli("backup", first.name, second.name, config=config, env=cli_env()).returncode == 0
    proc = run_cli("list", "--json", config=config, env=cli_env())
    assert proc.returncode == 0
    archives = json.loads(proc.stdout)
    assert {a["domain"] for a in archives} == {first.name, second.name}
    for archive in archives:
        assert set(archive) >= {"name", "domain", "time", "repository", "original_size", "deduplicated_size", "disks"}
        assert archive["repository"] == "main" and archive["disks"] == ["vda"]
        assert archive["original_size"] >= 16 * MiB
    only_first = json.loads(run_cli("list", first.name, "--json", config=config, env=cli_env()).stdout)
    assert [a["domain"] for a in only_first] == [first.name]
    assert sorted(borg_archives(tmp_path / "repo")) == sorted(a["name"] for a in archives)


def test_multi_domain_run_goes_on_past_a_failing_domain(domain_factory, image_dir, tmp_path, libvirt_conn):
    good = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)], name="goes on good")
    bad = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], name="goes on bad")
    bad.dom.checkpointCreateXML("<domaincheckpoint><name>cp1</name></domaincheckpoint>", 0)
    try:
        config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
        proc = run_cli("backup", bad.name, good.name, "--json", config=config, env=cli_env())
        assert proc.returncode == 2
        results = {d["domain"]: d for d in json.loads(proc.stdout)["domains"]}
        assert results[good.name]["ok"] and not results[bad.name]["ok"]
        assert "checkpoints (cp1)" in results[bad.name]["error"]
    finally:
        for checkpoint in bad.dom.listAllCheckpoints(0):
            checkpoint.delete(0)


def test_disk_exclusions_from_config_and_cli(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 16), DiskSpec("vdb", "raw", 16),
                                        DiskSpec("vdc", "qcow2", 16)], name="exclusions")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo",
                          domains={"include": ["*"], "exclude": [], "disks_exclude": {domain.name: ["vdb"]}})
    proc = run_cli("backup", domain.name, "--exclude-disk", "vdc", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    archive = json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]
    meta = archived_meta(extract_archive(tmp_path / "repo", archive, tmp_path / "x"))
    assert [d["target"] for d in meta["disks"]] == ["vda"]
    assert {s["target"]: s["reason"] for s in meta["skipped_disks"]} == {
        "vdb": "excluded by configuration", "vdc": "excluded by configuration"}
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_all_selects_domains_by_include_and_exclude_globs(domain_factory, image_dir, tmp_path):
    wanted = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], name="glob-keep")
    unwanted = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], name="glob-skip")
    prefix = wanted.name.rsplit("-", 1)[0]
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo",
                          domains={"include": [f"{prefix}-*"], "exclude": ["*-skip"]})
    proc = run_cli("backup", "--all", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert [d["domain"] for d in json.loads(proc.stdout)["domains"]] == [wanted.name]
    assert unwanted.live_sources() == {"vda": str(unwanted.disks["vda"])}


def test_domain_name_with_spaces_and_non_ascii_is_backed_up(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16, filename="disk é ü.qcow2")],
                                 name="Grüße aus Köln")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    archive = json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]
    assert archive.startswith(domain.name + "-")
    meta = archived_meta(extract_archive(tmp_path / "repo", archive, tmp_path / "x"))
    assert domain.verify_fill("vda", tmp_path / "x" / meta["disks"][0]["archive_path"], "qcow2")
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_hooks_are_called_in_order_with_their_data(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], name="hooks")
    events = tmp_path / "events.jsonl"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    assert run_cli("backup", domain.name, config=config, env=cli_env(KBTEST_EVENTS_FILE=events)).returncode == 0
    calls = [json.loads(line) for line in events.read_text().splitlines()]
    assert [c["hook"] for c in calls] == ["before_snapshot", "after_snapshot", "after_store", "before_commit",
                                          "after_commit", "backup_finished"]
    assert calls[0]["disks"] == ["vda"] and calls[2]["ok"] and calls[2]["repository"] == "main"
