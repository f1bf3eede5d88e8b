"""Host state captured at backup and restored: swtpm TPM state, network XML, missing pieces reported."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import libvirt

from harness import create_image, make_dir, run_cli, wait_state
from support import archived_meta, cli_env, extract_archive, write_config

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
    {interfaces}
    <tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>
"""
INTERFACES = """<interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>
    <interface type='network'><source network='{missing}'/></interface>"""


def test_tpm_state_and_networks_are_archived_and_missing_ones_reported(domain_factory, image_dir, tmp_path,
                                                                       libvirt_conn):
    name = domain_factory.domain_name("tpm")
    missing_network = f"{name}-no-such-net"
    disk = create_image(make_dir(image_dir / "tpm") / "vda.qcow2", "qcow2", 8, "pattern", 5)
    os.chmod(disk, 0o644)
    dom = libvirt_conn.defineXML(DOMAIN_XML.format(name=name, disk=disk, interfaces=""))
    uuid = dom.UUIDString()
    tpm_dir = domain_factory.track_path(f"/var/lib/libvirt/swtpm/{uuid}")
    dom.create()  # swtpm creates the TPM state on first start
    wait_state(dom, libvirt.VIR_DOMAIN_RUNNING)
    dom.destroy()
    state_file = tpm_dir / "tpm2" / "tpm2-00.permall"
    assert state_file.exists()
    # Interfaces on a defined network and on one that does not exist (shut off: nothing has to start).
    libvirt_conn.defineXML(DOMAIN_XML.format(name=name, disk=disk, interfaces=INTERFACES.format(
        missing=missing_network)).replace(f"<name>{name}</name>", f"<name>{name}</name><uuid>{uuid}</uuid>"))
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", name, "--json", config=config, env=cli_env())
    assert proc.returncode == 1, proc.stderr  # stored, with a warning for the missing network
    [result] = json.loads(proc.stdout)["domains"]
    assert result["ok"] and any(missing_network in w for w in result["warnings"])
    extracted = extract_archive(tmp_path / "repo", result["stores"][0]["archive"], tmp_path / "x")
    meta = archived_meta(extracted)
    assert meta["tpm"]["state_dir"] == str(tpm_dir) and meta["tpm"]["version"] == "2.0"
    [entry] = meta["files"]["tpm_state"]
    assert entry["relative"] == "tpm2/tpm2-00.permall"
    assert (extracted / entry["archive_path"]).read_bytes() == state_file.read_bytes()
    assert meta["networks"] == ["default"]
    network_xml = (extracted / meta["files"]["networks"]["default"]).read_text()
    assert ET.fromstring(network_xml).findtext("name") == "default"
    assert any(missing_network in m for m in meta["missing"])

    copy = domain_factory.domain_name("tpm copy")
    proc = run_cli("restore", name, "--name", copy, "--target-dir", image_dir / "copy", "--define", "--json",
                   config=config, env=cli_env())
    assert proc.returncode == 1, proc.stderr  # the missing network is reported again
    restored = json.loads(proc.stdout)
    copy_dom = libvirt_conn.lookupByName(copy)
    domain_factory.track_path(restored["tpm"])
    assert restored["tpm"] == f"/var/lib/libvirt/swtpm/{copy_dom.UUIDString()}"
    assert open(os.path.join(restored["tpm"], "tpm2", "tpm2-00.permall"), "rb").read() == state_file.read_bytes()
    macs = [m.get("address") for m in ET.fromstring(copy_dom.XMLDesc(0)).findall("./devices/interface/mac")]
    assert len(macs) == 2 and "52:54:00:12:34:56" not in macs
    assert any(missing_network in w for w in restored["warnings"])
