"""xml_sanitize: what an archived domain XML may still say once it is defined or booted here."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from kvm_borg.errors import UsageError
from kvm_borg.xml_sanitize import (
    QEMU_NS,
    HostFacts,
    capabilities_query,
    parse_domain_capabilities,
    sanitize_domain_xml,
    trusted_paths_of,
)

HOST = HostFacts(emulator="/usr/bin/qemu-system-x86_64",
                 loaders=frozenset({"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"}))
IMAGE = "/var/lib/libvirt/images/web.qcow2"


def domain(devices: str = "", os_extra: str = "", top: str = "", attrs: str = "") -> str:
    return f"""<domain type='kvm' xmlns:qemu='{QEMU_NS}' {attrs}>
  <name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>
  {top}
  <devices>
    <emulator>/tmp/evil-qemu</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{IMAGE}'/>
      <target dev='vda' bus='virtio'/></disk>
    {devices}
  </devices>
</domain>"""


def sanitize(xml: str, **kwargs) -> tuple[ET.Element, list[str]]:
    kwargs.setdefault("restored_targets", {"vda"})
    kwargs.setdefault("host", HOST)
    text, warnings = sanitize_domain_xml(xml, **kwargs)
    return ET.fromstring(text), warnings


def test_qemu_commandline_and_capabilities_are_removed():
    xml = domain(top="<qemu:commandline><qemu:arg value='-chardev'/><qemu:arg value='file,path=/etc/x'/>"
                     "</qemu:commandline><qemu:capabilities><qemu:del capability='sandbox'/></qemu:capabilities>"
                     "<qemu:override/>")
    root, warnings = sanitize(xml)
    text = ET.tostring(root, encoding="unicode")
    assert QEMU_NS not in text and "/etc/x" not in text and "sandbox" not in text
    assert len([w for w in warnings if "qemu:" in w]) == 3


@pytest.mark.parametrize("label", [
    "<seclabel type='none'/>",
    "<seclabel type='dynamic' model='dac' relabel='no'/>",
    "<seclabel type='static' model='dac' relabel='yes'><label>+0:+0</label></seclabel>",
    "<seclabel type='static' model='apparmor'><label>unconfined</label></seclabel>",
])
def test_seclabels_that_weaken_confinement_are_removed(label):
    root, warnings = sanitize(domain(top=label))
    assert root.find(".//seclabel") is None
    assert any("seclabel" in w for w in warnings)


def test_device_level_seclabels_are_removed_too():
    xml = domain(devices="<serial type='file'><source path='/var/log/libvirt/qemu/web.log'>"
                         "<seclabel model='dac' relabel='no'/></source><target port='0'/></serial>")
    root, _ = sanitize(xml)
    assert root.find(".//seclabel") is None
    assert root.find("devices/serial/source").get("path") == "/var/log/libvirt/qemu/web.log"


@pytest.mark.parametrize("device", [
    "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='3' slot='0' function='0'/>"
    "</source></hostdev>",
    "<redirdev bus='usb' type='spicevmc'/>",
    "<smartcard mode='passthrough' type='tcp'><source mode='connect' host='127.0.0.1' service='2001'/></smartcard>",
    "<shmem name='ivshmem'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>",
    "<filesystem type='mount' accessmode='passthrough'><source dir='/'/><target dir='hostroot'/></filesystem>",
    "<lease><lockspace>x</lockspace><key>y</key><target path='/etc/passwd'/></lease>",
    "<memory model='nvdimm'><source><path>/etc/shadow</path></source><target><size unit='KiB'>512</size>"
    "</target></memory>",
    "<somethingnew path='/etc/shadow'/>",
])
def test_host_devices_and_shares_are_dropped(device):
    root, warnings = sanitize(domain(devices=device))
    tag = ET.fromstring(device).tag
    assert root.find(f"devices/{tag}") is None
    assert any(f"<{tag}>" in w for w in warnings)


@pytest.mark.parametrize("disk, named", [
    ("<disk type='network' device='disk'><source protocol='rbd' name='pool/prod'><host name='10.0.0.1'/></source>"
     "<target dev='vdb'/></disk>", "rbd/pool/prod"),
    ("<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='127.0.0.1' port='10809'/>"
     "</source><target dev='vdb'/></disk>", "nbd/x"),
    ("<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdb'/></disk>", "p/v"),
    ("<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb'/></disk>", "/dev/sda"),
    ("<disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdb'/></disk>", "/etc/shadow"),
    ("<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sda' bus='scsi'/></disk>", "/dev/sdb"),
    ("<disk type='file' device='floppy'><source file='/etc/passwd'/><target dev='fda'/></disk>", "/etc/passwd"),
])
def test_disks_that_were_not_restored_are_dropped_with_a_warning_naming_them(disk, named):
    root, warnings = sanitize(domain(devices=disk))
    assert [d.find("target").get("dev") for d in root.findall("devices/disk")] == ["vda"]
    assert any(named in w and "not restored" in w for w in warnings)


def test_a_restored_disk_stays_as_rewritten():
    root, _ = sanitize(domain())
    [disk] = root.findall("devices/disk")
    assert disk.find("source").attrib == {"file": IMAGE}


def test_a_restored_disk_that_is_not_a_plain_file_disk_is_refused():
    xml = domain().replace(f"<source file='{IMAGE}'/>", "<source protocol='rbd' name='x'/>").replace(
        "type='file' device='disk'", "type='network' device='disk'")
    with pytest.raises(UsageError, match="not a plain file disk"):
        sanitize(xml)


def test_a_cdrom_keeps_its_drive_and_loses_its_medium():
    xml = domain(devices="<disk type='block' device='cdrom'><source dev='/dev/sr0'/><target dev='sda' bus='sata'/>"
                         "<readonly/></disk>")
    root, warnings = sanitize(xml)
    [cdrom] = [d for d in root.findall("devices/disk") if d.get("device") == "cdrom"]
    assert cdrom.find("source") is None and cdrom.get("type") == "file" and cdrom.find("target").get("dev") == "sda"
    assert any("/dev/sr0" in w for w in warnings)


def test_emulator_is_this_hosts():
    root, _ = sanitize(domain())
    assert root.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"


def test_emulator_is_removed_when_this_host_does_not_say():
    root, _ = sanitize(domain(), host=HostFacts())
    assert root.find("devices/emulator") is None


@pytest.mark.parametrize("os_extra", [
    "<kernel>/etc/shadow</kernel><initrd>/root/x</initrd><cmdline>console=ttyS0</cmdline>",
    "<kernel>/var/lib/libvirt/boot/../../../../etc/shadow</kernel>",
])
def test_kernel_outside_libvirts_boot_directory_is_removed(os_extra):
    root, warnings = sanitize(domain(os_extra=os_extra))
    for tag in ("kernel", "initrd", "cmdline"):
        assert root.find(f"os/{tag}") is None
    assert any("direct kernel boot" in w for w in warnings)


def test_kernel_in_libvirts_boot_directory_or_in_the_local_definition_stays():
    extra = "<kernel>/var/lib/libvirt/boot/vmlinuz</kernel><initrd>/srv/guest/initrd.img</initrd><dtb>/etc/x</dtb>"
    root, warnings = sanitize(domain(os_extra=extra),
                              host=HostFacts(trusted_paths=frozenset({"/srv/guest/initrd.img"})))
    assert root.findtext("os/kernel") == "/var/lib/libvirt/boot/vmlinuz"
    assert root.findtext("os/initrd") == "/srv/guest/initrd.img"
    assert root.find("os/dtb") is None and any("<dtb>" in w for w in warnings)


def test_acpi_table_outside_libvirts_dirs_is_removed():
    root, _ = sanitize(domain(os_extra="<acpi><table type='slic'>/etc/shadow</table></acpi>"))
    assert root.find("os/acpi/table") is None


def test_loader_of_this_host_stays_one_with_the_same_name_is_replaced_another_is_refused():
    root, _ = sanitize(domain(os_extra="<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"))
    assert root.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    root, warnings = sanitize(domain(os_extra="<loader type='pflash'>/usr/share/edk2/ovmf/OVMF_CODE_4M.fd</loader>"))
    assert root.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd" and any("replaced" in w for w in warnings)
    root, _ = sanitize(domain(os_extra="<loader type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</loader>"))
    assert root.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"  # the package's directory
    with pytest.raises(UsageError, match="not one of this host's firmware"):
        sanitize(domain(os_extra="<loader type='rom'>/etc/shadow</loader>"))
    with pytest.raises(UsageError, match="not one of this host's firmware"):
        sanitize(domain(os_extra="<loader type='rom'>/usr/share/OVMF/../../../etc/shadow</loader>"))


def test_loader_outside_host_firmware_with_autoselection_is_left_to_libvirt():
    root, warnings = sanitize(domain(attrs="", os_extra="<loader type='pflash'>/tmp/kbpwn.fd</loader>").replace(
        "<os>", "<os firmware='efi'>"))
    assert not (root.findtext("os/loader") or "").strip() and any("libvirt selects" in w for w in warnings)


def test_nvram_must_be_the_restored_file_and_its_template_beside_host_firmware():
    nvram = "<nvram template='/etc/shadow'>/root/.ssh/authorized_keys</nvram>"
    root, warnings = sanitize(domain(os_extra=nvram))
    node = root.find("os/nvram")
    assert node.get("template") is None and not (node.text or "").strip()
    restored = "/var/lib/libvirt/qemu/nvram/web-copy_VARS.fd"
    root, _ = sanitize(domain(os_extra="<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/srv/r/web_VARS.fd</nvram>"),
                       nvram="/srv/r/web_VARS.fd")
    assert root.findtext("os/nvram") == "/srv/r/web_VARS.fd"
    assert root.find("os/nvram").get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    root, _ = sanitize(domain(os_extra=f"<nvram>{restored}</nvram>"))
    assert root.findtext("os/nvram") == restored


@pytest.mark.parametrize("chardev, path", [
    ("<serial type='file'><source path='/etc/cron.d/kbpwn'/><target port='0'/></serial>", "/etc/cron.d/kbpwn"),
    ("<serial type='dev'><source path='/dev/ttyS0'/><target port='0'/></serial>", "/dev/ttyS0"),
    ("<serial type='pipe'><source path='/tmp/p'/><target port='0'/></serial>", "/tmp/p"),
    ("<console type='unix'><source mode='bind' path='/root/sock'/><target type='serial'/></console>", "/root/sock"),
    ("<parallel type='file'><source path='/etc/passwd'/><target port='0'/></parallel>", "/etc/passwd"),
])
def test_character_devices_at_host_paths_become_ptys(chardev, path):
    root, warnings = sanitize(domain(devices=chardev))
    tag = ET.fromstring(chardev).tag
    node = root.find(f"devices/{tag}")
    assert node.get("type") == "pty" and node.find("source") is None
    assert path not in ET.tostring(root, encoding="unicode")
    assert any(path in w for w in warnings)


def test_channel_sockets_outside_libvirts_directory_lose_their_path_managed_ones_stay():
    xml = domain(devices="<channel type='unix'><source mode='bind' path='/etc/kbpwn.sock'/>"
                         "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
                         "<channel type='unix'><target type='virtio' name='x.0'/></channel>")
    root, _ = sanitize(xml)
    channels = root.findall("devices/channel")
    assert [c.get("type") for c in channels] == ["unix", "unix"] and all(c.find("source") is None for c in channels)


def test_chardev_log_files_and_serial_files_in_libvirts_log_dir_or_scratch():
    xml = domain(devices="<serial type='file'><source path='/var/log/libvirt/qemu/web-serial.log'/>"
                         "<log file='/etc/kbpwn'/><target port='0'/></serial>"
                         "<console type='file'><source path='/scratch/d/console.log'/><target type='serial'/></console>")
    root, _ = sanitize(xml, scratch_dir="/scratch/d")
    assert root.find("devices/serial/source").get("path") == "/var/log/libvirt/qemu/web-serial.log"
    assert root.find("devices/serial/log") is None
    assert root.find("devices/console/source").get("path") == "/scratch/d/console.log"


@pytest.mark.parametrize("interface", [
    "<interface type='ethernet'><script path='/tmp/kbpwn.sh'/><target dev='tap9'/></interface>",
    "<interface type='direct'><source dev='eth0' mode='bridge'/></interface>",
    "<interface type='hostdev' managed='yes'><source><address type='pci' bus='3'/></source></interface>",
    "<interface type='vhostuser'><source type='unix' path='/tmp/vhost' mode='client'/></interface>",
    "<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface>",
])
def test_interfaces_reaching_host_devices_or_scripts_are_dropped(interface):
    root, warnings = sanitize(domain(devices=interface))
    assert root.find("devices/interface") is None and warnings


def test_scripts_and_tap_backends_are_removed_from_kept_interfaces():
    xml = domain(devices="<interface type='network'><source network='default'/><script path='/tmp/x.sh'/>"
                         "<downscript path='/tmp/y.sh'/><backend tap='/dev/net/tun' vhost='/dev/vhost-net'/>"
                         "</interface>")
    root, _ = sanitize(xml)
    interface = root.find("devices/interface")
    assert interface is not None and interface.find("source").get("network") == "default"
    for tag in ("script", "downscript", "backend"):
        assert interface.find(tag) is None


def test_isolate_drops_every_interface():
    xml = domain(devices="<interface type='network'><source network='default'/></interface>"
                         "<interface type='user'/>")
    root, _ = sanitize(xml, isolate=True, scratch_dir="/scratch")
    assert root.find("devices/interface") is None


@pytest.mark.parametrize("device", [
    "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>",
    "<input type='evdev'><source dev='/dev/input/event0'/></input>",
    "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>",
    "<graphics type='vnc' socket='/etc/kbpwn.sock'/>",
    "<graphics type='spice'><listen type='socket' socket='/root/s'/></graphics>",
    "<graphics type='sdl' display=':0'/>",
    "<audio id='1' type='file' path='/etc/kbpwn.wav'/>",
    "<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>",
    "<rng model='virtio'><backend model='egd' type='file'><source path='/etc/shadow'/></backend></rng>",
])
def test_passthrough_inputs_tpms_and_host_path_devices_are_dropped(device):
    root, warnings = sanitize(domain(devices=device))
    tag = ET.fromstring(device).tag
    assert root.find(f"devices/{tag}") is None and warnings


def test_safe_devices_stay():
    safe = ("<input type='tablet' bus='usb'/><graphics type='vnc' port='-1' autoport='yes'/>"
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
            "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
            "<controller type='usb' model='none'/><memballoon model='virtio'/><video><model type='vga'/></video>")
    root, warnings = sanitize(domain(devices=safe))
    for tag in ("input", "graphics", "tpm", "rng", "controller", "memballoon", "video"):
        assert root.find(f"devices/{tag}") is not None, tag
    assert warnings == []


@pytest.mark.parametrize("top, tag", [
    ("<resource><partition>/../../evil</partition></resource>", "resource"),
    ("<bootloader>/usr/bin/pygrub</bootloader>", "bootloader"),
    ("<idmap><uid start='0' target='1000' count='10'/></idmap>", "idmap"),
])
def test_unknown_or_dangerous_top_level_elements_are_removed(top, tag):
    root, warnings = sanitize(domain(top=top))
    assert root.find(tag) is None and any(f"<{tag}>" in w for w in warnings)


def test_memory_backing_file_and_blkiotune_host_devices_are_removed():
    top = ("<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
           "<blkiotune><weight>500</weight><device><path>/dev/sda</path><weight>1000</weight></device></blkiotune>")
    root, _ = sanitize(domain(top=top))
    assert root.find("memoryBacking/source") is None and root.find("memoryBacking/access") is not None
    assert root.find("blkiotune/device") is None and root.findtext("blkiotune/weight") == "500"


def test_malformed_or_foreign_xml_is_one_usage_error():
    with pytest.raises(UsageError, match="not well-formed"):
        sanitize("<domain>")
    with pytest.raises(UsageError, match="not <domain>"):
        sanitize("<network/>")


def test_host_facts_parsers():
    caps = ("<domainCapabilities><path>/usr/bin/qemu-system-x86_64</path><os supported='yes'><loader>"
            "<value>/usr/share/OVMF/OVMF_CODE_4M.fd</value><enum name='type'><value>pflash</value></enum>"
            "</loader></os></domainCapabilities>")
    assert parse_domain_capabilities(caps) == ("/usr/bin/qemu-system-x86_64",
                                               frozenset({"/usr/share/OVMF/OVMF_CODE_4M.fd"}))
    assert capabilities_query(domain()) == ("x86_64", "kvm")
    local = domain(os_extra="<kernel>/srv/k</kernel>",
                   devices="<serial type='file'><source path='/srv/log'/><target port='0'/></serial>")
    assert trusted_paths_of(local) == {"/srv/k", "/srv/log"}
    assert trusted_paths_of(None) == frozenset()


def test_isolation_violations_names_what_an_isolated_copy_must_not_have():
    clean, _ = sanitize_domain_xml(
        domain(devices="<interface type='network'><source network='default'/></interface>"
                       "<serial type='file'><source path='/scratch/serial-x.log'/><target port='0'/></serial>"),
        restored_targets={"vda"}, host=HOST, isolate=True, scratch_dir="/scratch")
    from kvm_borg.xml_sanitize import isolation_violations
    assert isolation_violations(clean, images={IMAGE}, scratch_dir="/scratch") == []
    dirty = domain(top="<seclabel type='none'/><qemu:commandline/>",
                   devices="<interface type='user'/><hostdev mode='subsystem' type='usb'/>"
                           "<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb'/></disk>"
                           "<serial type='file'><source path='/etc/x'/><target port='0'/></serial>")
    problems = isolation_violations(dirty, images={IMAGE}, scratch_dir="/scratch")
    assert len(problems) == 6, problems
