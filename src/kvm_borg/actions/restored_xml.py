"""The restored domain XML as it may be defined here: restore_plan's rewrite, then xml_sanitize with this host's facts."""

from __future__ import annotations

import libvirt

from kvm_borg.engine.host_facts import host_facts
from kvm_borg.restore_plan import RestorePlan
from kvm_borg.xml_sanitize import sanitize_domain_xml


def sanitized_xml(conn: libvirt.virConnect, xml_text: str, plan: RestorePlan, *, isolate: bool = False,
                  scratch_dir: str | None = None) -> tuple[str, list[str]]:
    """Given the rewritten XML of a restore, its plan and whether it is an isolated verify copy (with its
    scratch directory), return (the XML with only what this host allows, warnings naming what was removed).

    Only the plan's disks stay attached; the emulator and firmware are this host's; host paths
    are kept only where the local definition of the archived UUID uses them (kvm_borg.xml_sanitize)."""
    facts = host_facts(conn, xml_text, plan.original_uuid)
    return sanitize_domain_xml(
        xml_text, restored_targets={disk.target for disk in plan.disks}, host=facts,
        nvram=plan.nvram.destination if plan.nvram else None, isolate=isolate, scratch_dir=scratch_dir)
