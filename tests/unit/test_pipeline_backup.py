"""The backup pipeline's orchestration without libvirt: a fake domain under the real engine code, a
fake FrozenSource chosen through the real hook, fake repositories.

Promises: the archive goes into every repository; one failing repository does not stop the others;
the source is always released (after a failed freeze, a failed store, an interrupt); the run's
explicit steps (run state, metrics, prune after backup) reach the summary and the exit code; a
shut-off domain started while its images were read is backed up once more, live."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid as uuid_module
from pathlib import Path
from types import SimpleNamespace

import libvirt
import pytest

from kvm_borg import config, run_state, signals
from kvm_borg.errors import Interrupted, KvmBorgError
from kvm_borg.hookspecs import hookimpl
from kvm_borg.models import FreezeResult, FrozenDisk, PruneResult, ReleaseResult, StoreResult
from kvm_borg.pipeline.backup import run_backup
from kvm_borg.plugins import make_plugin_manager

DOMAIN_XML = """<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>
 <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{image}'/>
  <target dev='vda' bus='virtio'/></disk>
</devices></domain>"""


# --- the fake engine: a libvirt domain and connection as the real engine code reads them ----------


class FakeDom:
    def __init__(self, name: str, image: Path, running: bool):
        self._name, self._uuid, self.running = name, str(uuid_module.uuid4()), running
        self.xml = DOMAIN_XML.format(name=name, uuid=self._uuid, image=image)
        self.xml_error: str | None = None  # set: XMLDesc with VIR_DOMAIN_XML_SECURE fails like libvirt

    def name(self):
        return self._name

    def UUIDString(self):  # noqa: N802 (libvirt's name)
        return self._uuid

    def isActive(self):  # noqa: N802
        return int(self.running)

    def isPersistent(self):  # noqa: N802
        return 1

    def XMLDesc(self, flags):  # noqa: N802
        if self.xml_error and flags & libvirt.VIR_DOMAIN_XML_SECURE:
            raise libvirt_error(self.xml_error)
        return self.xml

    def listAllCheckpoints(self, flags):  # noqa: N802
        return []

    def blockJobInfo(self, target, flags):  # noqa: N802
        return {}


def libvirt_error(message: str) -> libvirt.libvirtError:
    """A libvirtError as libvirt raises it: (code, domain, message, level, ...) in `err`."""
    exc = libvirt.libvirtError(message)
    exc.err = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return exc


class FakeConn:
    def getLibVersion(self):  # noqa: N802
        return 9_000_000

    def getVersion(self):  # noqa: N802
        return 7_002_000

    def storageVolLookupByPath(self, path):  # noqa: N802
        raise libvirt_error("no storage vol with matching path")


class FakeConnection:
    def __init__(self, *doms: FakeDom):
        self.doms = {d.name(): d for d in doms}
        self.conn = FakeConn()

    def lookup(self, name):
        return self.doms[name]


# --- a fake FrozenSource, chosen through the real kvm_borg_frozen_source hook --------------------


class FakeSource:
    """Records every call in `events`; `behaviour` says what to fail."""

    def __init__(self, handle, plan, events: list, behaviour: dict):
        self.handle, self.plan, self.events, self.behaviour = handle, plan, events, behaviour

    def hand_over(self, owner):
        self.events.append(("hand_over", owner))

    def freeze(self):
        self.events.append(("freeze", self.plan.running))
        if self.behaviour.get("freeze_error"):
            raise KvmBorgError(self.behaviour["freeze_error"])
        disk = self.plan.disks[0]
        return FreezeResult([FrozenDisk(disk.target, disk.source, "raw", 4096, disk.source)], quiesced=False,
                            consistency="crash-consistent" if self.plan.running else "offline")

    def mark_stage(self, stage):
        self.events.append(("mark_stage", stage))
        return None

    def release(self):
        self.events.append(("release", self.plan.running))
        if not self.plan.running and self.behaviour.pop("start_while_read", False):
            self.handle.dom.running = True  # the domain was started while its images were read
            return ReleaseResult(warnings=["started while its images were read"], inconsistent=True)
        return ReleaseResult()


class SourcePlugin:
    def __init__(self, events: list, behaviour: dict):
        self.events, self.behaviour = events, behaviour

    @hookimpl(tryfirst=True)
    def kvm_borg_frozen_source(self, domain, plan, settings):
        return FakeSource(domain, plan, self.events, self.behaviour)


class FinishedProbe:
    def __init__(self):
        self.summaries = []

    @hookimpl
    def kvm_borg_backup_finished(self, summary):
        self.summaries.append(summary)


# --- fake repositories -----------------------------------------------------------------------


class FakeBackend:
    exclusive_writes = True

    def __init__(self, name: str, events: list, fail: Exception | None = None, prune_error: str | None = None):
        self.name, self.location, self.events, self.fail, self.prune_error = name, f"/repos/{name}", events, fail, \
            prune_error
        self.requests, self.pruned = [], []

    def store(self, request):
        self.events.append(("store", self.name))
        if self.fail is not None:
            raise self.fail
        self.requests.append(request)
        return StoreResult(self.name, ok=True, archive=request.archive_name, original_size=4096)

    def prune(self, domain, policy, dry_run=False):
        self.pruned.append((domain, policy))
        if self.prune_error:
            return PruneResult(self.name, domain, ok=False, error=self.prune_error)
        return PruneResult(self.name, domain, ok=True, kept={"a": "keep_daily"})

    def compact(self):
        raise AssertionError("nothing was pruned: no compact")


# --- the world --------------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path):
    """A state_dir, one domain image, the events list, a plugin manager with the fake source."""
    image = tmp_path / "images" / "web.raw"
    image.parent.mkdir()
    image.write_bytes(b"\0" * 4096)
    events: list = []
    behaviour: dict = {}
    pm = make_plugin_manager(entry_points=False)
    pm.register(SourcePlugin(events, behaviour))
    probe = FinishedProbe()
    pm.register(probe)
    return SimpleNamespace(tmp=tmp_path, image=image, events=events, behaviour=behaviour, pm=pm, probe=probe)


def context(world, dom: FakeDom, backends, **settings_fields):
    fields = dict(libvirt_uri="qemu:///system", state_dir=world.tmp / "state", overlay_dir=None,
                  overlay_min_free=0, quiesce="auto", guest_agent_timeout=1.0, commit_timeout=1.0,
                  commit_retries=1, domains={"disks_exclude": {}}, plugins=[], borg_binary=None,
                  restic_binary=None, hostname="hv1", repositories=[{"name": b.name} for b in backends])
    settings = config.Settings(**{**fields, **settings_fields})
    return SimpleNamespace(settings=settings, pm=world.pm, connection=FakeConnection(dom))


def repos(*backends):
    return [({"name": b.name}, b) for b in backends]


def test_the_archive_goes_into_every_repository_and_the_source_is_released_after(world):
    dom = FakeDom("web", world.image, running=True)
    a, b = FakeBackend("a", world.events), FakeBackend("b", world.events)
    ctx = context(world, dom, [a, b])
    summary = run_backup(ctx, ["web"], repos(a, b), [])
    [result] = summary.domains
    assert result.ok and [s.repository for s in result.stores] == ["a", "b"] and summary.exit_code == 0
    assert world.events.index(("release", True)) > max(world.events.index(("store", "a")),
                                                       world.events.index(("store", "b")))
    assert world.events[0] == ("freeze", True) and ("mark_stage", "storing") in world.events
    [request] = a.requests
    assert request.archive_name.startswith("web-") and request.files[-1] == str(world.image)
    meta_path = Path(request.files[0])
    assert meta_path.name == "meta.json" and not meta_path.exists()  # the staging files are removed
    assert json.loads(request.comment)["domain"] == "web" and b.requests == [request]
    assert world.probe.summaries == [summary]


def test_one_failing_repository_does_not_stop_the_others(world):
    dom = FakeDom("web", world.image, running=True)
    broken = FakeBackend("a", world.events, fail=KvmBorgError("repository 'a': unreachable"))
    good = FakeBackend("b", world.events)
    summary = run_backup(context(world, dom, [broken, good]), ["web"], repos(broken, good), [])
    [result] = summary.domains
    stores = {s.repository: s for s in result.stores}
    assert not stores["a"].ok and stores["a"].error == "repository 'a': unreachable"
    assert stores["b"].ok and len(good.requests) == 1
    assert not result.ok and result.error == "repository a failed" and summary.exit_code == 2
    assert world.events[-1] == ("release", True)


def test_a_failed_freeze_still_releases_and_fails_only_that_domain(world):
    dom = FakeDom("web", world.image, running=True)
    world.behaviour["freeze_error"] = "domain 'web': snapshot failed: no space"
    backend = FakeBackend("a", world.events)
    summary = run_backup(context(world, dom, [backend]), ["web"], repos(backend), [])
    [result] = summary.domains
    assert not result.ok and result.error == "domain 'web': snapshot failed: no space"
    assert world.events == [("freeze", True), ("release", True)] and backend.requests == []
    assert summary.exit_code == 2


def test_a_libvirt_failure_while_capturing_is_the_domains_one_line_and_the_source_is_released(world):
    dom = FakeDom("web", world.image, running=True)
    dom.xml_error = "Domain not found"
    backend = FakeBackend("a", world.events)
    summary = run_backup(context(world, dom, [backend]), ["web"], repos(backend), [])
    [result] = summary.domains
    assert result.error == "domain 'web': libvirt: Domain not found"
    assert ("release", True) in world.events and backend.requests == []


def test_an_interrupt_while_storing_releases_records_the_run_and_propagates(world):
    dom = FakeDom("web", world.image, running=True)
    backend = FakeBackend("a", world.events, fail=Interrupted(15))
    ctx = context(world, dom, [backend])
    with pytest.raises(Interrupted):
        run_backup(ctx, ["web"], repos(backend), [])
    assert world.events[-1] == ("release", True)
    state = run_state.load(ctx.settings.state_dir)
    assert "last_run" in state and len(world.probe.summaries) == 1  # the steps ran, the notifiers were told


def test_the_run_is_recorded_for_status(world):
    dom = FakeDom("web", world.image, running=True)
    backend = FakeBackend("a", world.events)
    ctx = context(world, dom, [backend])
    run_backup(ctx, ["web"], repos(backend), [])
    state = run_state.load(ctx.settings.state_dir)
    assert state["last_run"]["exit_code"] == 0
    assert state["domains"]["web"]["repositories"]["a"]["last_success"]["archive"].startswith("web-")


def test_a_run_state_that_cannot_be_written_is_a_warning_exit_1(world):
    dom = FakeDom("web", world.image, running=True)
    backend = FakeBackend("a", world.events)
    ctx = context(world, dom, [backend])
    (ctx.settings.state_dir / run_state.STATE_NAME).mkdir(parents=True)  # the file's place is taken
    summary = run_backup(ctx, ["web"], repos(backend), [])
    assert summary.domains[0].ok and summary.exit_code == 1
    assert [w for w in summary.warnings if w.startswith("cannot record the run in ")]
    assert summary.as_dict()["warnings"] == summary.warnings


def test_a_metrics_file_that_cannot_be_written_is_a_warning_exit_1(world):
    dom = FakeDom("web", world.image, running=True)
    backend = FakeBackend("a", world.events)
    blocker = world.tmp / "not-a-dir"
    blocker.write_text("")
    ctx = context(world, dom, [backend], metrics_file=str(blocker / "kvm_borg.prom"))
    summary = run_backup(ctx, ["web"], repos(backend), [])
    assert summary.domains[0].ok and summary.exit_code == 1
    [warning] = summary.warnings
    assert warning.startswith(f"cannot write metrics_file {blocker / 'kvm_borg.prom'}: ")


def test_the_metrics_file_is_written_from_the_run_state(world):
    dom = FakeDom("web", world.image, running=True)
    backend = FakeBackend("a", world.events)
    metrics = world.tmp / "metrics" / "kvm_borg.prom"
    summary = run_backup(context(world, dom, [backend], metrics_file=str(metrics)), ["web"], repos(backend), [])
    assert summary.exit_code == 0 and 'domain="web"' in metrics.read_text()


def test_prune_after_backup_prunes_where_the_domain_was_stored(world):
    dom = FakeDom("web", world.image, running=True)
    stored = FakeBackend("a", world.events)
    failed = FakeBackend("b", world.events, fail=KvmBorgError("down"))
    ctx = context(world, dom, [stored, failed], prune_after_backup=True)
    summary = run_backup(ctx, ["web"], repos(stored, failed), [])
    # the domain failed in b, so it is not ok and nothing is pruned at all
    assert summary.domains[0].ok is False and stored.pruned == [] and failed.pruned == []
    ok_only = FakeBackend("c", world.events)
    summary = run_backup(context(world, dom, [ok_only], prune_after_backup=True), ["web"], repos(ok_only), [])
    assert [domain for domain, _policy in ok_only.pruned] == ["web"] and summary.exit_code == 0


def test_a_failing_prune_after_backup_is_an_error_exit_2(world):
    dom = FakeDom("web", world.image, running=True)
    backend = FakeBackend("a", world.events, prune_error="repository locked")
    ctx = context(world, dom, [backend], prune_after_backup=True)
    summary = run_backup(ctx, ["web"], repos(backend), [])
    assert summary.domains[0].ok and summary.exit_code == 2
    assert summary.errors == ["prune: domain 'web' in a: repository locked (prune after backup)"]
    state = run_state.load(ctx.settings.state_dir)
    assert state["last_run"]["exit_code"] == 2  # the recorded run includes the prune step
    assert state["repositories"]["a"]["last_prune"]["ok"] is False


def test_an_unwritable_metrics_file_is_one_warning_even_with_prune_after_backup(world):
    dom = FakeDom("web", world.image, running=True)
    backend = FakeBackend("a", world.events)
    blocker = world.tmp / "not-a-dir"
    blocker.write_text("")
    ctx = context(world, dom, [backend], prune_after_backup=True, metrics_file=str(blocker / "kvm_borg.prom"))
    summary = run_backup(ctx, ["web"], repos(backend), [])
    assert len(summary.warnings) == 1 and summary.exit_code == 1 and backend.pruned


def test_no_prune_after_an_interrupt(world):
    dom = FakeDom("web", world.image, running=True)
    good = FakeBackend("a", world.events)
    second = FakeDom("db", world.image, running=True)
    ctx = context(world, dom, [good], prune_after_backup=True)
    ctx.connection.doms["db"] = second

    class InterruptSecond(FakeBackend):
        def store(self, request):
            if request.domain == "db":
                raise Interrupted(2)
            return super().store(request)

    interrupting = InterruptSecond("a", world.events)
    with pytest.raises(Interrupted):
        run_backup(ctx, ["web", "db"], repos(interrupting), [])
    assert interrupting.pruned == []  # web succeeded, but an interrupted run starts no further work


def test_a_shut_off_domain_started_while_read_is_backed_up_again_live(world):
    dom = FakeDom("web", world.image, running=False)
    world.behaviour["start_while_read"] = True
    backend = FakeBackend("a", world.events)
    summary = run_backup(context(world, dom, [backend]), ["web"], repos(backend), [])
    [result] = summary.domains
    freezes = [e for e in world.events if e[0] == "freeze"]
    assert freezes == [("freeze", False), ("freeze", True)]
    assert len(backend.requests) == 2 and result.ok and result.consistency == "crash-consistent"
    assert any("may be inconsistent" in w and "taking a live backup now" in w for w in result.warnings)
    assert [s.archive for s in result.stores] == [backend.requests[1].archive_name]  # the live one counts
    assert summary.exit_code == 1


# --- several domains at once (`jobs`) --------------------------------------------------------------


class TimedBackend(FakeBackend):
    """A FakeBackend whose store takes `seconds[domain]` and records how many stores ran at once."""

    def __init__(self, name, events, seconds: dict, exclusive: bool, interrupt_on: str | None = None):
        super().__init__(name, events)
        self.exclusive_writes = exclusive
        self.seconds, self.interrupt_on = seconds, interrupt_on
        self.guard, self.now, self.most = threading.Lock(), 0, 0
        self.stored: list[str] = []

    def store(self, request):
        with self.guard:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            if request.domain == self.interrupt_on:
                os.kill(os.getpid(), signal.SIGTERM)  # reaches the main thread, as a real SIGTERM does
            time.sleep(self.seconds.get(request.domain, 0.05))
            with self.guard:
                self.stored.append(request.domain)
            return super().store(request)
        finally:
            with self.guard:
                self.now -= 1


def parallel_world(world, names, backends, jobs):
    doms = [FakeDom(name, world.image, running=True) for name in names]
    ctx = context(world, doms[0], backends, jobs=jobs)
    ctx.connection.doms.update({d.name(): d for d in doms})
    return ctx


def test_jobs_2_backs_two_domains_up_at_once_and_lists_them_in_the_run_order(world):
    names = ["slow", "quick", "third"]
    backend = TimedBackend("restic-like", world.events, {"slow": 0.6}, exclusive=False)
    finished = []
    ctx = parallel_world(world, names, [backend], jobs=2)
    summary = run_backup(ctx, names, repos(backend), [], on_finished=lambda done, total, r: finished.append(r.domain))
    assert [d.domain for d in summary.domains] == names and all(d.ok for d in summary.domains)
    assert finished[0] == "quick" and finished[-1] == "slow"  # they finished in another order
    assert backend.most == 2
    assert world.events.count(("release", True)) == world.events.count(("freeze", True)) == 3


def test_a_repository_with_exclusive_writes_takes_one_domain_at_a_time_the_others_in_parallel(world):
    names = ["a1", "a2", "a3", "a4"]
    borg = TimedBackend("borg-like", world.events, {n: 0.2 for n in names}, exclusive=True)
    restic = TimedBackend("restic-like", world.events, {n: 0.2 for n in names}, exclusive=False)
    ctx = parallel_world(world, names, [borg, restic], jobs=3)
    summary = run_backup(ctx, names, repos(borg, restic), [])
    assert summary.exit_code == 0 and [d.domain for d in summary.domains] == names
    assert borg.most == 1 and restic.most >= 2 and sorted(borg.stored) == names


def test_an_interrupt_during_a_parallel_run_merges_every_frozen_domain_and_starts_no_other(world):
    names = ["first", "second", "third", "fourth"]
    backend = TimedBackend("a", world.events, {"first": 0.5, "second": 0.5}, exclusive=False, interrupt_on="second")
    ctx = parallel_world(world, names, [backend], jobs=2)
    with signals.interruptible(), pytest.raises(Interrupted):
        run_backup(ctx, names, repos(backend), [])
    freezes = world.events.count(("freeze", True))
    assert freezes == 2 and world.events.count(("release", True)) == 2  # third and fourth never started
    [summary] = world.probe.summaries  # the steps ran and the notifiers were told
    assert all(d.domain in ("first", "second") for d in summary.domains)
    assert signals.stop_requested() is None  # a later run in this process starts clean
