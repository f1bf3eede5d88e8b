"""Freeze and thaw for an outside reader (`kvm-borg freeze --expose DIR` / `kvm-borg thaw`, for borgmatic).

`freeze_domain` runs the backup pipeline's first steps (plan, the FrozenSource the plugins choose,
handed over to exposure.OWNER so it is journaled for thaw/recover, capture + stage) and then,
instead of storing, exposes the frozen images read-only at stable paths under DIR/<domain>
(kvm_borg.pipeline.exposure). `run_thaw` completes each such journal entry through the plugins
(kvm_borg.default_plugins.freeze_exposure withdraws the exposure, the source's plugin merges back);
idempotent and safe after a failed or partial freeze. `ctx` is the command's context (`.settings`,
`.pm`, `.connection`).
"""

from __future__ import annotations

import logging
import os
import uuid as uuid_module
from pathlib import Path

from kvm_borg import journal, metadata
from kvm_borg.models import RecoveryReport
from kvm_borg.engine.planning import handle_for, make_plan
from kvm_borg.errors import KvmBorgError, RefusedError
from kvm_borg.locks import domain_lock
from kvm_borg.pipeline import exposure, staging
from kvm_borg.pipeline.backup import choose_source, prepare_state_dir
from kvm_borg.plugins import notify

log = logging.getLogger(__name__)


# --- freeze -------------------------------------------------------------------------------------


def freeze_domain(ctx, name: str, expose_dir: Path, excluded: list[str]) -> dict:
    """Given a domain name and DIR, freeze it and expose it under DIR/<name>; return {domain, ok, ...}.

    On any failure everything done so far is undone (unmounted, merged back, removed)."""
    settings = ctx.settings
    outcome = {"domain": name, "ok": False, "consistency": None, "path": None, "warnings": [], "error": None}
    try:
        handle = handle_for(ctx.connection, name)
        prepare_state_dir(settings)
        with domain_lock(settings.lock_dir, handle.uuid, name):
            _freeze_locked(ctx, handle, expose_dir, excluded, outcome)
    except Exception as exc:  # any type: reported for this domain, the others are still frozen
        outcome["error"] = str(exc)
        if not isinstance(exc, (KvmBorgError, OSError)):
            outcome["error"] = f"unexpected error: {type(exc).__name__}: {exc}"
            log.debug("traceback of the unexpected error", exc_info=True)  # shown with -vv
        log.error("domain '%s': freeze failed: %s", name, outcome["error"])
    return outcome


def _freeze_locked(ctx, handle, expose_dir: Path, excluded: list[str], outcome: dict) -> None:
    settings, name = ctx.settings, handle.name
    timestamp = metadata.utc_timestamp()
    plan = make_plan(handle, settings, excluded, timestamp)
    outcome["warnings"].extend(plan.warnings)
    domain_dir = expose_dir / name
    if os.path.lexists(domain_dir):
        raise RefusedError(f"domain '{name}': {domain_dir} exists (left by an earlier freeze?): "
                           f"run `kvm-borg thaw --expose {expose_dir}` first")
    record = {"domain": name, "uuid": plan.uuid, "expose_dir": str(expose_dir), "domain_dir": str(domain_dir),
              "running": plan.running, "mounts": [], "images": {}, "marker": uuid_module.uuid4().hex}
    exposure.write_record(settings, record)  # before anything changes, like the journal
    source = None
    try:
        source = choose_source(ctx, handle, plan)
        source.hand_over(exposure.OWNER)  # journaled for thaw/recover, which withdraw the exposure first
        if plan.running:
            notify(ctx.pm, "kvm_borg_before_snapshot", domain=name, disks=list(plan.disks), quiesce=plan.quiesce)
        freeze = source.freeze()
        if plan.running:
            notify(ctx.pm, "kvm_borg_after_snapshot", domain=name, disks=freeze.disks, quiesced=freeze.quiesced,
                   seconds=freeze.freeze_seconds)
        outcome["consistency"] = freeze.consistency
        outcome["warnings"].extend(freeze.warnings)
        exposed = exposure.exposure_paths(domain_dir, freeze.disks)
        staged = staging.capture_and_stage(handle, plan, freeze, settings, domain_dir,
                                           archive=metadata.archive_name(name, timestamp), timestamp=timestamp,
                                           exposed=exposed)
        outcome["warnings"].extend(f"domain '{name}': not exposed: {piece}" for piece in staged.missing)
        exposure.write_marker(domain_dir, {"run": record["marker"], "domain": name, "uuid": plan.uuid,
                                           "files": exposure.created_paths(domain_dir, exposed.values())})
        record["mounts"] = list(exposed.values())
        record["images"] = exposure.image_stamps(exposed) if not plan.running else {}
        exposure.write_record(settings, record)
        for host_path, target in exposed.items():
            exposure.bind_read_only(host_path, target)
        outcome["warnings"].extend(filter(None, [source.mark_stage("exposed")]))
        outcome.update(ok=True, path=str(domain_dir))
        for warning in outcome["warnings"]:
            log.warning("%s", warning)
        log.info("domain '%s': frozen (%s), exposed at %s", name, freeze.consistency, domain_dir)
    except BaseException:
        try:
            exposure.remove_exposure(record, RecoveryReport(name))
        finally:
            if source is not None:
                source.release()
            exposure.remove_record(settings, plan.uuid)
        raise


