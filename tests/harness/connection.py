"""A libvirt connection for the whole test session that survives a libvirtd restart.

The fault tests restart libvirtd on purpose; every later test must still reach it. Each
attribute access checks the connection is alive and reopens it if not; virDomain handles are
looked up afresh by the harness, so they come from the live connection.
"""

from __future__ import annotations

import time

import libvirt


class ReconnectingConnection:
    """Proxy to a libvirt.virConnect that reopens itself after libvirtd went away."""

    def __init__(self, uri: str):
        self._uri = uri
        self._conn = libvirt.open(uri)

    def _live(self) -> libvirt.virConnect:
        try:
            if self._conn.isAlive():
                self._conn.getLibVersion()  # without an event loop isAlive() misses a closed socket
                return self._conn
        except libvirt.libvirtError:
            pass
        deadline = time.monotonic() + 60
        while True:  # libvirtd may still be starting
            try:
                self._conn = libvirt.open(self._uri)
                return self._conn
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def __getattr__(self, name):
        return getattr(self._live(), name)
