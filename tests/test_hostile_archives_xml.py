"""Hostile archives, the XML and the archive choice: what an archive's domain XML and dates may not do.

One small real archive per repository type (borg, restic) is made once for the module (the
`source` fixture of tests/test_hostile_archives.py); every case crafts a variant of it with
tests/harness/crafted.py. Each attack aims at names with a fresh marker (`kbpwn-<hex>`).

- XML cases: the crafted domain.xml carries one hostile part; `restore --name COPY --define`
  must define a sanitized copy (asserted on the XML libvirt holds) or refuse (exit 2).
- `verify --boot` of an archive carrying all hostile parts at once: while the copy runs, the XML
  libvirt holds and the real QEMU command line (/proc/PID/cmdline) are read: neither may hold
  a hostile part, and nothing with the marker may appear on the host.
- Archive choice: another host's future-dated snapshot (restic: `--host` + `--time`; borg:
  the comment's host + `--timestamp`) in the same repository is never taken as "latest";
  the same host's future-dated one neither (a warning names it); an explicit `--archive` of
  another host's is refused unless `--host` names it.
"""

from __future__ import annotations

import json
import threading
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path

import libvirt
import pytest

from harness import run_cli
from harness.crafted import Tree, changed, listing, marked_paths
from support import cli_env
from test_hostile_archives import Watch, assert_refused, craft, marker, restore, source  # noqa: F401

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
KINDS = ["borg", "restic"]


class Watch(Watch):  # noqa: F811
    """test_hostile_archives.Watch, tolerant of OTHER concurrent attack tests: an entry carrying another
    run's `kbpwn-` marker in a quiet directory is theirs (they aim at /etc/cron.d too), not this test's."""

    def assert_nothing_outside(self) -> None:
        assert marked_paths(self.marker) == [], "the attack wrote under the aimed-at roots"
        moved = [p for p in changed(self.before, listing(self.quiet)) if p != str(self.target)
                 and not ("kbpwn-" in Path(p).name and self.marker not in Path(p).name)]
        assert moved == [], f"a quiet directory changed: {moved}"


# --- editing the archived domain XML ------------------------------------------------------------


def edit_xml(change):
    """Return an Edit that applies `change(root)` to the archived persistent domain XML."""
    def edit(tree: Tree) -> None:
        meta = tree.meta()
        path = meta["files"]["domain_xml"]
        ET.register_namespace("qemu", QEMU_NS)
        root = ET.fromstring(tree.read_text(path))
        change(root)
        tree.write_file(path, ET.tostring(root, encoding="unicode"))
    return edit


def add_devices(*snippets: str):
    def change(root):
        devices = root.find("devices")
        for snippet in snippets:
            devices.append(ET.fromstring(snippet))
    return change


def add_qemu_commandline(mark: str):
    def change(root):
        line = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for value in ("-chardev", f"file,id={mark},path=/tmp/{mark}.log"):
            ET.SubElement(line, f"{{{QEMU_NS}}}arg", value=value)
    return change


def add_seclabel_none(_mark: str):
    def change(root):
        ET.SubElement(root, "seclabel", type="none")
    return change


def add_kernel(mark: str):
    def change(root):
        os_node = root.find("os")
        for tag, path in (("kernel", "/etc/shadow"), ("initrd", f"/root/{mark}")):
            ET.SubElement(os_node, tag).text = path
    return change


def add_hostdev(_mark: str):
    return add_devices("<hostdev mode='subsystem' type='usb' managed='no'><source><vendor id='0x1d6b'/>"
                       "<product id='0x0002'/></source></hostdev>")


def add_network_disk(mark: str):
    return add_devices(f"<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
                       f"<source protocol='nbd' name='{mark}'><host name='127.0.0.1' port='10809'/></source>"
                       "<target dev='vdx' bus='virtio'/></disk>")


