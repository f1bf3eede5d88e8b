"""The CLI's promises: zero-config default, config generate/validate, doctor, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from harness import DiskSpec, run_cli
from support import assert_back_on_own_images, borg, cli_env, write_config, write_passphrase

DEFAULT_STATE_DIR = Path("/var/lib/kvm-borg")


@pytest.fixture
def pristine_default_state_dir(tmp_path):
    """Move an existing /var/lib/kvm-borg aside for the test, and put it back afterwards."""
    aside = None
    if DEFAULT_STATE_DIR.exists():
        aside = tmp_path / "kvm-borg-aside"
        shutil.move(DEFAULT_STATE_DIR, aside)
    yield DEFAULT_STATE_DIR
    shutil.rmtree(DEFAULT_STATE_DIR, ignore_errors=True)
    if aside is not None:
        shutil.move(aside, DEFAULT_STATE_DIR)


def test_zero_config_backs_up_into_an_encrypted_local_repository(domain_factory, pristine_default_state_dir, tmp_path,
                                                                 monkeypatch):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)])
    env = cli_env(KVM_BORG_CONFIG="")
    assert not Path("/etc/kvm-borg/config.yaml").exists()
    first = run_cli("backup", domain.name, env=env)
    assert first.returncode == 0, first.stderr
    assert "Export the key with" in first.stderr  # the one-time notice
    passphrase = pristine_default_state_dir / "passphrase"
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    assert stat.S_IMODE((pristine_default_state_dir / "repository").stat().st_mode) & 0o077 == 0
    info = json.loads(borg("info", "--json", pristine_default_state_dir / "repository",
                           passphrase=passphrase.read_text().strip()).stdout)
    assert info["encryption"]["mode"] == "repokey-blake2"
    second = run_cli("backup", domain.name, env=env)
    assert second.returncode == 0 and "Export the key with" not in second.stderr
    listed = json.loads(run_cli("list", "--json", env=env).stdout)
    assert [a["domain"] for a in listed] == [domain.name, domain.name]
    # the default method is auto: a running domain on a qcow2 v3 disk gets the bitmap method, with the
    # default scratch_dir (state_dir/scratch); the second run reads only what changed (nothing)
    assert [a["method"] for a in listed] == ["bitmap", "bitmap"]
    assert passphrase.read_text().strip() not in first.stderr + first.stdout + second.stderr
    assert_back_on_own_images(domain, pristine_default_state_dir)


def test_list_and_init_work_on_a_fresh_zero_config_repository(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")  # no repositories: the embedded default
    listed = run_cli("list", "--json", config=config)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr  # before the first backup
    created = run_cli("init", config=config)
    assert created.returncode == 0 and "local: created" in created.stdout, created.stderr
    assert "Export the key with" in created.stderr
    passphrase = tmp_path / "state" / "passphrase"
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    info = json.loads(borg("info", "--json", tmp_path / "state" / "repository",
                           passphrase=passphrase.read_text().strip()).stdout)
    assert info["encryption"]["mode"] == "repokey-blake2"
    again = run_cli("init", config=config)
    assert again.returncode == 0 and "local: already exists" in again.stdout, again.stderr
    listed = run_cli("list", "--json", config=config)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr


def test_generated_config_is_valid_and_validate_reports_it(tmp_path):
    generated = run_cli("config", "generate")
    assert generated.returncode == 0 and generated.stdout.startswith("# kvm-borg configuration")
    path = tmp_path / "generated.yaml"
    text = generated.stdout.replace("/etc/kvm-borg/passphrase", str(write_passphrase(tmp_path / "p")))
    path.write_text(text)
    proc = run_cli("config", "validate", config=path)
    assert proc.returncode == 0, proc.stderr
    assert "valid (1 repositories" in proc.stdout


@pytest.mark.parametrize("text, message", [
    ("repositories: [{name: a, type: borg}]", "repositories[0].path: required"),
    ("quiesce: maybe", "quiesce: expected one of auto, required, off"),
    ("repositories: [{name: a, type: zip, path: /x}]", "unknown repository type 'zip'"),
    ("plugins: [kbtest_no_such_plugin]", "plugins[0]: cannot import plugin module 'kbtest_no_such_plugin'"),
    ("state_dir: : :", "malformed YAML"),
])
def test_config_validate_errors_are_one_line_with_exit_2(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_cli("config", "validate", config=path, env=cli_env())
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_world_readable_passphrase_file_is_refused(image_dir, tmp_path):
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    os.chmod(image_dir / "kb" / "passphrase", 0o644)
    proc = run_cli("list", config=config, env=cli_env())
    assert proc.returncode == 2
    assert "is accessible by others (mode 0644)" in proc.stderr and "chmod 600" in proc.stderr


def test_doctor_round_trip_reports_versions_plugins_and_passes(tmp_path, libvirt_conn):
    config = write_config(tmp_path / "kb", repo_path=tmp_path / "repo", plugins=["kbtest_plugins.probe"])
    proc = run_cli("doctor", "--round-trip", "--json", config=config, env=cli_env())
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["round-trip"]["status"] == "ok", checks["round-trip"]
    assert checks["libvirtd"]["status"] == "ok" and checks["qemu-img"]["status"] == "ok"
    assert "borg" in checks["repository main"]["detail"]
    plugins = {p["name"]: p for p in report["plugins"]}
    assert plugins["kvm_borg.default_plugins.libvirt_snapshot"]["builtin"]
    assert "kvm_borg_frozen_source" in plugins["kvm_borg.default_plugins.libvirt_snapshot"]["hooks"]
    assert "kvm_borg_repository_backend" in plugins["kvm_borg.backends.borg"]["hooks"]
    assert plugins["kbtest_plugins.probe"]["builtin"] is False
    assert [n for n in (d.name() for d in libvirt_conn.listAllDomains(0)) if n.startswith("kvm-borg-doctor")] == []


def _doctor_bitmap_row(tmp_path, name, method, extra_path=None):
    config = write_config(tmp_path / name, repo_path=tmp_path / "repo", init=False, method=method)
    env = cli_env(PYTHONPATH=os.pathsep.join([*([str(extra_path)] if extra_path else []), str(Path(__file__).parent)]))
    proc = run_cli("doctor", "--json", config=config, env=env)
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    return proc.returncode, checks["bitmap method"], checks


def test_doctor_says_whether_the_bitmap_method_can_run(tmp_path):
    code, row, checks = _doctor_bitmap_row(tmp_path, "real", "bitmap")
    assert row == {"check": "bitmap method", "status": "ok", "detail": "can run (libnbd, pyfuse3, libvirt backup jobs)"}
    scratch = tmp_path / "real" / "state" / "scratch"
    assert checks["scratch_dir"]["detail"].startswith(f"{scratch} (") and "MiB free" in checks["scratch_dir"]["detail"]
    # libnbd's bindings missing: a module named nbd that does not import shadows Debian's
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "nbd.py").write_text("raise ImportError('libnbd is not installed here')\n")
    code, row, _ = _doctor_bitmap_row(tmp_path, "wanted", "bitmap", shadow)
    assert row["status"] == "warning" and code >= 1
    assert "cannot run: nbd does not import (ImportError: libnbd is not installed here; install python3-libnbd" \
        in row["detail"]


def test_bad_arguments_are_one_line_with_exit_2():
    proc = run_cli("backup", "--frobnicate")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("backup", config="/nonexistent/config.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kvm-borg: error: /nonexistent/config.yaml: config file does not exist"


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(domain_factory, image_dir, tmp_path):
    import pty
    import subprocess

    from harness import KVM_BORG_BIN
    from harness.cli import _merged_env

    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 256, fill="random")])
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(KVM_BORG_BIN), "--config", str(config), "backup", domain.name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                            env=_merged_env(cli_env(COLUMNS="120")), text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal
    assert "━" in terminal and "MB" in terminal  # rich's bar with transferred bytes
    plain = run_cli("backup", domain.name, config=config, env=cli_env())
    assert plain.returncode == 0 and "━" not in plain.stderr
    assert "borg create main::" in plain.stderr  # plain structured log lines instead


def test_a_libvirt_error_is_one_line_and_exit_2_not_a_traceback(domain_factory, image_dir, tmp_path, libvirt_conn):
    """A real libvirt error escaping an action: `restore --start` of a domain whose interface names a
    network this host does not have (defining works, starting fails in libvirt)."""
    import xml.etree.ElementTree as ET

    import libvirt

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], running=False, name="libvirt error")
    missing = domain_factory.domain_name("no-such-network")  # a name no network of this host has
    assert missing not in libvirt_conn.listNetworks() + libvirt_conn.listDefinedNetworks()
    root = ET.fromstring(domain.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    interface = ET.SubElement(root.find("devices"), "interface", type="network")
    ET.SubElement(interface, "source", network=missing)
    ET.SubElement(interface, "model", type="virtio")
    libvirt_conn.defineXML(ET.tostring(root, encoding="unicode"))
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", domain.name, config=config, env=cli_env())
    assert proc.returncode in (0, 1), proc.stderr  # 1: a warning that the network definition is not archived

    copy = domain_factory.domain_name("libvirt error copy")
    proc = run_cli("restore", domain.name, "--name", copy, "--target-dir", image_dir / "copy", "--start",
                   config=config, env=cli_env())
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.rstrip("\n").splitlines()[-1]  # restore may word it its own way; libvirt's text stays
    assert last.startswith("kvm-borg: error: ") and f"Network not found: no network with matching name '{missing}'" in last
    assert [line for line in proc.stderr.splitlines() if not line.startswith("kvm-borg: ")] == []
