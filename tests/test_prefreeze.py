"""kvm_borg_hooks.prefreeze with a real booting guest: commands run inside it through the guest agent,
`before` ones land in the archive, `after` ones do not; a failing required command freezes nothing."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET

import pytest

from guest.build import wait_for_agent
from guest.fixtures import guest_artifacts, guest_factory  # noqa: F401
from harness import run_cli
from support import archived_meta, borg_archives, cli_env, extract_archive, journal_entries, write_config

from kvm_borg_hooks.prefreeze import exec_request, guest_exec

pytestmark = pytest.mark.slow


def read_guest_file(image, fmt: str, path_in_fs: str, tmp_path) -> str | None:
    """Given a disk image holding ext4, return a file's text (None if it does not exist); the image is not touched."""
    raw = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True)
    subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True)  # replay the journal on the copy
    proc = subprocess.run(["debugfs", "-R", f"cat {path_in_fs}", str(raw)], capture_output=True, text=True)
    raw.unlink()
    return proc.stdout if proc.returncode == 0 and "File not found" not in proc.stderr else None


def test_exec_request_shapes():
    assert exec_request("sync") == {"path": "/bin/sh", "arg": ["-c", "sync"], "capture-output": True}
    assert exec_request(["/bin/echo", "a b"]) == {"path": "/bin/echo", "arg": ["a b"], "capture-output": True}


def test_prefreeze_commands_run_in_the_guest_around_the_snapshot(guest_factory, image_dir, tmp_path):
    guest = guest_factory(fmt="qcow2", size_mib=64, workload=False)
    wait_for_agent(guest.dom, timeout=120)
    repo = tmp_path / "repo"
    spec = {"before": ["echo flushed-before > /data/kb-before; sync"],
            "after": [["/bin/sh", "-c", "echo resumed-after > /data/kb-after; sync"]], "timeout": "30s"}
    config = write_config(image_dir / "kb", repo_path=repo, plugins=("kvm_borg_hooks.prefreeze",),
                          prefreeze={guest.name: spec})
    proc = run_cli("backup", guest.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    assert result["ok"] and result["consistency"] == "quiesced"
    extracted = extract_archive(repo, result["stores"][0]["archive"], tmp_path / "x")
    disk = archived_meta(extracted)["disks"][0]
    image = extracted / disk["archive_path"]
    assert read_guest_file(image, disk["format"], "/kb-before", tmp_path) == "flushed-before\n"
    assert read_guest_file(image, disk["format"], "/kb-after", tmp_path) is None  # ran after the snapshot
    assert guest_exec(guest.dom, "cat /data/kb-after", 30) == (0, "resumed-after\n", "")

    # A failing `before` command: a warning (exit 1) by default ...
    failing = {"before": ["echo no database here >&2; exit 3"], "timeout": "30s"}
    warn = write_config(image_dir / "kb-warn", repo_path=repo, plugins=("kvm_borg_hooks.prefreeze",),
                        prefreeze={guest.name: failing})
    proc = run_cli("backup", guest.name, "--json", config=warn, env=cli_env())
    assert proc.returncode == 1, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    assert result["ok"] and any("exited with code 3: no database here" in w for w in result["warnings"])

    # ... and with required: true the domain fails before anything is frozen.
    archives = borg_archives(repo)
    strict = write_config(image_dir / "kb-strict", repo_path=repo, plugins=("kvm_borg_hooks.prefreeze",),
                          prefreeze={guest.name: {**failing, "required": True}})
    proc = run_cli("backup", guest.name, "--json", config=strict, env=cli_env())
    assert proc.returncode == 2
    [result] = json.loads(proc.stdout)["domains"]
    assert not result["ok"] and "nothing was frozen" in result["error"]
    assert borg_archives(repo) == archives
    source = ET.fromstring(guest.dom.XMLDesc(0)).find("./devices/disk/source").get("file")
    assert source == str(guest.data_disk)  # never left the own image
    assert journal_entries(image_dir / "kb-strict" / "state") == []