def add_shadow_disk(_mark: str):
    return add_devices("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                       "<source file='/etc/shadow'/><target dev='vdy' bus='virtio'/></disk>")


def add_script_interface(mark: str):
    return add_devices(f"<interface type='ethernet'><script path='/tmp/{mark}.sh'/>"
                       "<model type='virtio'/></interface>")


CASES = {
    "qemu:commandline": add_qemu_commandline,
    "seclabel none": add_seclabel_none,
    "hostdev": add_hostdev,
    "network disk not restored": add_network_disk,
    "/etc/shadow disk not restored": add_shadow_disk,
    "kernel and initrd paths": add_kernel,
    "interface with a script": add_script_interface,
}


def hostile_parts(xml: str, mark: str) -> list[str]:
    """Given a domain XML, return the hostile parts of CASES found in it (empty: none)."""
    root = ET.fromstring(xml)
    found = [word for word in (QEMU_NS, "nbd", "/etc/shadow", "ethernet", mark) if word in xml]
    found += [f"<{node.tag}>" for node in root.iter() if node.tag in ("hostdev", "kernel", "initrd", "script")]
    found += ["seclabel none" for node in root.iter("seclabel") if node.get("type") == "none"]
    return found


def hostile_arguments(argv: str, mark: str) -> list[str]:
    """Given a QEMU command line, return the hostile parts of CASES found in it (empty: none)."""
    return [word for word in (mark, "nbd", "/etc/shadow", "usb-host", "-kernel", "-initrd", "-netdev", "script=")
            if word in argv]


def inactive_xml(conn: libvirt.virConnect, name: str) -> str:
    return conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_restore_defines_only_the_sanitized_xml(source, kind, case, tmp_path, marker, libvirt_conn):  # noqa: F811
    archive = craft(source, kind, edit_xml(CASES[case](marker)), tmp_path)
    target = tmp_path / "target"
    watch = Watch(marker, target)
    copy = f"{source.domain.name}-c{len(case)}{kind[0]}"
    try:
        proc = restore(source, kind, archive, "--name", copy, "--target-dir", target, "--define", "--json")
        assert proc.returncode == 1, (proc.returncode, proc.stderr)  # sanitized: a warning says what went
        assert "Traceback" not in proc.stderr
        defined = inactive_xml(libvirt_conn, copy)
        assert hostile_parts(defined, marker) == [], defined
        root = ET.fromstring(defined)
        assert root.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"
        assert sorted(d.find("target").get("dev") for d in root.findall("devices/disk")) == ["vda", "vdb"]
        for disk in root.findall("devices/disk"):
            assert Path(disk.find("source").get("file")).parent == target
        assert json.loads(proc.stdout)["warnings"]
        written = Path(json.loads(proc.stdout)["xml"]).read_text()  # the XML file beside the images too
        assert hostile_parts(written, marker) == []
    finally:
        try:
            libvirt_conn.lookupByName(copy).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError:
            pass
    watch.assert_nothing_outside()
    watch.assert_target_plain()


@pytest.mark.parametrize("kind", KINDS)
def test_a_foreign_firmware_is_refused_before_anything_is_written(source, kind, tmp_path, marker):  # noqa: F811
    def change(root):
        ET.SubElement(root.find("os"), "loader", type="rom").text = f"/tmp/{marker}.fd"
    archive = craft(source, kind, edit_xml(change), tmp_path)
    target = tmp_path / "target"
    watch = Watch(marker, target)
    proc = restore(source, kind, archive, "--name", f"{source.domain.name}-fw", "--target-dir", target, "--define")
    assert_refused(proc, "firmware", marker)
    assert not target.exists()
    watch.assert_nothing_outside()


class CopySpy:
    """Watches for the verify copy of `domain` and records its live XML and its QEMU command line."""

    def __init__(self, conn: libvirt.virConnect, domain: str):
        self.conn, self.prefix = conn, f"kvm-borg-verify-{domain[:40]}-"
        self.seen: list[tuple[str, str]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set() and not self.seen:
            for dom in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    if not dom.name().startswith(self.prefix):
                        continue
                    xml = dom.XMLDesc(0)
                    pid = Path(f"/run/libvirt/qemu/{dom.name()}.pid").read_text().strip()
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except (libvirt.libvirtError, OSError):
                    continue
                if " -name " not in argv:
                    continue  # still libvirtd's child before it executes the emulator
                self.seen.append((xml, argv))
            time.sleep(0.1)

    def stop(self) -> list[tuple[str, str]]:
        self.done.set()
        self.thread.join(timeout=60)
        return self.seen


@pytest.mark.parametrize("kind", KINDS)
def test_verify_boot_never_starts_the_hostile_parts(source, kind, tmp_path, marker, libvirt_conn):  # noqa: F811
    def change(root):
        for make in CASES.values():
            make(marker)(root)
    archive = craft(source, kind, edit_xml(change), tmp_path)
    watch = Watch(marker, tmp_path / "unused")
    spy = CopySpy(libvirt_conn, source.domain.name)
    proc = run_cli("verify", source.domain.name, "--repo", kind, "--archive", archive, "--boot",
                   "--alive-seconds", "5", "--json", config=source.config, env=cli_env())
    seen = spy.stop()
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["boot"]["sign_of_life"] == "still running after 5s", report
    assert seen, "the verify copy was never seen running"
    xml, argv = seen[0]
    assert hostile_parts(xml, marker) == [], xml
    assert ET.fromstring(xml).find("devices/interface") is None
    assert hostile_arguments(argv, marker) == [], argv
    assert argv.split()[0] == "/usr/bin/qemu-system-x86_64"
    watch.assert_nothing_outside()


# --- which archive is "latest" ------------------------------------------------------------------


def _other_host(host: str, mark: str):
    def edit(tree: Tree) -> None:
        meta = tree.meta()
        meta["host"] = host
        tree.write_meta(meta)
        [raw] = [d for d in meta["disks"] if d["format"] == "raw"]
        tree.write_file(raw["archive_path"], f"planted by {mark}".encode() * 1024)
    return edit


def list_names(source, kind, *args) -> list[str]:
    proc = run_cli("list", source.domain.name, "--repo", kind, "--json", *args, config=source.config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    return [a["name"] for a in json.loads(proc.stdout)]


@pytest.mark.parametrize("kind", KINDS)
def test_another_hosts_future_dated_archive_is_never_latest(source, kind, tmp_path, marker):  # noqa: F811
    future = datetime.now(timezone.utc) + timedelta(days=400)
    planted = craft(source, kind, _other_host(f"other-{marker}", marker), tmp_path, host=f"other-{marker}",
                    when=future)
    genuine = source.borg_archive if kind == "borg" else source.restic_archive
    assert planted not in list_names(source, kind)  # this host's archives only
    assert planted in list_names(source, kind, "--host", f"other-{marker}")
    target = tmp_path / "target"
    proc = restore(source, kind, "latest", "--target-dir", target, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    result = json.loads(proc.stdout)
    assert not [w for w in result["warnings"] if planted in w]  # another host's: not even considered
    assert result["archive"] == genuine
    for disk, path in result["disks"].items():
        assert source.domain.verify_fill(disk, path, source.domain.formats[disk])
    proc = run_cli("verify", source.domain.name, "--repo", kind, "--json", config=source.config, env=cli_env())
    assert proc.returncode in (0, 1) and json.loads(proc.stdout)["archive"] == genuine, proc.stderr
    # named explicitly: refused unless --host names that host
    proc = restore(source, kind, planted, "--target-dir", tmp_path / "t2")
    assert_refused(proc, f"other-{marker}", "--host")
    assert not (tmp_path / "t2").exists()
    proc = restore(source, kind, planted, "--host", f"other-{marker}", "--target-dir", tmp_path / "t3", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads(proc.stdout)["archive"] == planted


@pytest.mark.parametrize("kind", KINDS)
def test_this_hosts_future_dated_archive_is_not_latest_and_is_named(source, kind, tmp_path, marker):  # noqa: F811
    future = datetime.now(timezone.utc) + timedelta(days=30)
    planted = craft(source, kind, lambda tree: None, tmp_path, when=future)
    genuine = source.borg_archive if kind == "borg" else source.restic_archive
    proc = restore(source, kind, "latest", "--target-dir", tmp_path / "target", "--json")
    assert proc.returncode == 1, proc.stderr  # restored, with a warning naming the future-dated archive
    assert json.loads(proc.stdout)["archive"] == genuine
    assert any(planted in w and "future" in w for w in json.loads(proc.stdout)["warnings"])
    # status --refresh records what the repository holds: the planted archive never becomes the last backup
    proc = run_cli("status", source.domain.name, "--repo", kind, "--refresh", "--json", config=source.config,
                   env=cli_env())
    assert proc.returncode in (0, 1), proc.stderr
    [row] = json.loads(proc.stdout)["domains"]
    assert row["archive"] != planted and row["last_success"] < datetime.now(timezone.utc).timestamp() + 300, row
    assert planted in proc.stderr and "future" in proc.stderr
    proc = run_cli("status", source.domain.name, "--host", "other", config=source.config, env=cli_env())
    assert_refused(proc, "--refresh")
