"""`kvm-borg recover`: complete what interrupted runs left in the journal. Idempotent."""

from __future__ import annotations

import logging

from kvm_borg import journal, run_record, run_state
from kvm_borg.actions.common import Context, print_json
from kvm_borg.errors import KvmBorgError, LockedError, UsageError, exit_code
from kvm_borg.locks import domain_lock

log = logging.getLogger(__name__)


def run_recover(ctx: Context, names: list[str]) -> list[dict]:
    """Given domain names (empty: every entry), complete their journal entries.

    Returns one dict per entry: {domain, ok, actions, warnings, error}. A domain whose lock is
    held by a running backup is reported, not touched. An unreadable or corrupt entry file is
    reported as one failed outcome naming the file (domain None; with names, only the file of a
    named domain's UUID) and does not stop the others."""
    settings = ctx.settings
    entries, corrupt = journal.scan_entries(settings.journal_dir)
    outcomes = []
    if names:
        known = {e.domain for e in entries}
        named_uuids = set()
        for name in names:
            if name not in known:
                try:
                    named_uuids.add(ctx.connection.lookup(name).UUIDString())
                except KvmBorgError as exc:
                    raise UsageError(str(exc)) from None
        entries = [e for e in entries if e.domain in names]
        corrupt = [exc for exc in corrupt if exc.path.stem in named_uuids]
    for exc in corrupt:
        log.error("%s", exc)
        outcomes.append({"domain": None, "ok": False, "actions": [], "warnings": [], "error": str(exc)})
    for entry in entries:
        outcome = {"domain": entry.domain, "ok": False, "actions": [], "warnings": [], "error": None}
        try:
            with domain_lock(settings.lock_dir, entry.uuid, entry.domain):
                fresh = journal.read_entry(settings.journal_dir, entry.uuid)
                if fresh is None:  # completed meanwhile
                    outcome["ok"] = True
                else:
                    report = ctx.pm.hook.kvm_borg_recover_entry(
                        entry=fresh, connection=ctx.connection, settings=settings
                    )
                    if report is None:
                        raise KvmBorgError(f"no plugin can recover entries of source {fresh.source!r}")
                    outcome.update(ok=True, actions=report.actions, warnings=report.warnings)
        except LockedError as exc:
            outcome["error"] = str(exc)
        except KvmBorgError as exc:
            outcome["error"] = str(exc)
            log.error("%s", exc)
        except Exception as exc:  # one entry's unexpected failure must not cost the others their recovery
            outcome["error"] = f"domain '{entry.domain}': unexpected error: {exc}"
            log.error("%s", outcome["error"])
            log.debug("traceback", exc_info=True)
        outcomes.append(outcome)
    return outcomes


def run_from_args(ctx: Context, args) -> int:
    outcomes = run_recover(ctx, [] if args.all else args.domains)
    if outcomes:  # the journal changed: the metrics' pending entries follow (a failure is logged)
        run_record.write_metrics(ctx.settings, run_state.load(ctx.settings.state_dir))
    if args.json:
        print_json(outcomes)
    else:
        if not outcomes:
            print("nothing to recover")
        for outcome in outcomes:
            if outcome["domain"] is None:  # an unreadable journal file: its message names it
                print(f"FAILED: {outcome['error']}")
                continue
            print(f"{outcome['domain']}: {'recovered' if outcome['ok'] else 'FAILED: ' + outcome['error']}")
            for action in outcome["actions"]:
                print(f"  {action}")
            for warning in outcome["warnings"]:
                print(f"  warning: {warning}")
    return exit_code(failed=any(not o["ok"] for o in outcomes), warned=any(o["warnings"] for o in outcomes))