# --- thaw ---------------------------------------------------------------------------------------


def thaw_one(ctx, uuid: str, name: str) -> RecoveryReport:
    """Given a frozen domain's UUID and name (its lock held), complete its journal entry through the
    plugins, or, when only its exposure record is left, withdraw that; return the report."""
    settings = ctx.settings
    entry = journal.read_entry(settings.journal_dir, uuid)
    if entry is not None:
        report = ctx.pm.hook.kvm_borg_recover_entry(entry=entry, connection=ctx.connection, settings=settings)
        if report is None:
            raise KvmBorgError(f"no plugin can release entries of source {entry.source!r}")
        return report
    report = RecoveryReport(name)
    record = exposure.record_for(settings, uuid)
    if record is not None:
        exposure.withdraw(record, report)
        exposure.remove_record(settings, uuid)
    return report


def run_thaw(ctx, expose_dir: Path | None, names: list[str]) -> list[dict]:
    """Given DIR (None: every exposure) and domain names (empty: all), thaw what `freeze` left; idempotent."""
    settings = ctx.settings
    entries = {e.uuid: e for e in journal.list_entries(settings.journal_dir) if e.owner == exposure.OWNER}
    records = {r["uuid"]: r for r in exposure.read_records(settings)}
    outcomes = []
    for uuid in list(dict.fromkeys([*records, *entries])):
        record, entry = records.get(uuid), entries.get(uuid)
        name = entry.domain if entry is not None else record["domain"]
        if names and name not in names:
            continue
        if expose_dir is not None and record is not None and Path(record["expose_dir"]) != expose_dir:
            continue
        outcome = {"domain": name, "ok": False, "actions": [], "warnings": [], "error": None}
        try:
            with domain_lock(settings.lock_dir, uuid, name):
                report = thaw_one(ctx, uuid, name)
                outcome.update(ok=True, actions=report.actions, warnings=report.warnings)
        except KvmBorgError as exc:
            outcome["error"] = str(exc)
            log.error("domain '%s': thaw failed: %s", name, exc)
        except Exception as exc:  # any type: reported for this domain, the others are still thawed
            outcome["error"] = f"{type(exc).__name__}: {exc}"
            log.error("domain '%s': thaw failed: %s", name, outcome["error"])
            log.debug("traceback", exc_info=True)
        outcomes.append(outcome)
    if expose_dir is not None and expose_dir.is_dir():
        exposure.remove_stale_domain_dirs(expose_dir, settings)
    return outcomes
