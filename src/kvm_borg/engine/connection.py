"""The libvirt connection, its event loop thread, and waiting for block-job events.

Block-job readiness is taken from libvirt's BLOCK_JOB_2 READY event (keyed by disk target),
double-checked against the `<mirror ready='yes'>` flag libvirt keeps in the live XML; a
`cur == end` poll of blockJobInfo is never treated as readiness.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import libvirt

from kvm_borg.errors import KvmBorgError

log = logging.getLogger(__name__)

_event_loop_lock = threading.Lock()
_event_loop_started = False

JOB_STATUS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}


def _ignore_libvirt_errors(_ctx, _err):
    """libvirt prints every error to stderr by default; we report them ourselves."""


def start_event_loop() -> None:
    """Register libvirt's default event implementation once and run it in a daemon thread."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_errors, None)
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass
class JobEvent:
    uuid: str
    target: str
    job_type: int
    status: str
    at: float


class BlockJobEvents:
    """Collects BLOCK_JOB_2 events of one connection so a caller can wait for a disk's READY."""

    def __init__(self, conn: libvirt.virConnect):
        self._cond = threading.Condition()
        self._events: list[JobEvent] = []
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_event, None
        )

    def _on_event(self, _conn, dom, target, job_type, status, _opaque):
        event = JobEvent(dom.UUIDString(), target, job_type, JOB_STATUS.get(status, str(status)), time.monotonic())
        log.debug("block job event: %s %s %s", dom.name(), target, event.status)
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def forget(self, uuid: str, target: str) -> None:
        """Drop remembered events of one disk (before starting a new job on it)."""
        with self._cond:
            self._events = [e for e in self._events if (e.uuid, e.target) != (uuid, target)]

    def latest(self, uuid: str, target: str) -> JobEvent | None:
        with self._cond:
            for event in reversed(self._events):
                if (event.uuid, event.target) == (uuid, target):
                    return event
        return None

    def wait(self, uuid: str, target: str, predicate, timeout: float) -> JobEvent | None:
        """Wait up to `timeout` s until predicate(latest event or None) is true; return that event."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                event = None
                for candidate in reversed(self._events):
                    if (candidate.uuid, candidate.target) == (uuid, target):
                        event = candidate
                        break
                if predicate(event):
                    return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return event
                self._cond.wait(min(remaining, 1.0))


class Connection:
    """An open libvirt connection with its block-job event collector."""

    def __init__(self, uri: str):
        start_event_loop()
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise KvmBorgError(
                f"cannot connect to libvirt at {uri}: {exc.get_error_message()} (is libvirtd running?)"
            ) from None
        self.uri = uri
        self.block_jobs = BlockJobEvents(self.conn)
        self._reconnecting = threading.Lock()

    def reconnect_if_dead(self) -> bool:
        """Reopen the connection when libvirtd went away (restart); return True if it was reopened, by
        this call or by another thread's meanwhile (with `jobs > 1` several domains' threads notice the
        same restart: one reconnects, the others use its connection rather than closing it again).

        Raises libvirt.libvirtError while libvirtd is still down (callers retry)."""
        seen = self.conn
        try:
            if seen.isAlive():
                seen.getLibVersion()  # a cheap round trip: isAlive() can lag behind a closed socket
                return False
        except libvirt.libvirtError:
            pass
        with self._reconnecting:
            if self.conn is not seen:  # another thread reconnected since we looked
                return True
            log.warning("connection to libvirtd at %s lost; reconnecting", self.uri)
            try:
                seen.close()
            except libvirt.libvirtError:
                pass
            conn = libvirt.open(self.uri)
            self.block_jobs = BlockJobEvents(conn)
            self.conn = conn
        return True

    def lookup(self, name: str) -> libvirt.virDomain:
        """Given a domain name, return it; a missing one is a one-line KvmBorgError."""
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise KvmBorgError(f"domain {name!r} does not exist") from None
            raise

    def lookup_uuid(self, uuid: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass
