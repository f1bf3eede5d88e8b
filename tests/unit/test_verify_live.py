"""`verify --boot --live`'s pure parts: the isolation check of a copy that runs on the exposed archive, its
text report, and the live restore's advance_pull that keeps one disk's pull going while the drill waits."""

from __future__ import annotations

import libvirt
import pytest

from kvm_borg import live_restore_plan as lrp
from kvm_borg.actions.verify import VerifyReport, live_isolation_violations, live_report_lines
from kvm_borg.errors import KvmBorgError
from kvm_borg.pipeline.live_restore import advance_pull

COPY = """<domain type='kvm'><name>kvm-borg-verify-web-1a2b3c</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/s/drill-x/c-vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='/s/drill-x/serial.log'/><target port='0'/></serial>
</devices></domain>"""
ARCHIVE = "/state/live/u/archive/var/lib/libvirt/images/web-vda.qcow2"


def test_a_live_copy_is_isolated_when_its_only_backing_file_is_the_exposed_archive():
    live = lrp.live_domain_xml(COPY, {"vda": (ARCHIVE, "qcow2")})
    images = {"/s/drill-x/c-vda.qcow2"}
    assert live_isolation_violations(live, images=images, backings={"vda": ARCHIVE}, scratch_dir="/s/drill-x") == []
    other = lrp.live_domain_xml(COPY, {"vda": ("/var/lib/libvirt/images/web-vda.qcow2", "qcow2")})
    [problem] = live_isolation_violations(other, images=images, backings={"vda": ARCHIVE}, scratch_dir="/s/drill-x")
    assert "not the exposed archive" in problem
    with_net = live.replace("</devices>", "<interface type='network'><source network='default'/></interface></devices>")
    assert live_isolation_violations(with_net, images=images, backings={"vda": ARCHIVE},
                                     scratch_dir="/s/drill-x") == ["<interface type='network'>"]


def test_the_live_drill_report_says_when_the_copy_ran_showed_life_and_whether_the_pull_ended():
    report = VerifyReport("web", live=True, running_after_seconds=2.04, sign_of_life_after_seconds=9.5,
                          rto_seconds=9.5, boot={"sign_of_life": "guest agent answered guest-ping", "seconds": 7.4},
                          pull={"done": False, "done_after_seconds": None, "not_pulled": ["vda", "vdb"]})
    assert live_report_lines(report) == [
        "running after 2.0s (booted live from the archive)",
        "sign of life after 9.5s: guest agent answered guest-ping",
        "pull not done when the guest showed life (vda, vdb not pulled in yet): the drill stopped it and removed "
        "the copy",
        "RTO (time to the first sign of life, booted live): 9.5s"]
    report.pull = {"done": True, "done_after_seconds": 4.0, "not_pulled": []}
    assert "pull done after 4.0s" in live_report_lines(report)


class FakeDomain:
    """A running domain whose disks `backed` still have a backing file, `jobs` a running pull."""

    def __init__(self, backed, jobs=(), state=(libvirt.VIR_DOMAIN_RUNNING, 1)):
        self.backed, self.jobs, self._state, self.pulls = set(backed), set(jobs), state, []

    def XMLDesc(self, _flags):
        disks = "".join(f"<disk><source file='/i/{t}'/>"
                        + (f"<backingStore type='file'><source file='/a/{t}'/></backingStore>" if t in self.backed
                           else "") + f"<target dev='{t}'/></disk>" for t in ("vda", "vdb"))
        return f"<domain><devices>{disks}</devices></domain>"

    def blockJobInfo(self, target, _flags):
        return {"cur": 1, "end": 2} if target in self.jobs else {}

    def blockPull(self, target, bandwidth, _flags):
        self.pulls.append((target, bandwidth))
        self.jobs.add(target)

    def isActive(self):
        return self._state[0] != libvirt.VIR_DOMAIN_SHUTOFF

    def state(self):
        return list(self._state)


def test_advance_pull_starts_one_disk_at_a_time_and_says_when_all_are_pulled():
    dom = FakeDomain({"vda", "vdb"})
    assert advance_pull(dom, {"vda", "vdb"}, 1 << 20) is False
    assert dom.pulls == [("vda", 1 << 20)]
    assert advance_pull(dom, {"vda", "vdb"}) is False and len(dom.pulls) == 1  # vda's pull runs
    dom.backed.discard("vda"), dom.jobs.discard("vda")
    assert advance_pull(dom, {"vda", "vdb"}) is False and dom.pulls[-1] == ("vdb", 0)
    dom.backed.clear(), dom.jobs.clear()
    assert advance_pull(dom, {"vda", "vdb"}) is True


@pytest.mark.parametrize("state, message", [
    ((libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR), "paused"),
    ((libvirt.VIR_DOMAIN_SHUTOFF, 1), "stopped"),
])
def test_advance_pull_fails_on_a_guest_paused_on_a_read_error_or_a_stopped_domain(state, message):
    with pytest.raises(KvmBorgError, match=message):
        advance_pull(FakeDomain({"vda"}, state=state), {"vda"})
