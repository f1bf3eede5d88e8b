"""Domain lifecycle for restore, verify and doctor: look up, define, start, undefine, destroy, ask the
guest agent, and read what the running domains use.

A libvirt error leaves this module as an EngineError ("libvirt: " and libvirt's one-line message),
so callers outside the engine never catch libvirt's own exception class. Domains are
passed around as the opaque objects `lookup` returns.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import libvirt

from kvm_borg.engine.libvirt_errors import translated
from kvm_borg.errors import EngineError, KvmBorgError

log = logging.getLogger(__name__)

# Restore replaces a definition but keeps what the guest wrote into its firmware and TPM.
_UNDEFINE_KEEP_STATE = libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM
# A throwaway copy (verify, doctor) goes with everything libvirt keeps for it.
_UNDEFINE_ALL = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_TPM
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
_STATE_NAMES = {libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
                libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down"}


@dataclass(frozen=True)
class DomainFacts:
    """A defined domain as restore's refusals need it: its name, UUID and whether it runs."""

    name: str
    uuid: str
    active: bool


def lookup(conn, name: str):
    """Given a connection and a domain name, return the domain, or None if there is none of that name."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def facts(conn, name: str) -> DomainFacts | None:
    """Given a domain name, return its DomainFacts, or None if no domain has that name."""
    dom = lookup(conn, name)
    if dom is None:
        return None
    with translated():
        return DomainFacts(dom.name(), dom.UUIDString(), bool(dom.isActive()))


def facts_by_uuid(conn, uuid: str) -> DomainFacts | None:
    """Given a domain UUID, return its DomainFacts, or None if no domain has that UUID."""
    try:
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError:
        return None
    with translated():
        return DomainFacts(dom.name(), dom.UUIDString(), bool(dom.isActive()))


def inactive_xml(conn, name: str) -> str | None:
    """Given a domain name, return its persistent (inactive) XML, or None if no domain has that name."""
    dom = lookup(conn, name)
    if dom is None:
        return None
    with translated():
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def live_xml(dom) -> str:
    """Given a domain, return its live XML."""
    with translated():
        return dom.XMLDesc(0)


def active_domains(conn) -> list[tuple[str, str, str]]:
    """Return (name, UUID, live XML) of every running domain; one that stops while it is read is left out."""
    result = []
    with translated():
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    for dom in domains:
        try:
            result.append((dom.name(), dom.UUIDString(), dom.XMLDesc(0)))
        except libvirt.libvirtError:
            continue
    return result


def domain_names(conn) -> list[str]:
    """Given a connection, return the names of every domain of this host (running or not)."""
    with translated():
        return [dom.name() for dom in conn.listAllDomains(0)]


def network_exists(conn, name: str) -> bool:
    """Given a libvirt network name, return whether this host has that network."""
    try:
        conn.networkLookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def define(conn, xml_text: str):
    """Given a domain XML, define (or redefine) it persistently; return the domain."""
    with translated():
        return conn.defineXML(xml_text)


def start(dom) -> None:
    """Given a defined domain, start it."""
    with translated():
        dom.create()


def undefine_keeping_state(dom) -> None:
    """Given a shut-off domain, undefine it, keeping its NVRAM file and TPM state on disk."""
    with translated():
        dom.undefineFlags(_UNDEFINE_KEEP_STATE)


def remove(conn, name: str) -> list[str]:
    """Given the name of a throwaway domain, destroy it if it runs and undefine it with its NVRAM, TPM
    state, snapshot metadata and managed save; return what could not be done (nothing if it is gone)."""
    dom = lookup(conn, name)
    if dom is None:
        return []
    problems = []
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        problems.append(f"cannot destroy {name}: {exc.get_error_message()}")
    try:
        dom.undefineFlags(_UNDEFINE_ALL)
    except libvirt.libvirtError as exc:
        problems.append(f"cannot undefine {name}: {exc.get_error_message()}")
    return problems


def check_running(dom) -> None:
    """Given a started domain, raise KvmBorgError unless it is running (paused, shut off, crashed...)."""
    with translated():
        state, reason = dom.state()
    if state != libvirt.VIR_DOMAIN_RUNNING:
        raise KvmBorgError(f"the restored copy is {_STATE_NAMES.get(state, f'in state {state}')} (reason {reason})")


def agent_command(dom, execute: str, arguments: dict | None = None, timeout: float = 5) -> object:
    """Given a running domain, a guest agent command name, its arguments and a timeout in seconds (at least
    1), send it through the guest agent; return the reply's "return" value."""
    import libvirt_qemu  # only verify asks the guest agent: a backup's start-up does not load libvirtmod_qemu

    command = {"execute": execute} if arguments is None else {"execute": execute, "arguments": arguments}
    with translated():
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), max(1, int(timeout)), 0)
    return json.loads(reply)["return"]


def wait_for_sign_of_life(dom, agent: bool, timeout: float, alive_seconds: float, poll=None) -> dict:
    """Given a started domain, whether it has a guest agent channel, how long to wait for the agent and
    (without one) how long it must keep running, and a callable `poll()` to call between two looks (None:
    nothing), return {sign_of_life, seconds}; a dead or silent guest is a KvmBorgError.

    With a guest agent channel the sign is an answered guest-ping; without one, the domain
    still running (not paused, not crashed) after `alive_seconds`."""
    started = time.monotonic()
    if agent:
        last = "no answer"
        while time.monotonic() - started < timeout:
            if poll is not None:
                poll()
            check_running(dom)
            try:
                agent_command(dom, "guest-ping", timeout=5)
                return {"sign_of_life": "guest agent answered guest-ping", "seconds": time.monotonic() - started}
            except EngineError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise KvmBorgError(f"the guest agent did not answer within {timeout:.0f}s ({last})")
    deadline = started + alive_seconds
    while time.monotonic() < deadline:
        if poll is not None:
            poll()
        check_running(dom)
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    check_running(dom)
    return {"sign_of_life": f"still running after {alive_seconds:g}s", "seconds": time.monotonic() - started}
